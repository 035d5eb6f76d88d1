//! Log lines that name their query: the coordinator's channel tags every
//! `CoordinatorChannel` and `ExecuteTask` request with [`QUERY_HEADER`]
//! (`<query id>/<stage>/<task>`, from the request's task key), and
//! [`QuerySpanLayer`], around a worker's gRPC service, runs each such
//! request inside a `query` span with those fields, so every line the
//! request's handling logs carries them (`--log-format json` writes the
//! spans on each line). Work upstream moves to tasks of its own and lines
//! logged while a response streams are outside the span.

use std::task::{Context, Poll};

use datafusion_distributed::TaskKey;
use tower::{Layer, Service};
use tracing::instrument::Instrumented;
use tracing::Instrument;

/// The gRPC metadata key naming the query, stage and task of a request.
pub const QUERY_HEADER: &str = "dfship-query";

/// The [`QUERY_HEADER`] value of a task.
pub(crate) fn query_header(key: &TaskKey) -> Option<http::HeaderValue> {
    http::HeaderValue::from_str(&format!(
        "{}/{}/{}",
        key.query_id, key.stage_id, key.task_number
    ))
    .ok()
}

/// `(query id, stage, task)` of a header value, if it is one: anything else
/// (from an old or hostile peer) is ignored, never logged.
pub(crate) fn parse(value: &http::HeaderValue) -> Option<(uuid::Uuid, u64, u64)> {
    let text = value.to_str().ok().filter(|t| t.len() <= 80)?;
    let mut parts = text.split('/');
    let query = uuid::Uuid::parse_str(parts.next()?).ok()?;
    let stage = parts.next()?.parse().ok()?;
    let task = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((query, stage, task))
}

/// Runs each request that names its query inside a `query` span.
#[derive(Debug, Clone, Copy, Default)]
pub struct QuerySpanLayer;

impl<S> Layer<S> for QuerySpanLayer {
    type Service = QuerySpan<S>;

    fn layer(&self, inner: S) -> Self::Service {
        QuerySpan { inner }
    }
}

#[derive(Debug, Clone)]
pub struct QuerySpan<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for QuerySpan<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let span = match request.headers().get(QUERY_HEADER).and_then(parse) {
            Some((query, stage, task)) => tracing::info_span!(
                "query",
                query_id = %query,
                stage,
                task,
                method = request.uri().path()
            ),
            None => tracing::Span::none(),
        };
        let _entered = span.enter();
        tracing::debug!("request received");
        drop(_entered);
        self.inner.call(request).instrument(span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_query_headers_are_read() {
        let key = TaskKey {
            query_id: uuid::Uuid::new_v4(),
            stage_id: 3,
            task_number: 1,
        };
        let value = query_header(&key).unwrap();
        assert_eq!(parse(&value), Some((key.query_id, 3, 1)));
        for bad in [
            "",
            "not-a-uuid/1/2",
            &format!("{}/1", key.query_id),
            &format!("{}/1/2/3", key.query_id),
            &format!("{}/x/2", key.query_id),
            &"a".repeat(200),
        ] {
            let header = http::HeaderValue::from_str(bad).unwrap();
            assert_eq!(parse(&header), None, "{bad:?}");
        }
    }
}
