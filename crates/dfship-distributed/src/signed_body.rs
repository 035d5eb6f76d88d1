//! Message tags in request bodies (see `crate::rpc_auth` for the scheme).
//!
//! A gRPC body is a sequence of messages, each behind a 5-byte prefix
//! (compression flag, big-endian u32 length). The client side appends a
//! 32-byte tag to every message and adds 32 to its length; the worker side
//! checks and removes the tag before tonic sees the message, and fails the
//! body at the first message whose tag is wrong or missing, before that
//! message is buffered beyond the worker's message size limit.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use dfship_codec::{ClusterKey, ErrorKind};
use http_body::{Body, Frame, SizeHint};

/// The length of a message tag.
pub const TAG_LEN: usize = 32;
const PREFIX_LEN: usize = 5;

/// What a message tag covers: a fixed prefix, its request's nonce, its
/// place in the body, its gRPC prefix and the message.
fn covered<'a>(
    nonce: &'a [u8; 16],
    index: &'a [u8; 8],
    prefix: &'a [u8],
    message: &'a [u8],
) -> [&'a [u8]; 5] {
    [b"dfship-frame\nv2\n", nonce, index, prefix, message]
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Appends tags (a client's request body).
    Sign,
    /// Checks and removes them (a worker's request body); messages of at
    /// most this many bytes.
    Verify { limit: usize },
}

/// A request body whose messages are tagged (client) or checked (worker).
pub(crate) struct TaggedBody {
    inner: tonic::body::Body,
    key: Arc<ClusterKey>,
    nonce: [u8; 16],
    side: Side,
    /// Bytes of an incomplete message.
    pending: BytesMut,
    index: u64,
    failed: bool,
}

/// `body` with a tag after each message, for the request `nonce` belongs to.
pub(crate) fn sign(
    body: tonic::body::Body,
    key: Arc<ClusterKey>,
    nonce: [u8; 16],
) -> tonic::body::Body {
    tonic::body::Body::new(TaggedBody::new(body, key, nonce, Side::Sign))
}

/// `body` checked message by message, tags removed; messages above `limit`
/// bytes fail it.
pub(crate) fn verify(
    body: tonic::body::Body,
    key: Arc<ClusterKey>,
    nonce: [u8; 16],
    limit: usize,
) -> tonic::body::Body {
    tonic::body::Body::new(TaggedBody::new(body, key, nonce, Side::Verify { limit }))
}

fn refused(why: String) -> tonic::Status {
    tonic::Status::unauthenticated(format!("{} {why}", ErrorKind::Unauthenticated.tag()))
}

impl TaggedBody {
    fn new(inner: tonic::body::Body, key: Arc<ClusterKey>, nonce: [u8; 16], side: Side) -> Self {
        Self {
            inner,
            key,
            nonce,
            side,
            pending: BytesMut::new(),
            index: 0,
            failed: false,
        }
    }

    /// The next complete message out of `pending`, tagged or checked.
    fn next_message(&mut self) -> Result<Option<Bytes>, tonic::Status> {
        if self.pending.len() < PREFIX_LEN {
            return Ok(None);
        }
        let length = u32::from_be_bytes([
            self.pending[1],
            self.pending[2],
            self.pending[3],
            self.pending[4],
        ]) as usize;
        if let Side::Verify { limit } = self.side {
            if length < TAG_LEN {
                return Err(refused(format!(
                    "message {} of the request carries no tag of the cluster key (it is {length} \
                     bytes); only a dfship client of the same version can call this worker",
                    self.index
                )));
            }
            if length - TAG_LEN > limit {
                return Err(tonic::Status::resource_exhausted(format!(
                    "a request message of {} bytes, above this worker's limit of {limit} bytes \
                     (--max-message-bytes)",
                    length - TAG_LEN
                )));
            }
        }
        if self.pending.len() < PREFIX_LEN + length {
            return Ok(None);
        }
        // The message with its prefix, taken out of `pending` without a copy.
        let mut framed = self.pending.split_to(PREFIX_LEN + length);
        let index = self.index;
        let place = index.to_le_bytes();
        self.index += 1;
        match self.side {
            Side::Sign => {
                let tag = self.key.sign(&covered(
                    &self.nonce,
                    &place,
                    &framed[..PREFIX_LEN],
                    &framed[PREFIX_LEN..],
                ));
                framed[1..PREFIX_LEN].copy_from_slice(&((length + TAG_LEN) as u32).to_be_bytes());
                framed.extend_from_slice(&tag);
                Ok(Some(framed.freeze()))
            }
            Side::Verify { .. } => {
                let carried = framed.split_off(PREFIX_LEN + length - TAG_LEN);
                framed[1..PREFIX_LEN].copy_from_slice(&((length - TAG_LEN) as u32).to_be_bytes());
                // (`ClusterKey::verify` compares in constant time.)
                let parts = covered(
                    &self.nonce,
                    &place,
                    &framed[..PREFIX_LEN],
                    &framed[PREFIX_LEN..],
                );
                if !self.key.verify(&parts, &carried) {
                    return Err(refused(format!(
                        "message {index} of the request does not match the proof of its request: \
                         a body altered in flight or taken from another request"
                    )));
                }
                // The message as the client framed it, verified in place.
                Ok(Some(framed.freeze()))
            }
        }
    }
}

impl Body for TaggedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        loop {
            if this.failed {
                return Poll::Ready(None);
            }
            match this.next_message() {
                Ok(Some(message)) => return Poll::Ready(Some(Ok(Frame::data(message)))),
                Ok(None) => {}
                Err(status) => {
                    this.failed = true;
                    return Poll::Ready(Some(Err(status)));
                }
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => this.pending.extend_from_slice(&data),
                    Err(trailers) => {
                        if !this.pending.is_empty() {
                            this.failed = true;
                            return Poll::Ready(Some(Err(refused(
                                "the request ended inside a message".to_string(),
                            ))));
                        }
                        return Poll::Ready(Some(Ok(trailers)));
                    }
                },
                Poll::Ready(Some(Err(error))) => {
                    this.failed = true;
                    return Poll::Ready(Some(Err(error)));
                }
                Poll::Ready(None) => {
                    if !this.pending.is_empty() {
                        this.failed = true;
                        return Poll::Ready(Some(Err(refused(
                            "the request ended inside a message".to_string(),
                        ))));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || (self.pending.is_empty() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// A gRPC reply of one empty message and status OK, with `headers`.
pub(crate) fn empty_reply(headers: http::HeaderMap) -> http::Response<tonic::body::Body> {
    let mut response = http::Response::new(empty_message(true));
    *response.headers_mut() = headers;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// A body of one empty gRPC message; with `status_ok`, then the trailers
/// of a reply that succeeded.
pub(crate) fn empty_message(status_ok: bool) -> tonic::body::Body {
    tonic::body::Body::new(EmptyMessage {
        message: true,
        trailers: status_ok,
    })
}

struct EmptyMessage {
    message: bool,
    trailers: bool,
}

impl Body for EmptyMessage {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if std::mem::take(&mut self.message) {
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&[0; 5])))));
        }
        if std::mem::take(&mut self.trailers) {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        !self.message && !self.trailers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Arc<ClusterKey> {
        Arc::new(ClusterKey::new(vec![7; 32]).unwrap())
    }

    fn prefix(flag: u8, length: usize) -> [u8; PREFIX_LEN] {
        let length = (length as u32).to_be_bytes();
        [flag, length[0], length[1], length[2], length[3]]
    }

    fn message(length: usize, fill: u8) -> Vec<u8> {
        let mut out = prefix(0, length).to_vec();
        out.extend(std::iter::repeat_n(fill, length));
        out
    }

    /// Runs `bytes`, in chunks of `chunk`, through one side; the bytes out or the error.
    fn run(side: Side, nonce: [u8; 16], bytes: &[u8], chunk: usize) -> Result<Vec<u8>, String> {
        let mut body = TaggedBody::new(tonic::body::Body::empty(), key(), nonce, side);
        let mut out = Vec::new();
        for piece in bytes.chunks(chunk) {
            body.pending.extend_from_slice(piece);
            while let Some(message) = body.next_message().map_err(|s| s.message().to_string())? {
                out.extend_from_slice(&message);
            }
        }
        if !body.pending.is_empty() {
            return Err("ended inside a message".to_string());
        }
        Ok(out)
    }

    #[test]
    fn tagged_messages_come_out_as_they_went_in_whatever_the_chunking() {
        let mut stream = message(0, 0);
        stream.extend(message(300, 1));
        stream.extend(message(7, 2));
        for chunk in [1, 3, 5, 37, 1000] {
            let signed = run(Side::Sign, [1; 16], &stream, chunk).unwrap();
            assert_eq!(signed.len(), stream.len() + 3 * TAG_LEN);
            let back = run(Side::Verify { limit: 1000 }, [1; 16], &signed, chunk).unwrap();
            assert_eq!(back, stream, "chunk {chunk}");
        }
    }

    #[test]
    fn altered_reordered_foreign_untagged_and_oversized_messages_are_refused() {
        let mut stream = message(10, 1);
        stream.extend(message(10, 2));
        let signed = run(Side::Sign, [1; 16], &stream, 1000).unwrap();
        let verify = |bytes: &[u8], nonce| run(Side::Verify { limit: 100 }, nonce, bytes, 1000);
        let mut altered = signed.clone();
        altered[7] ^= 1;
        assert!(verify(&altered, [1; 16]).unwrap_err().contains("message 0"));
        let one = PREFIX_LEN + 10 + TAG_LEN;
        let mut swapped = signed[one..].to_vec();
        swapped.extend_from_slice(&signed[..one]);
        assert!(verify(&swapped, [1; 16])
            .unwrap_err()
            .contains("does not match"));
        assert!(verify(&signed, [2; 16])
            .unwrap_err()
            .contains("another request"));
        assert!(verify(&stream, [1; 16]).unwrap_err().contains("no tag"));
        let big = run(Side::Sign, [1; 16], &message(101, 0), 1000).unwrap();
        // Refused at its prefix, before the message is buffered.
        assert!(verify(&big[..PREFIX_LEN], [1; 16])
            .unwrap_err()
            .contains("above this worker's limit"));
    }
}
