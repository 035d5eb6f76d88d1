//! The gRPC server of a worker: datafusion-distributed's `WorkerService`
//! with dfship's sessions, HTTP/2 keepalive, and the layers every worker
//! needs ([`crate::TaskLifetimeLayer`]). The `dfship-worker` binary and the
//! test clusters serve through this one function.

use std::future::Future;

use datafusion::error::{DataFusionError, Result};
use datafusion_distributed::Worker;
use tokio::net::TcpListener;

use crate::channel::ChannelOptions;
use crate::session::PythonWorkerSessionBuilder;
use crate::task_lifetime::TaskLifetimeLayer;

/// Serves a worker on `listener` until `shutdown` resolves.
pub async fn serve_worker(
    builder: PythonWorkerSessionBuilder,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let worker = Worker::from_session_builder(builder);
    // Pings detect a coordinator or peer that vanished without closing its
    // connection, so its tasks stop instead of waiting forever.
    let keepalive = ChannelOptions::default();
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(keepalive.keepalive_interval))
        .http2_keepalive_timeout(Some(keepalive.keepalive_timeout))
        .tcp_keepalive(Some(keepalive.keepalive_interval))
        .http2_adaptive_window(Some(true))
        .layer(TaskLifetimeLayer)
        .add_service(worker.into_worker_server())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
        .map_err(|e| DataFusionError::External(Box::new(e)))
}
