//! Graceful drain of a worker: stop taking new work, finish what runs, exit.
//!
//! A draining worker answers the coordinators' probe (`GetWorkerInfo`) with
//! `UNAVAILABLE: draining`, so each coordinator stops planning on it within
//! one probe interval (`crate::Membership` counts it down, with that cause).
//! Meanwhile it still serves everything it is sent: tasks of queries planned
//! before a coordinator noticed arrive and run. After the notice period it
//! waits until no task is open (each task holds its coordinator channel open
//! for the life of its query), bounded by the drain timeout, and only then
//! closes its server. A rolling restart of every worker therefore fails no
//! query and needs no retry, as long as the coordinators probe more often
//! than the notice period.
//!
//! "Draining" is one notion: the same state answers the probe of
//! coordinators and a readiness check.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt};
use tower::{Layer, Service};

const COORDINATOR_CHANNEL: &str = "/worker.WorkerService/CoordinatorChannel";
const GET_WORKER_INFO: &str = "/worker.WorkerService/GetWorkerInfo";

/// The drain state of one worker server; clones share it.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    inner: Arc<DrainInner>,
}

#[derive(Debug, Default)]
struct DrainInner {
    draining: AtomicBool,
    open_tasks: AtomicUsize,
    tasks_started: std::sync::atomic::AtomicU64,
    changed: tokio::sync::Notify,
}

/// How a worker drains.
#[derive(Debug, Clone)]
pub struct DrainOptions {
    /// How long the worker keeps taking tasks after it starts to drain, so
    /// that every coordinator's probe sees it draining first.
    pub notice: Duration,
    /// The longest the worker waits for open tasks before it stops anyway.
    pub timeout: Duration,
}

impl Default for DrainOptions {
    /// 3 s notice (coordinators probe every 2 s by default), 60 s timeout.
    fn default() -> Self {
        Self {
            notice: Duration::from_secs(3),
            timeout: Duration::from_secs(60),
        }
    }
}

impl Drain {
    /// From now on, probes are answered "draining".
    pub fn begin(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
        self.inner.changed.notify_waiters();
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// Tasks whose query has not ended yet.
    pub fn open_tasks(&self) -> usize {
        self.inner.open_tasks.load(Ordering::SeqCst)
    }

    /// Drains: notice period, then until no task is open or `options.timeout`
    /// has passed since the start. Returns the tasks still open.
    pub async fn run(&self, options: &DrainOptions) -> usize {
        self.begin();
        let started = tokio::time::Instant::now();
        tracing::info!(
            open_tasks = self.open_tasks(),
            notice = ?options.notice,
            timeout = ?options.timeout,
            "draining: coordinators are told to plan elsewhere; open tasks run to their end"
        );
        tokio::time::sleep(options.notice.min(options.timeout)).await;
        let deadline = started + options.timeout;
        loop {
            let changed = self.inner.changed.notified();
            let open = self.open_tasks();
            if open == 0 {
                tracing::info!(took = ?started.elapsed(), "drained: no task open");
                return 0;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                let open = self.open_tasks();
                tracing::warn!(
                    open_tasks = open,
                    "drain timeout: stopping with tasks still open (--drain-timeout)"
                );
                return open;
            }
        }
    }

    /// Tasks this worker has taken since it started.
    pub fn tasks_started(&self) -> u64 {
        self.inner.tasks_started.load(Ordering::Relaxed)
    }

    fn task_opened(&self) -> TaskGuard {
        self.inner.open_tasks.fetch_add(1, Ordering::SeqCst);
        self.inner.tasks_started.fetch_add(1, Ordering::Relaxed);
        TaskGuard(Some(self.clone()))
    }
}

struct TaskGuard(Option<Drain>);

impl TaskGuard {
    fn close(&mut self) {
        if let Some(drain) = self.0.take() {
            drain.inner.open_tasks.fetch_sub(1, Ordering::SeqCst);
            drain.inner.changed.notify_waiters();
        }
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.close();
    }
}

/// Answers probes "draining" while draining, and counts open tasks.
#[derive(Debug, Clone)]
pub struct DrainLayer(pub Drain);

impl<S> Layer<S> for DrainLayer {
    type Service = DrainService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DrainService {
            inner,
            drain: self.0.clone(),
        }
    }
}

/// The service [`DrainLayer`] makes.
#[derive(Debug, Clone)]
pub struct DrainService<S> {
    inner: S,
    drain: Drain,
}

impl<S> Service<http::Request<tonic::body::Body>> for DrainService<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let path = request.uri().path();
        if path == GET_WORKER_INFO && self.drain.is_draining() {
            let status = tonic::Status::unavailable(
                "draining: this worker is shutting down and takes no new work; plan elsewhere",
            );
            return futures::future::ready(Ok(status.into_http())).boxed();
        }
        let request = if path == COORDINATOR_CHANNEL {
            let mut guard = self.drain.task_opened();
            request.map(|body| crate::task_lifetime::on_close(body, move || guard.close()))
        } else {
            request
        };
        self.inner.call(request).boxed()
    }
}
