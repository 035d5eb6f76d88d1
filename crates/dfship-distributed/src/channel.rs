//! The transport half of the shim: a `ChannelResolver` whose channels hand
//! what the default gRPC client would otherwise encode with the UDF-blind
//! composed codec to [`InlineUdfEncoder`] first. This module moves bytes and
//! nothing else: encoding and its counters belong to the encoder, and the
//! wording of worker errors to `worker_errors`.
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use datafusion_distributed::grpc::{create_worker_client, BoxCloneSyncChannel};
use datafusion_distributed::{
    ChannelResolver, CoordinatorToWorkerMsg, ExecuteTaskRequest, GetWorkerInfoRequest,
    GetWorkerInfoResponse, MaybeEncoded, ProducerHead, SetPlanRequest, WorkerChannel,
    WorkerToCoordinatorMsg,
};
use dfship_codec::ErrorKind;
use futures::stream::{BoxStream, StreamExt};
use http::HeaderMap;
use url::Url;

use crate::encoder::InlineUdfEncoder;
use crate::message_limit::LimitedChannel;
use crate::payloads::PayloadTracker;
use crate::rpc_auth::{RpcAuthenticator, SignedChannel};
use crate::task_lifetime::TASK_ID_HEADER;
use crate::tls::TlsConfig;
use crate::watched_connector::WatchedConnector;
use crate::worker_errors::{explain_worker_error, PlanSendFailures};

/// A [`WorkerChannel`] that has plans and partitionings encoded by
/// [`InlineUdfEncoder`], delegates everything else, and names the worker in
/// the errors that come back.
pub struct InlineUdfChannel {
    inner: Box<dyn WorkerChannel>,
    encoder: Arc<InlineUdfEncoder>,
    worker: Url,
    max_message_bytes: usize,
    failures: PlanSendFailures,
    /// The connection, and what the worker holds, for large pickles.
    payloads: Option<(BoxCloneSyncChannel, Arc<PayloadTracker>)>,
}

impl InlineUdfChannel {
    /// Plans above `max_message_bytes` are refused here, with an error that
    /// says so: a worker refusing one itself would only make the query time
    /// out (datafusion-distributed does not report that stream's error).
    pub fn new(
        inner: Box<dyn WorkerChannel>,
        encoder: Arc<InlineUdfEncoder>,
        worker: Url,
        max_message_bytes: usize,
    ) -> Self {
        Self {
            inner,
            encoder,
            worker,
            max_message_bytes,
            failures: PlanSendFailures::default(),
            payloads: None,
        }
    }

    /// Names large pickles by digest, handing them to the worker first over
    /// `channel` (see `crate::payloads`); without it, every plan carries them.
    pub(crate) fn with_payloads(
        mut self,
        channel: BoxCloneSyncChannel,
        tracker: Arc<PayloadTracker>,
    ) -> Self {
        self.payloads = Some((channel, tracker));
        self
    }

    /// Shares what this channel learns about failed plan sends with others
    /// to the same workers (so a later timeout names the real cause).
    pub(crate) fn with_failures(mut self, failures: PlanSendFailures) -> Self {
        self.failures = failures;
        self
    }

    /// How errors coming back from this worker are worded.
    fn explainer(&self) -> impl Fn(DataFusionError) -> DataFusionError + Send + Sync + 'static {
        let worker = self.worker.clone();
        let failures = self.failures.clone();
        move |error| failures.explain(explain_worker_error(error, &worker), &worker)
    }

    /// The plan as bytes for the worker (after making sure it holds the
    /// large pickles the plan names by digest), or why it cannot be sent.
    async fn encode(
        &self,
        plan: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
        query: &[u8],
    ) -> Result<Vec<u8>> {
        let encoded = match &self.payloads {
            Some((channel, tracker)) => {
                let (encoded, kept) = self.encoder.encode_plan_for_worker(plan)?;
                tracker
                    .ensure(
                        &self.worker,
                        channel.clone(),
                        query,
                        &kept,
                        self.max_message_bytes,
                    )
                    .await?;
                encoded
            }
            None => self.encoder.encode_plan(plan)?,
        };
        if encoded.len() > self.max_message_bytes {
            return Err(DataFusionError::Plan(format!(
                "{} the stage plan for worker {} is {} bytes, above the message limit of {} \
                 bytes (--max-message-bytes); it is this large because of the Python UDFs it \
                 carries: capture less data in their closures, or raise the limit on the \
                 coordinator and every worker",
                dfship_codec::ErrorKind::PayloadRefused.tag(),
                self.worker,
                encoded.len(),
                self.max_message_bytes
            )));
        }
        Ok(encoded)
    }
}

