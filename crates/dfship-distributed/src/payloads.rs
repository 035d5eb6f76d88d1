//! Large pickles once per worker, across queries.
//!
//! A Python UDF closing over a model or a table can pickle to megabytes. A
//! plan for a worker names every pickle of at least
//! `dfship_codec::BY_DIGEST_MIN_BYTES` by its digest, and the coordinator
//! makes sure the worker holds it before the plan is sent, with a small gRPC
//! service every worker serves beside datafusion-distributed's:
//!
//! - `Hold(digests)` answers the worker's *incarnation* (random, fresh at
//!   every start) and the digests it does not hold;
//! - `Put(payloads)` hands it full frames, which it checks exactly as it
//!   checks a plan's (strict mode, size, cluster key, digest) and keeps in
//!   its payload store (nothing is unpickled).
//!
//! The coordinator ([`PayloadTracker`]) remembers, per worker URL and
//! incarnation, what the worker holds, asks once per query (a restarted
//! worker answers with a new incarnation and gets everything again; a
//! worker that dropped a pickle to keep others says so), and hands over only
//! what is missing. So a repeated query over a 16 MB closure sends 16 MB to
//! each worker once, and then only digests. Both RPCs go through the same
//! channel as plans (cluster-key proofs, TLS, message limits).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use datafusion::error::{DataFusionError, Result};
use datafusion_distributed::grpc::BoxCloneSyncChannel;
use dfship_codec::{ErrorKind, PythonUdfCodec};
use futures::future::BoxFuture;
use prost::Message;
use url::Url;

/// The gRPC service name.
pub const PAYLOAD_SERVICE: &str = "dfship.payloads.v1.Payloads";
const HOLD: &str = "/dfship.payloads.v1.Payloads/Hold";
const PUT: &str = "/dfship.payloads.v1.Payloads/Put";
const UDF_FIGURES: &str = "/dfship.payloads.v1.Payloads/UdfFigures";
const UDF_OUTPUT: &str = "/dfship.payloads.v1.Payloads/UdfOutput";

/// Bytes of UDF output text one `UdfOutput` answer carries at most (the
/// rest waits for the next ask).
const MAX_OUTPUT_REPLY_BYTES: usize = 1 << 20;

#[derive(Clone, PartialEq, Message)]
pub struct UdfOutputRequest {
    /// The query (16 bytes, its UUID).
    #[prost(bytes = "vec", tag = "1")]
    pub query: Vec<u8>,
}

/// One line a UDF of the query wrote on this worker.
#[derive(Clone, PartialEq, Message)]
pub struct UdfOutputLine {
    #[prost(uint64, tag = "1")]
    pub stage: u64,
    #[prost(uint64, tag = "2")]
    pub task: u64,
    #[prost(string, tag = "3")]
    pub udf: String,
    /// `stdout`, `stderr`, `logging` or `warning`.
    #[prost(string, tag = "4")]
    pub stream: String,
    #[prost(string, tag = "5")]
    pub text: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct UdfOutputResponse {
    #[prost(message, repeated, tag = "1")]
    pub lines: Vec<UdfOutputLine>,
    /// Lines (and their bytes) dropped past the query's caps since the last ask.
    #[prost(uint64, tag = "2")]
    pub dropped_lines: u64,
    #[prost(uint64, tag = "3")]
    pub dropped_bytes: u64,
}

/// Figures one `UdfFigures` answer carries at most.
const MAX_FIGURES: usize = 10_000;

#[derive(Clone, PartialEq, Message)]
pub struct UdfFiguresRequest {
    /// The query (16 bytes, its UUID).
    #[prost(bytes = "vec", tag = "1")]
    pub query: Vec<u8>,
}

/// One UDF's figures in one task of the query.
#[derive(Clone, PartialEq, Message)]
pub struct TaskUdfFigures {
    #[prost(uint64, tag = "1")]
    pub stage: u64,
    #[prost(uint64, tag = "2")]
    pub task: u64,
    #[prost(string, tag = "3")]
    pub udf: String,
    #[prost(uint64, tag = "4")]
    pub calls: u64,
    #[prost(uint64, tag = "5")]
    pub rows: u64,
    #[prost(double, tag = "6")]
    pub seconds: f64,
    #[prost(uint64, tag = "7")]
    pub failures: u64,
}

#[derive(Clone, PartialEq, Message)]
pub struct UdfFiguresResponse {
    #[prost(message, repeated, tag = "1")]
    pub figures: Vec<TaskUdfFigures>,
}

/// Digests one `Hold` may ask about.
const MAX_DIGESTS: usize = 4096;

#[derive(Clone, PartialEq, Message)]
pub struct HoldRequest {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub digests: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
pub struct HoldResponse {
    #[prost(bytes = "vec", tag = "1")]
    pub incarnation: Vec<u8>,
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub missing: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Payload {
    /// The UDF's name (a frame names its UDF; the two must agree).
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(bytes = "bytes", tag = "2")]
    pub frame: Bytes,
}

#[derive(Clone, PartialEq, Message)]
pub struct PutRequest {
    #[prost(message, repeated, tag = "1")]
    pub payloads: Vec<Payload>,
}

#[derive(Clone, PartialEq, Message)]
pub struct PutResponse {
    #[prost(bytes = "vec", tag = "1")]
    pub incarnation: Vec<u8>,
}

/// The worker side: answers `Hold` and `Put` for this process's payload store.
#[derive(Clone)]
pub struct PayloadServer {
    codec: Arc<PythonUdfCodec>,
    incarnation: Arc<[u8; 16]>,
    max_message_bytes: usize,
}

impl PayloadServer {
    pub fn new(codec: Arc<PythonUdfCodec>, max_message_bytes: usize) -> Self {
        Self {
            codec,
            incarnation: Arc::new(*uuid::Uuid::new_v4().as_bytes()),
            max_message_bytes,
        }
    }

