//! A bound on the size of each gRPC message a channel receives.
//!
//! datafusion-distributed 4.0 builds its gRPC client (and server) with no
//! message size limit (`usize::MAX`), and its client type is private. On the
//! server side dfship sets tonic's own limit; on the client side this layer
//! watches the response body's gRPC framing (a 5-byte prefix: compression
//! flag, big-endian u32 length) and fails the stream, before the message is
//! buffered, when one declares more than the limit.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use tower::Service;

/// A channel whose responses may hold messages of at most `limit` bytes.
#[derive(Debug, Clone)]
pub struct LimitedChannel<S> {
    inner: S,
    limit: usize,
}

impl<S> LimitedChannel<S> {
    pub fn new(inner: S, limit: usize) -> Self {
        Self { inner, limit }
    }
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for LimitedChannel<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let limit = self.limit;
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| {
                tonic::body::Body::new(LimitedBody {
                    inner: body,
                    limit,
                    header: Vec::with_capacity(5),
                    remaining: 0,
                    failed: false,
                })
            }))
        })
    }
}

/// Tracks the gRPC framing of a response body.
struct LimitedBody {
    inner: tonic::body::Body,
    limit: usize,
    /// The bytes of the current message prefix read so far.
    header: Vec<u8>,
    /// Bytes of the current message still to come.
    remaining: usize,
    failed: bool,
}

impl LimitedBody {
    /// Follows the framing through `data`; the size of a message that is too large.
    fn check(&mut self, mut data: &[u8]) -> Option<usize> {
        while !data.is_empty() {
            if self.remaining > 0 {
                let step = self.remaining.min(data.len());
                self.remaining -= step;
                data.advance(step);
                continue;
            }
            let need = 5 - self.header.len();
            let step = need.min(data.len());
            self.header.extend_from_slice(&data[..step]);
            data.advance(step);
            if self.header.len() == 5 {
                let length = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                self.header.clear();
                if length > self.limit {
                    return Some(length);
                }
                self.remaining = length;
            }
        }
        None
    }
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.failed {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let data = data.clone();
                if let Some(size) = self.check(&data) {
                    self.failed = true;
                    let limit = self.limit;
                    return Poll::Ready(Some(Err(tonic::Status::resource_exhausted(format!(
                        "a worker sent a message of {size} bytes, above this process's limit of \
                         {limit} bytes (--max-message-bytes); raise the limit on every process \
                         if such messages are expected"
                    )))));
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(limit: usize) -> LimitedBody {
        LimitedBody {
            inner: tonic::body::Body::empty(),
            limit,
            header: Vec::new(),
            remaining: 0,
            failed: false,
        }
    }

    fn message(length: u32) -> Vec<u8> {
        let mut out = vec![0u8];
        out.extend_from_slice(&length.to_be_bytes());
        out.extend(std::iter::repeat_n(7u8, length as usize));
        out
    }

    #[test]
    fn messages_within_the_limit_pass_in_any_chunking() {
        let mut stream = message(10);
        stream.extend(message(3));
        for chunk in [1usize, 2, 5, 7, 100] {
            let mut limited = body(10);
            for piece in stream.chunks(chunk) {
                assert_eq!(limited.check(piece), None, "chunk {chunk}");
            }
        }
    }

    #[test]
    fn a_message_above_the_limit_is_caught_at_its_prefix() {
        let mut stream = message(4);
        stream.extend(&message(11)[..5]);
        for chunk in [1usize, 3, 9] {
            let mut limited = body(10);
            let caught = stream.chunks(chunk).find_map(|piece| limited.check(piece));
            assert_eq!(caught, Some(11), "chunk {chunk}");
        }
    }
}