static RECEIVED_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Bytes (in memory, Arrow) of the record batches this process has read
/// from workers' tasks: shuffles on a worker, final stages on a coordinator.
pub fn received_bytes() -> u64 {
    RECEIVED_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

fn explain_stream<T: Send + 'static>(
    stream: BoxStream<'static, Result<T>>,
    explain: impl Fn(DataFusionError) -> DataFusionError + Send + Sync + 'static,
) -> BoxStream<'static, Result<T>> {
    stream.map(move |item| item.map_err(&explain)).boxed()
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
            let query = set_plan_request.task_key.query_id;
            match self.encode(plan, query.as_bytes()).await {
                Ok(encoded) => set_plan_request.plan = MaybeEncoded::Encoded(encoded),
                Err(error) => {
                    self.failures.record(&self.worker, &error);
                    return Err(error);
                }
            }
        }
        // Names this task, so the worker can stop its Python calls when the
        // query ends (see `task_lifetime`).
        let mut headers = headers;
        if let Ok(id) = http::HeaderValue::from_str(&uuid::Uuid::new_v4().simple().to_string()) {
            headers.insert(TASK_ID_HEADER, id);
        }
        if let Some(query) = crate::query_span::query_header(&set_plan_request.task_key) {
            headers.insert(crate::query_span::QUERY_HEADER, query);
        }
        // Where the task's UDF output goes (see `watch`).
        let query_options = task_ctx
            .session_config()
            .get_extension::<crate::QueryRetry>()
            .map(|retry| *retry.query_options())
            .unwrap_or_default();
        if let Some(value) = query_options.output_header() {
            headers.insert(crate::watch::OUTPUT_HEADER, value);
        }
        let explain = self.explainer();
        let stream = self
            .inner
            .coordinator_channel(headers, set_plan_request, c2w_stream, metrics, task_ctx)
            .await
            .map_err(&explain)?;
        Ok(explain_stream(stream, explain))
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
            request.producer_head = ProducerHead::RepartitionExec {
                partitioning: MaybeEncoded::Encoded(
                    self.encoder.encode_partitioning(partitioning)?,
                ),
            };
        }
        let mut headers = headers;
        if let Some(query) = crate::query_span::query_header(&request.task_key) {
            headers.insert(crate::query_span::QUERY_HEADER, query);
        }
        let streams = self
            .inner
            .execute_task(headers, request, metrics, task_ctx)
            .await
            .map_err(self.explainer())?;
        Ok(streams
            .into_iter()
            .map(|stream| {
                let counted = stream.inspect(|item| {
                    if let Ok(batch) = item {
                        RECEIVED_BYTES.fetch_add(
                            batch.get_array_memory_size() as u64,
                            std::sync::atomic::Ordering::Relaxed,
                        );
                    }
                });
                explain_stream(counted.boxed(), self.explainer())
            })
            .collect())
    }

    async fn get_worker_info(
        &mut self,
        request: GetWorkerInfoRequest,
    ) -> Result<GetWorkerInfoResponse> {
        self.inner
            .get_worker_info(request)
            .await
            .map_err(self.explainer())
    }
}

/// How connections to workers (and a worker's server) behave: how long a
/// dead or unreachable worker can hold up a query, how large a message may
/// be, and TLS.
#[derive(Debug, Clone)]
pub struct ChannelOptions {
    /// How long connecting to a worker may take.
    pub connect_timeout: Duration,
    /// How often an HTTP/2 ping checks a connection, busy or idle.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is declared dead.
    pub keepalive_timeout: Duration,
    /// The largest gRPC message accepted, either way.
    pub max_message_bytes: usize,
    /// TLS for connections to `https://` workers, and for a worker's server.
    pub tls: Option<TlsConfig>,
    /// A worker's server: connections open at most (more are closed at once).
    pub max_connections: usize,
    /// A worker's server: how long a client may take over its TLS handshake.
    pub handshake_timeout: Duration,
}