    fn hold(&self, request: HoldRequest) -> Result<HoldResponse, tonic::Status> {
        if request.digests.len() > MAX_DIGESTS {
            return Err(tonic::Status::invalid_argument(format!(
                "Hold asks about {} digests, more than {MAX_DIGESTS}",
                request.digests.len()
            )));
        }
        let mut missing = Vec::new();
        for digest in request.digests {
            let key: [u8; 32] = digest.as_slice().try_into().map_err(|_| {
                tonic::Status::invalid_argument(format!(
                    "a digest of {} bytes (SHA-256 digests have 32)",
                    digest.len()
                ))
            })?;
            if !self.codec.holds_payload(&key) {
                missing.push(digest);
            }
        }
        Ok(HoldResponse {
            incarnation: self.incarnation.to_vec(),
            missing,
        })
    }

    fn put(&self, request: PutRequest) -> Result<PutResponse, tonic::Status> {
        for payload in request.payloads {
            self.codec
                .keep_payload(&payload.name, &payload.frame)
                .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        }
        Ok(PutResponse {
            incarnation: self.incarnation.to_vec(),
        })
    }
}

impl PayloadServer {
    /// What each Python UDF cost in each task of a query this worker ran.
    fn udf_figures(&self, request: UdfFiguresRequest) -> Result<UdfFiguresResponse, tonic::Status> {
        let query = query_id(&request.query)?;
        let figures = dfship_codec::query_figures(query)
            .into_iter()
            .take(MAX_FIGURES)
            .map(|(label, udf, f)| TaskUdfFigures {
                stage: label.stage,
                task: label.task,
                udf,
                calls: f.calls,
                rows: f.rows,
                seconds: f.seconds,
                failures: f.failures,
            })
            .collect();
        Ok(UdfFiguresResponse { figures })
    }
}

impl PayloadServer {
    /// What the query's UDFs wrote on this worker since the last ask.
    fn udf_output(&self, request: UdfOutputRequest) -> Result<UdfOutputResponse, tonic::Status> {
        let query = query_id(&request.query)?;
        let taken = dfship_codec::take_query_output(query, false, MAX_OUTPUT_REPLY_BYTES);
        let lines = taken
            .lines
            .into_iter()
            .map(|line| {
                let (stage, task) = match line.origin {
                    dfship_codec::OutputOrigin::Task { stage, task } => (stage, task),
                    dfship_codec::OutputOrigin::Coordinator => (0, 0),
                };
                UdfOutputLine {
                    stage,
                    task,
                    udf: line.udf,
                    stream: line.stream.name().to_string(),
                    text: line.text,
                }
            })
            .collect();
        Ok(UdfOutputResponse {
            lines,
            dropped_lines: taken.dropped_lines,
            dropped_bytes: taken.dropped_bytes,
        })
    }
}

/// A query id of a request: 16 bytes.
fn query_id(bytes: &[u8]) -> Result<[u8; 16], tonic::Status> {
    bytes.try_into().map_err(|_| {
        tonic::Status::invalid_argument(format!(
            "a query id of {} bytes (query ids are 16-byte UUIDs)",
            bytes.len()
        ))
    })
}

/// Asks `channel`'s worker for what the UDFs of `query` wrote since the last ask.
pub(crate) async fn fetch_udf_output(
    channel: BoxCloneSyncChannel,
    query: uuid::Uuid,
) -> Result<UdfOutputResponse, tonic::Status> {
    let mut client = tonic::client::Grpc::new(channel);
    let request = UdfOutputRequest {
        query: query.as_bytes().to_vec(),
    };
    unary::<UdfOutputRequest, UdfOutputResponse>(&mut client, UDF_OUTPUT, request).await
}

/// Asks `channel`'s worker for the UDF figures of `query`.
pub(crate) async fn fetch_udf_figures(
    channel: BoxCloneSyncChannel,
    query: uuid::Uuid,
) -> Result<Vec<TaskUdfFigures>, tonic::Status> {
    let mut client = tonic::client::Grpc::new(channel);
    let request = UdfFiguresRequest {
        query: query.as_bytes().to_vec(),
    };
    unary::<UdfFiguresRequest, UdfFiguresResponse>(&mut client, UDF_FIGURES, request)
        .await
        .map(|reply| reply.figures)
}

impl tonic::server::NamedService for PayloadServer {
    const NAME: &'static str = PAYLOAD_SERVICE;
}

/// One unary method of [`PayloadServer`].
struct Unary<Req, Res> {
    server: PayloadServer,
    method: fn(&PayloadServer, Req) -> Result<Res, tonic::Status>,
}

impl<Req, Res> tonic::server::UnaryService<Req> for Unary<Req, Res>
where
    Req: Send + 'static,
    Res: Send + 'static,
{
    type Response = Res;
    type Future = BoxFuture<'static, Result<tonic::Response<Res>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<Req>) -> Self::Future {
        let answer = (self.method)(&self.server, request.into_inner()).map(tonic::Response::new);
        Box::pin(async move { answer })
    }
}

impl<B> tower::Service<http::Request<B>> for PayloadServer
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let server = self.clone();
        let limit = self.max_message_bytes;
        match request.uri().path() {
            HOLD => Box::pin(async move {
                let method = Unary {
                    server,
                    method: PayloadServer::hold,
                };
                Ok(grpc(limit).unary(method, request).await)
            }),
            PUT => Box::pin(async move {
                let method = Unary {
                    server,
                    method: PayloadServer::put,
                };
                Ok(grpc(limit).unary(method, request).await)
            }),
            UDF_FIGURES => Box::pin(async move {
                let method = Unary {
                    server,
                    method: PayloadServer::udf_figures,
                };
                Ok(grpc(limit).unary(method, request).await)
            }),
            UDF_OUTPUT => Box::pin(async move {
                let method = Unary {
                    server,
                    method: PayloadServer::udf_output,
                };
                Ok(grpc(limit).unary(method, request).await)
            }),
            _ => Box::pin(async move {
                Ok(
                    tonic::Status::unimplemented("no such method of the payload service")
                        .into_http(),
                )
            }),
        }
    }
}

