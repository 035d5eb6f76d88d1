//! The transport half of the shim: a `ChannelResolver` whose channels
//! pre-encode what the default gRPC client would otherwise encode with the
//! UDF-blind composed codec.
//!
//! The coordinator hands each stage plan to the transport still decoded
//! (`SetPlanRequest.plan = MaybeEncoded::Decoded`), and a shuffle consumer
//! hands the producer's partitioning the same way
//! (`ProducerHead::RepartitionExec { partitioning: MaybeEncoded::Decoded }`).
//! [`InlineUdfChannel`] turns both into `MaybeEncoded::Encoded` bytes written
//! by [`InlineUdfEncoder`], then delegates to upstream's gRPC client, which
//! passes encoded bytes through untouched. Tasks the coordinator keeps
//! in-process never reach a channel: they share the plan object, no
//! serialization involved.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use datafusion::physical_plan::ExecutionPlan;
use datafusion_distributed::grpc::{create_worker_client, DefaultChannelResolver};
use datafusion_distributed::{
    ChannelResolver, CoordinatorToWorkerMsg, ExecuteTaskRequest, GetWorkerInfoRequest,
    GetWorkerInfoResponse, MaybeEncoded, ProducerHead, SetPlanRequest, WorkerChannel,
    WorkerToCoordinatorMsg,
};
use datafusion_proto::bytes::physical_plan_to_bytes_with_proto_converter;
use datafusion_proto::physical_plan::to_proto::serialize_partitioning;
use datafusion_proto::physical_plan::DeduplicatingProtoConverter;
use futures::stream::{BoxStream, StreamExt};
use http::HeaderMap;
use prost::Message;
use url::Url;

use crate::encoder::InlineUdfEncoder;

/// Encodes a stage plan as the workers expect it, with Python UDFs inline.
pub fn encode_stage_plan(
    plan: Arc<dyn ExecutionPlan>,
    encoder: &InlineUdfEncoder,
) -> Result<Vec<u8>> {
    encoder.count_plan();
    let converter = DeduplicatingProtoConverter::default();
    physical_plan_to_bytes_with_proto_converter(plan, encoder, &converter)
        .map(|bytes| bytes.to_vec())
}

/// A [`WorkerChannel`] that pre-encodes plans and partitionings with
/// [`InlineUdfEncoder`], delegates everything else, and explains a worker's
/// missing by-name UDF.
pub struct InlineUdfChannel {
    inner: Box<dyn WorkerChannel>,
    encoder: Arc<InlineUdfEncoder>,
    worker: Url,
}

impl InlineUdfChannel {
    pub fn new(inner: Box<dyn WorkerChannel>, encoder: Arc<InlineUdfEncoder>, worker: Url) -> Self {
        Self {
            inner,
            encoder,
            worker,
        }
    }
}

/// What upstream says when a by-name UDF is missing from a worker's registry.
const MISSING_UDF: &str = "PhysicalExtensionCodec is not provided for scalar function ";

/// Rewrites a worker's "missing UDF" error to name the UDF, the worker and the remedy.
pub fn explain_missing_udf(error: DataFusionError, worker: &Url) -> DataFusionError {
    let text = error.to_string();
    let Some(at) = text.find(MISSING_UDF) else {
        return error;
    };
    let name: String = text[at + MISSING_UDF.len()..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"' && *c != '\'')
        .collect();
    DataFusionError::Plan(format!(
        "worker {worker} has no scalar function '{name}'. It is not a Python UDF, so it travels \
         by name and every worker must register it: start the workers with \
         `--ffi-udf SPEC` providing '{name}' (SPEC is /path/to/lib.so:symbol or \
         python.module:attribute), or register it in their session builder. ({text})"
    ))
}

fn explain_stream<T: Send + 'static>(
    stream: BoxStream<'static, Result<T>>,
    worker: Url,
) -> BoxStream<'static, Result<T>> {
    stream
        .map(move |item| item.map_err(|e| explain_missing_udf(e, &worker)))
        .boxed()
}

#[async_trait]
impl WorkerChannel for InlineUdfChannel {
    async fn coordinator_channel(
        &mut self,
        headers: HeaderMap,
        mut set_plan_request: SetPlanRequest,
        c2w_stream: BoxStream<'static, CoordinatorToWorkerMsg>,
        metrics: ExecutionPlanMetricsSet,
        task_ctx: &Arc<TaskContext>,
    ) -> Result<BoxStream<'static, Result<WorkerToCoordinatorMsg>>> {
        if let MaybeEncoded::Decoded(plan) = set_plan_request.plan {
            set_plan_request.plan = MaybeEncoded::Encoded(encode_stage_plan(plan, &self.encoder)?);
        }
        let stream = self
            .inner
            .coordinator_channel(headers, set_plan_request, c2w_stream, metrics, task_ctx)
            .await
            .map_err(|e| explain_missing_udf(e, &self.worker))?;
        Ok(explain_stream(stream, self.worker.clone()))
    }

    async fn execute_task(
        &mut self,
        headers: HeaderMap,
        mut request: ExecuteTaskRequest,
        metrics: ExecutionPlanMetricsSet,
        task_ctx: &Arc<TaskContext>,
    ) -> Result<Vec<BoxStream<'static, Result<RecordBatch>>>> {
        if let ProducerHead::RepartitionExec {
            partitioning: MaybeEncoded::Decoded(partitioning),
        } = &request.producer_head
        {
            self.encoder.count_plan();
            let converter = DeduplicatingProtoConverter::default();
            let proto = serialize_partitioning(partitioning, self.encoder.as_ref(), &converter)?;
            request.producer_head = ProducerHead::RepartitionExec {
                partitioning: MaybeEncoded::Encoded(proto.encode_to_vec()),
            };
        }
        let streams = self
            .inner
            .execute_task(headers, request, metrics, task_ctx)
            .await
            .map_err(|e| explain_missing_udf(e, &self.worker))?;
        Ok(streams
            .into_iter()
            .map(|stream| explain_stream(stream, self.worker.clone()))
            .collect())
    }

    async fn get_worker_info(
        &mut self,
        request: GetWorkerInfoRequest,
    ) -> Result<GetWorkerInfoResponse> {
        self.inner.get_worker_info(request).await
    }
}

/// Upstream's default gRPC channels, wrapped in [`InlineUdfChannel`]. Install
/// it with `with_distributed_channel_resolver` on the coordinator and on
/// every worker (workers call each other for shuffles).
#[derive(Clone)]
pub struct InlineUdfChannelResolver {
    inner: DefaultChannelResolver,
    encoder: Arc<InlineUdfEncoder>,
}

impl InlineUdfChannelResolver {
    pub fn new(encoder: Arc<InlineUdfEncoder>) -> Self {
        Self {
            inner: DefaultChannelResolver::default(),
            encoder,
        }
    }
}

#[async_trait]
impl ChannelResolver for InlineUdfChannelResolver {
    async fn get_worker_client_for_url(&self, url: &Url) -> Result<Box<dyn WorkerChannel>> {
        let channel = self.inner.get_channel(url).await?;
        Ok(Box::new(InlineUdfChannel::new(
            create_worker_client(channel),
            Arc::clone(&self.encoder),
            url.clone(),
        )))
    }
}