/// The largest gRPC message accepted by default: a stage plan may carry
/// Python UDF payloads up to `dfship_codec::DEFAULT_MAX_PAYLOAD_BYTES`
/// (100 MiB) and is encoded once more around them; record batches are far
/// smaller.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

impl Default for ChannelOptions {
    /// 5 s to connect; a silent peer is detected within about 15 s; messages
    /// up to [`DEFAULT_MAX_MESSAGE_BYTES`]; no TLS; a server keeps at most
    /// [`crate::DEFAULT_MAX_CONNECTIONS`] connections and gives a TLS
    /// handshake 10 s.
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(10),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            tls: None,
            max_connections: crate::connection_limit::DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// A channel, and the flags that make the resolver make it again: raised
/// when its connection closed ([`WatchedConnector`]: tonic would otherwise
/// reconnect by itself and may keep a failed attempt's error for a later
/// query), and by its [`SignedChannel`] when the worker at its address is no
/// longer the one it verified.
#[derive(Clone)]
struct Connected {
    channel: BoxCloneSyncChannel,
    closed: Arc<AtomicBool>,
    stale: Option<Arc<AtomicBool>>,
}

impl Connected {
    fn outdated(&self) -> bool {
        self.closed.load(Ordering::Acquire)
            || self
                .stale
                .as_ref()
                .is_some_and(|stale| stale.load(Ordering::Acquire))
    }
}

type ChannelCell = Arc<tokio::sync::OnceCell<Connected>>;

/// gRPC channels to workers (one per URL, reused, with [`ChannelOptions`]),
/// wrapped in [`InlineUdfChannel`]. Install it with
/// `with_distributed_channel_resolver` on the coordinator and on every worker
/// (workers call each other for shuffles).
#[derive(Clone)]
pub struct InlineUdfChannelResolver {
    channels: Arc<Mutex<HashMap<Url, ChannelCell>>>,
    options: ChannelOptions,
    encoder: Arc<InlineUdfEncoder>,
    auth: Option<RpcAuthenticator>,
    failures: PlanSendFailures,
    payloads: Arc<PayloadTracker>,
}

impl InlineUdfChannelResolver {
    /// Channels with `options`; with `auth`, every request carries a proof
    /// of the cluster key.
    pub fn new(
        encoder: Arc<InlineUdfEncoder>,
        options: ChannelOptions,
        auth: Option<RpcAuthenticator>,
    ) -> Self {
        Self {
            channels: Arc::default(),
            options,
            encoder,
            auth,
            failures: PlanSendFailures::default(),
            payloads: Arc::default(),
        }
    }

    /// The same resolver with connections of its own (for probes, which
    /// must not share a connection with query traffic).
    pub fn with_own_connections(&self) -> Self {
        Self {
            channels: Arc::default(),
            ..self.clone()
        }
    }

    /// What the workers were handed of large pickles, and what they reused.
    pub fn payload_stats(&self) -> crate::payloads::PayloadStats {
        self.payloads.stats()
    }