fn grpc<Req, Res>(limit: usize) -> tonic::server::Grpc<tonic_prost::ProstCodec<Res, Req>>
where
    Req: Message + Default + Send + 'static,
    Res: Message + Send + 'static,
{
    tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
        .apply_max_message_size_config(Some(limit), Some(limit))
}

/// A large pickle a plan names by digest, and the frame that carries it.
#[derive(Debug, Clone)]
pub struct KeptPayload {
    pub name: String,
    pub digest: [u8; 32],
    pub frame: Bytes,
}

/// What a coordinator knows of one worker's payload store.
#[derive(Debug, Default)]
struct WorkerPayloads {
    incarnation: Vec<u8>,
    held: HashSet<[u8; 32]>,
    /// The query whose pickles were last confirmed held.
    checked_query: Vec<u8>,
}

/// What a [`PayloadTracker`] has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PayloadStats {
    /// `Hold` calls (at most one per worker and query with large pickles).
    pub checks: u64,
    /// Frames handed over with `Put`.
    pub pushed: u64,
    /// Bytes of those frames.
    pub pushed_bytes: u64,
    /// Large pickles a plan named by digest without sending them again.
    pub reused: u64,
}

/// The coordinator side: makes sure each worker holds the pickles a plan
/// names by digest (module docs).
#[derive(Debug, Default)]
pub struct PayloadTracker {
    workers: Mutex<HashMap<Url, Arc<tokio::sync::Mutex<WorkerPayloads>>>>,
    checks: AtomicU64,
    pushed: AtomicU64,
    pushed_bytes: AtomicU64,
    reused: AtomicU64,
}

impl PayloadTracker {
    pub fn stats(&self) -> PayloadStats {
        PayloadStats {
            checks: self.checks.load(Ordering::Relaxed),
            pushed: self.pushed.load(Ordering::Relaxed),
            pushed_bytes: self.pushed_bytes.load(Ordering::Relaxed),
            reused: self.reused.load(Ordering::Relaxed),
        }
    }

