//! The gRPC server of a worker: datafusion-distributed's `WorkerService`
//! with dfship's sessions, HTTP/2 keepalive, and the layers every worker
//! needs ([`crate::TaskLifetimeLayer`]). The `dfship-worker` binary and the
//! test clusters serve through this one function.

use std::future::Future;

use datafusion::error::{DataFusionError, Result};
use datafusion_distributed::Worker;
use tokio::net::TcpListener;

use std::sync::Arc;

use crate::channel::ChannelOptions;
use crate::drain::{Drain, DrainLayer};
use crate::payloads::PayloadServer;
use crate::rpc_auth::{RpcAuthLayer, RpcAuthenticator};
use crate::session::PythonWorkerSessionBuilder;
use crate::task_lifetime::TaskLifetimeLayer;

/// Streams one connection may have open at a time (HTTP/2
/// `SETTINGS_MAX_CONCURRENT_STREAMS`): a coordinator's connection carries
/// every task stream of its queries on this worker, so this is generous;
/// a client with more waits for a stream to end.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;

/// Serves a worker on `listener` until `shutdown` resolves: with the
/// builder's cluster key, every request must prove it ([`RpcAuthLayer`],
/// checked before anything is decoded); with its TLS settings, connections
/// are TLS (mutual when a CA is given); messages are bounded either way, and
/// connections are capped in all and per peer address, and closed when they
/// send no HTTP/2 preface in time (`crate::connection_limit`).
pub async fn serve_worker(
    builder: PythonWorkerSessionBuilder,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    serve_worker_with_drain(builder, listener, Drain::default(), shutdown).await
}

/// [`serve_worker`] whose probes and open tasks follow `drain` (see
/// `crate::Drain`): `shutdown` would typically run [`Drain::run`] first.
pub async fn serve_worker_with_drain(
    builder: PythonWorkerSessionBuilder,
    listener: TcpListener,
    drain: Drain,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let options: ChannelOptions = builder.inline().channel_options().clone();
    let local = listener.local_addr().ok();
    // The identity this worker proves to clients: its host name and port
    // (so it survives a restart in place, and differs between workers).
    let identity = format!(
        "{}:{}",
        host_name(),
        local.map_or(0, |address| address.port())
    );
    let auth = builder
        .codec()
        .options()
        .cluster_key()
        .map(|key| RpcAuthenticator::for_worker(key, &identity));
    let payloads = PayloadServer::new(Arc::clone(builder.codec()), options.max_message_bytes);
    let node = match local {
        Some(address) => format!("worker {address}"),
        None => "this worker".to_string(),
    };
    let runtime = crate::runtime_env_with_object_stores(builder.storage_options().clone(), node)?;
    let worker = Worker::from_session_builder(builder).with_runtime_env(runtime);
    // Task progress for coordinators (`GetTaskProgress`); this worker knows
    // no other workers, so `GetClusterWorkers` lists none.
    let observability = worker
        .with_observability_service(Arc::new(NoWorkers))
        .max_decoding_message_size(options.max_message_bytes)
        .max_encoding_message_size(options.max_message_bytes);
    // Pings detect a coordinator or peer that vanished without closing its
    // connection, so its tasks stop instead of waiting forever.
    let mut server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(options.keepalive_interval))
        .http2_keepalive_timeout(Some(options.keepalive_timeout))
        .http2_adaptive_window(Some(true))
        // tonic leaves hyper's stream limit unset (unlimited): one
        // connection could open any number of streams.
        .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS));
    if let Some(tls) = options.tls.as_ref().filter(|tls| tls.identity.is_some()) {
        let tls = tls.server()?.timeout(options.handshake_timeout);
        server = server.tls_config(tls).map_err(|e| {
            DataFusionError::Configuration(format!(
                "cannot set up TLS with --tls-cert/--tls-key: {e}; check that they are a PEM \
                 certificate and its private key"
            ))
        })?;
    }
    // Addresses whose requests proved the key keep a share of the slots
    // (`connection_limit`): without a key, no address becomes known.
    let known = crate::connection_limit::KnownPeers::default();
    let limits =
        crate::connection_limit::ConnectionLimits::new(options.max_connections, auth.is_some());
    server
        .layer(RpcAuthLayer::new(auth, options.max_message_bytes).with_known_peers(known.clone()))
        .layer(DrainLayer(drain))
        .layer(TaskLifetimeLayer)
        .layer(crate::QuerySpanLayer)
        .add_service(
            worker
                .into_worker_server()
                .max_decoding_message_size(options.max_message_bytes)
                .max_encoding_message_size(options.max_message_bytes),
        )
        .add_service(payloads)
        .add_service(observability)
        .serve_with_incoming_shutdown(
            crate::connection_limit::limited_incoming(listener, limits, known),
            shutdown,
        )
        .await
        .map_err(|e| DataFusionError::External(Box::new(e)))
}

/// The worker resolver of a worker's observability service: it lists no
/// workers (coordinators keep their own membership).
struct NoWorkers;

impl datafusion_distributed::WorkerResolver for NoWorkers {
    fn get_urls(&self) -> Result<Vec<url::Url>> {
        Ok(Vec::new())
    }
}

/// This host's name (the kernel's), or "localhost".
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_string())
}
