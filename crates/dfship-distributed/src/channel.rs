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
//!
//! [`InlineUdfChannelResolver`] also owns the gRPC connections, because
//! upstream's `DefaultChannelResolver` sets no connect timeout and no HTTP/2
//! keepalive: a worker that dies without closing its sockets (`kill -9` of a
//! container, a cut network link) would leave a query waiting forever. Ours
//! fails such a query within [`ChannelOptions`]' bounds, and every error
//! coming back through a channel names the worker it came from.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use datafusion::physical_plan::ExecutionPlan;
use datafusion_distributed::grpc::{create_worker_client, BoxCloneSyncChannel};
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

/// Explains a missing by-name UDF, and otherwise adds the worker's URL to
/// an error that does not name it yet (errors from deeper stages keep the
/// name of the worker they started on).
pub fn explain_worker_error(error: DataFusionError, worker: &Url) -> DataFusionError {
    let error = explain_missing_udf(error, worker);
    let text = error.to_string();
    let url = worker.as_str().trim_end_matches('/');
    if text.contains(url) {
        return error;
    }
    let lost = [
        "h2 protocol error",
        "transport error",
        "broken pipe",
        "connection reset",
        "keepalive",
    ]
    .iter()
    .any(|needle| text.to_lowercase().contains(needle));
    let context = if lost {
        format!(
            "lost the connection to worker {url} (it stopped, or the network to it failed); the \
             query cannot finish without it: check that worker, or run the query again with it \
             left out of the worker list"
        )
    } else {
        format!("on worker {url}")
    };
    DataFusionError::Context(context, Box::new(error))
}

fn explain_stream<T: Send + 'static>(
    stream: BoxStream<'static, Result<T>>,
    worker: Url,
) -> BoxStream<'static, Result<T>> {
    stream
        .map(move |item| item.map_err(|e| explain_worker_error(e, &worker)))
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
            .map_err(|e| explain_worker_error(e, &self.worker))?;
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
            .map_err(|e| explain_worker_error(e, &self.worker))?;
        Ok(streams
            .into_iter()
            .map(|stream| explain_stream(stream, self.worker.clone()))
            .collect())
    }

    async fn get_worker_info(
        &mut self,
        request: GetWorkerInfoRequest,
    ) -> Result<GetWorkerInfoResponse> {
        self.inner
            .get_worker_info(request)
            .await
            .map_err(|e| explain_worker_error(e, &self.worker))
    }
}

/// Bounds on how long a dead or unreachable worker can hold up a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelOptions {
    /// How long connecting to a worker may take.
    pub connect_timeout: Duration,
    /// How often an HTTP/2 ping checks a connection, busy or idle.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is declared dead.
    pub keepalive_timeout: Duration,
}

impl Default for ChannelOptions {
    /// 5 s to connect; a silent peer is detected within about 15 s.
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

type ChannelCell = Arc<tokio::sync::OnceCell<BoxCloneSyncChannel>>;

/// gRPC channels to workers (one per URL, reused, with [`ChannelOptions`]),
/// wrapped in [`InlineUdfChannel`]. Install it with
/// `with_distributed_channel_resolver` on the coordinator and on every worker
/// (workers call each other for shuffles).
#[derive(Clone)]
pub struct InlineUdfChannelResolver {
    channels: Arc<Mutex<HashMap<Url, ChannelCell>>>,
    options: ChannelOptions,
    encoder: Arc<InlineUdfEncoder>,
}

impl InlineUdfChannelResolver {
    pub fn new(encoder: Arc<InlineUdfEncoder>) -> Self {
        Self::with_options(encoder, ChannelOptions::default())
    }

    pub fn with_options(encoder: Arc<InlineUdfEncoder>, options: ChannelOptions) -> Self {
        Self {
            channels: Arc::default(),
            options,
            encoder,
        }
    }

    async fn connect(&self, url: &Url) -> Result<BoxCloneSyncChannel> {
        let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
            .map_err(|e| {
                DataFusionError::Configuration(format!(
                    "'{url}' is not a valid worker URL ({e}); use http://HOST:PORT"
                ))
            })?
            .connect_timeout(self.options.connect_timeout)
            .tcp_keepalive(Some(self.options.keepalive_interval))
            .http2_keep_alive_interval(self.options.keepalive_interval)
            .keep_alive_timeout(self.options.keepalive_timeout)
            .keep_alive_while_idle(true);
        let channel = endpoint.connect().await.map_err(|e| {
            DataFusionError::Execution(format!(
                "cannot connect to worker {url} within {:?}: {e} ({e:?}); check that it runs \
                 and that this host can reach it",
                self.options.connect_timeout
            ))
        })?;
        Ok(BoxCloneSyncChannel::new(channel))
    }

    async fn channel(&self, url: &Url) -> Result<BoxCloneSyncChannel> {
        let cell = {
            let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(channels.entry(url.clone()).or_default())
        };
        match cell.get_or_try_init(|| self.connect(url)).await {
            Ok(channel) => Ok(channel.clone()),
            Err(error) => {
                // Forget the failed attempt so the next query connects afresh.
                let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
                if channels.get(url).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                    channels.remove(url);
                }
                Err(error)
            }
        }
    }
}

#[async_trait]
impl ChannelResolver for InlineUdfChannelResolver {
    async fn get_worker_client_for_url(&self, url: &Url) -> Result<Box<dyn WorkerChannel>> {
        let channel = self.channel(url).await?;
        Ok(Box::new(InlineUdfChannel::new(
            create_worker_client(channel),
            Arc::clone(&self.encoder),
            url.clone(),
        )))
    }
}