    async fn connect(&self, url: &Url) -> Result<Connected> {
        let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
            .map_err(|e| {
                DataFusionError::Configuration(format!(
                    "'{url}' is not a valid worker URL ({e}); use http://HOST:PORT"
                ))
            })?
            // TCP keepalive is set on the connector (`WatchedConnector`):
            // tonic applies an endpoint's TCP settings only to its own.
            .connect_timeout(self.options.connect_timeout)
            .http2_keep_alive_interval(self.options.keepalive_interval)
            .keep_alive_timeout(self.options.keepalive_timeout)
            .keep_alive_while_idle(true)
            // Stage plans can carry megabytes of pickled closures: let HTTP/2
            // flow control grow its windows instead of 64 KiB round trips.
            .http2_adaptive_window(true);
        match (url.scheme(), &self.options.tls) {
            ("https", Some(tls)) => {
                endpoint = endpoint.tls_config(tls.client()?).map_err(|e| {
                    DataFusionError::Configuration(format!("cannot set up TLS for {url}: {e}"))
                })?;
            }
            ("https", None) => {
                return Err(DataFusionError::Configuration(format!(
                    "worker {url} is https:// but this process has no TLS settings; give \
                     --tls-ca (and --tls-cert/--tls-key if the workers require client \
                     certificates)"
                )))
            }
            (_, Some(tls)) if tls.ca.is_some() => {
                return Err(DataFusionError::Configuration(format!(
                    "this process is set up for TLS (--tls-ca) but worker {url} is not https://; \
                     write its URL as https://HOST:PORT"
                )))
            }
            _ => {}
        }
        let connector = WatchedConnector::new(self.options.keepalive_interval);
        let closed = connector.closed();
        let channel = endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| {
                DataFusionError::Execution(format!(
                "{} cannot connect to worker {url} within {:?}: {e} ({e:?}); check that it runs \
                 and that this host can reach it",
                ErrorKind::WorkerLost.tag(),
                self.options.connect_timeout
            ))
            })?;
        let mut limited = LimitedChannel::new(channel, self.options.max_message_bytes);
        let (channel, stale) = match &self.auth {
            Some(auth) => {
                // Nothing signed goes to an endpoint before it proves it
                // holds the key (`rpc_auth`).
                let worker = crate::rpc_auth::challenge_endpoint(
                    &mut limited,
                    auth,
                    url.as_str(),
                    self.options.connect_timeout,
                )
                .await
                .map_err(DataFusionError::Execution)?;
                let signed = SignedChannel::new(limited, auth.clone(), worker, url.as_str());
                let stale = signed.stale_flag();
                (BoxCloneSyncChannel::new(signed), Some(stale))
            }
            None => (BoxCloneSyncChannel::new(limited), None),
        };
        Ok(Connected {
            channel,
            closed,
            stale,
        })
    }

    async fn channel(&self, url: &Url) -> Result<BoxCloneSyncChannel> {
        let cell = {
            let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
            let outdated = channels
                .get(url)
                .is_some_and(|cell| cell.get().is_some_and(Connected::outdated));
            if outdated {
                // Connect afresh, and ask the address who it is again.
                channels.remove(url);
            }
            Arc::clone(channels.entry(url.clone()).or_default())
        };
        match cell.get_or_try_init(|| self.connect(url)).await {
            Ok(connected) => Ok(connected.channel.clone()),
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

impl std::fmt::Debug for InlineUdfChannelResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InlineUdfChannelResolver")
            .field("options", &self.options)
            .field("signed", &self.auth.is_some())
            .finish_non_exhaustive()
    }
}

impl InlineUdfChannelResolver {
    /// The (signed, limited) channel to `url`, for dfship's own services.
    pub(crate) async fn raw_channel(&self, url: &Url) -> Result<BoxCloneSyncChannel> {
        self.channel(url).await
    }

    /// A client of the worker's `ObservabilityService` (task progress), on
    /// the same channel as its worker service (and the same key proofs).
    pub(crate) async fn observability_client(
        &self,
        url: &Url,
    ) -> Result<datafusion_distributed::grpc::ObservabilityServiceClient<BoxCloneSyncChannel>> {
        let channel = self.channel(url).await?;
        Ok(
            datafusion_distributed::grpc::ObservabilityServiceClient::new(channel)
                .max_decoding_message_size(self.options.max_message_bytes),
        )
    }
}

#[async_trait]
impl ChannelResolver for InlineUdfChannelResolver {
    async fn get_worker_client_for_url(&self, url: &Url) -> Result<Box<dyn WorkerChannel>> {
        let channel = self.channel(url).await?;
        Ok(Box::new(
            InlineUdfChannel::new(
                create_worker_client(channel.clone()),
                Arc::clone(&self.encoder),
                url.clone(),
                self.options.max_message_bytes,
            )
            .with_failures(self.failures.clone())
            .with_payloads(channel, Arc::clone(&self.payloads)),
        ))
    }
}