    /// Makes sure `worker` holds every payload of `needed` before a plan of
    /// `query` that names them is sent.
    pub(crate) async fn ensure(
        &self,
        worker: &Url,
        channel: BoxCloneSyncChannel,
        query: &[u8],
        needed: &[KeptPayload],
        max_message_bytes: usize,
    ) -> Result<()> {
        if needed.is_empty() {
            return Ok(());
        }
        let state = {
            let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(workers.entry(worker.clone()).or_default())
        };
        for payload in needed {
            // What a Put of this one frame takes on the wire, at most.
            let size = payload.frame.len() + payload.name.len() + 64;
            if size > max_message_bytes {
                return Err(DataFusionError::Plan(format!(
                    "{} the pickle of Python UDF '{}' for worker {worker} is {} bytes, above the \
                     message limit of {max_message_bytes} bytes (--max-message-bytes): capture \
                     less data in its closure (load it inside the function, or in a class \
                     UDF's __init__), or raise the limit on the coordinator and every worker",
                    ErrorKind::PayloadRefused.tag(),
                    payload.name,
                    payload.frame.len()
                )));
            }
        }
        let mut state = state.lock().await;
        if state.checked_query == query && needed.iter().all(|p| state.held.contains(&p.digest)) {
            self.reused
                .fetch_add(needed.len() as u64, Ordering::Relaxed);
            return Ok(());
        }
        let failed = |what: &str, status: tonic::Status| {
            DataFusionError::Execution(format!(
                "{} cannot hand worker {worker} the pickles of the Python UDFs its plan names \
                 ({what}: {}); check that the worker runs the same dfship version and accepts \
                 this coordinator (cluster key, TLS)",
                ErrorKind::WorkerLost.tag(),
                status.message()
            ))
        };
        let mut client = tonic::client::Grpc::new(channel);
        self.checks.fetch_add(1, Ordering::Relaxed);
        let digests = needed.iter().map(|p| p.digest.to_vec()).collect();
        let answer = unary::<HoldRequest, HoldResponse>(&mut client, HOLD, HoldRequest { digests })
            .await
            .map_err(|status| failed("Hold", status))?;
        if answer.incarnation != state.incarnation {
            // A worker we have not seen, or one that restarted: it holds
            // nothing we know of.
            state.incarnation = answer.incarnation;
            state.held.clear();
        }
        let missing: HashSet<Vec<u8>> = answer.missing.into_iter().collect();
        for payload in needed {
            if missing.contains(payload.digest.as_slice()) {
                state.held.remove(&payload.digest);
            } else {
                state.held.insert(payload.digest);
            }
        }
        let mut batch: Vec<Payload> = Vec::new();
        let mut batch_bytes = 0;
        let mut sent = HashSet::new();
        for payload in needed {
            if state.held.contains(&payload.digest) || !sent.insert(payload.digest) {
                continue;
            }
            let size = payload.frame.len() + payload.name.len() + 64;
            if !batch.is_empty() && batch_bytes + size > max_message_bytes {
                self.put(&mut client, std::mem::take(&mut batch), &failed)
                    .await?;
                batch_bytes = 0;
            }
            batch.push(Payload {
                name: payload.name.clone(),
                frame: payload.frame.clone(),
            });
            batch_bytes += size;
            self.pushed.fetch_add(1, Ordering::Relaxed);
            self.pushed_bytes
                .fetch_add(payload.frame.len() as u64, Ordering::Relaxed);
        }
        if !batch.is_empty() {
            self.put(&mut client, batch, &failed).await?;
        }
        self.reused.fetch_add(
            needed.len().saturating_sub(sent.len()) as u64,
            Ordering::Relaxed,
        );
        state.held.extend(needed.iter().map(|p| p.digest));
        state.checked_query = query.to_vec();
        Ok(())
    }

    async fn put(
        &self,
        client: &mut tonic::client::Grpc<BoxCloneSyncChannel>,
        payloads: Vec<Payload>,
        failed: &impl Fn(&str, tonic::Status) -> DataFusionError,
    ) -> Result<()> {
        unary::<PutRequest, PutResponse>(client, PUT, PutRequest { payloads })
            .await
            .map(|_| ())
            .map_err(|status| failed("Put", status))
    }
}

async fn unary<Req, Res>(
    client: &mut tonic::client::Grpc<BoxCloneSyncChannel>,
    path: &'static str,
    request: Req,
) -> Result<Res, tonic::Status>
where
    Req: Message + Send + Sync + 'static,
    Res: Message + Default + Send + Sync + 'static,
{
    client
        .ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("the connection is not ready: {e}")))?;
    let codec = tonic_prost::ProstCodec::<Req, Res>::default();
    client
        .unary(
            tonic::Request::new(request),
            http::uri::PathAndQuery::from_static(path),
            codec,
        )
        .await
        .map(tonic::Response::into_inner)
}
