//! Stopping a task's Python calls when its query ends.
//!
//! DataFusion calls a scalar UDF synchronously inside a stream's poll, so a
//! cancelled query cannot interrupt a Python call by dropping that stream:
//! the drop waits for the poll to return. What does end at once is the
//! task's coordinator channel: datafusion-distributed's coordinator keeps a
//! request stream open to each worker for each task for the whole query
//! (`Worker::coordinator_channel` reads it until end of stream), and closes
//! it when the query ends, normally or not.
//!
//! So the coordinator's channel ([`crate::InlineUdfChannel`]) tags each
//! task's `CoordinatorChannel` request with a fresh id ([`TASK_ID_HEADER`]);
//! the worker's session builder puts that id into the task's config
//! (`dfship.task_id`, which every UDF call sees); and
//! [`TaskLifetimeLayer`], around the worker's gRPC service, ends the task
//! (`dfship_codec::end_task`) when that request stream ends, fails or is
//! dropped — which kills the runners still evaluating the task's calls.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tower::{Layer, Service};

/// The gRPC metadata key that carries a task's id from coordinator to worker.
pub const TASK_ID_HEADER: &str = "dfship-task-id";

const COORDINATOR_CHANNEL: &str = "/worker.WorkerService/CoordinatorChannel";

/// Ends a task when the coordinator's request stream for it ends.
#[derive(Debug, Clone, Copy, Default)]
pub struct TaskLifetimeLayer;

impl<S> Layer<S> for TaskLifetimeLayer {
    type Service = TaskLifetime<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TaskLifetime { inner }
    }
}

/// The service [`TaskLifetimeLayer`] makes.
#[derive(Debug, Clone)]
pub struct TaskLifetime<S> {
    inner: S,
}

impl<S> Service<http::Request<tonic::body::Body>> for TaskLifetime<S>
where
    S: Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let task = (request.uri().path() == COORDINATOR_CHANNEL)
            .then(|| request.headers().get(TASK_ID_HEADER))
            .flatten()
            .and_then(|value| value.to_str().ok())
            .filter(|id| !id.is_empty() && id.len() <= 64)
            .map(str::to_string);
        let request = match task {
            Some(id) => request.map(|body| on_close(body, move || dfship_codec::end_task(&id))),
            None => request,
        };
        self.inner.call(request)
    }
}

/// `body`, calling `done` once when it ends, fails or is dropped.
pub(crate) fn on_close(
    body: tonic::body::Body,
    done: impl FnOnce() + Send + Sync + 'static,
) -> tonic::body::Body {
    tonic::body::Body::new(OnClose {
        inner: body,
        done: Some(Box::new(done)),
    })
}

/// A request body that runs a callback when it ends, fails or is dropped.
struct OnClose {
    inner: tonic::body::Body,
    done: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl OnClose {
    fn end(&mut self) {
        if let Some(done) = self.done.take() {
            done();
        }
    }
}

impl Drop for OnClose {
    fn drop(&mut self) {
        self.end();
    }
}

impl Body for OnClose {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.end();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
