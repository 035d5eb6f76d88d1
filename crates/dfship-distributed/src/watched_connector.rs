//! A TCP connector that tells its channel's owner when the connection it
//! made has closed.
//!
//! A tonic `Channel` reconnects by itself, and that is the trouble: its
//! `Reconnect` service (tonic 0.14, `transport/channel/service/reconnect.rs`)
//! connects again only when a request is waiting, and when that attempt
//! fails it *stores* the error and hands it to the next request it is
//! given. If the request that caused the attempt was cancelled meanwhile
//! (its query failed because the peer was down), the error waits in the
//! channel and fails the first request of a later query, long after the
//! peer came back (seen as "tcp connect error … Connection refused" for a
//! worker that was up). A query with a volatile UDF cannot be retried, so
//! that stale error failed it.
//!
//! [`InlineUdfChannelResolver`](crate::InlineUdfChannelResolver) therefore
//! never lets a channel reconnect across queries: the connection made here
//! raises [`WatchedConnector::closed`] when hyper drops it (the peer closed
//! it, died, or the HTTP/2 connection failed), and the resolver then makes
//! a fresh channel, which also asks the endpoint who it is again.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Makes TCP connections with the settings tonic's own connector uses, and
/// raises one shared flag when any connection it made is dropped.
#[derive(Clone)]
pub(crate) struct WatchedConnector {
    http: HttpConnector,
    closed: Arc<AtomicBool>,
}

impl WatchedConnector {
    /// A connector with TCP keepalive every `keepalive` and no Nagle delay
    /// (tonic's defaults; the connect timeout is the endpoint's).
    pub(crate) fn new(keepalive: Duration) -> Self {
        let mut http = HttpConnector::new();
        // The scheme is tonic's business (it adds TLS for https).
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_keepalive(Some(keepalive));
        Self {
            http,
            closed: Arc::default(),
        }
    }

    /// Raised once a connection this connector made has closed.
    pub(crate) fn closed(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.closed)
    }
}

impl tower::Service<http::Uri> for WatchedConnector {
    type Response = Watched;
    type Error = <HttpConnector as tower::Service<http::Uri>>::Error;
    type Future = BoxFuture<'static, Result<Watched, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.http, cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connect = tower::Service::call(&mut self.http, uri);
        let closed = Arc::clone(&self.closed);
        Box::pin(async move {
            let io = connect.await?;
            Ok(Watched { io, closed })
        })
    }
}

/// A connection that raises its connector's flag when dropped or failed.
pub(crate) struct Watched {
    io: TokioIo<TcpStream>,
    closed: Arc<AtomicBool>,
}

impl Watched {
    fn noted<T>(&self, poll: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if let Poll::Ready(Err(_)) = &poll {
            self.closed.store(true, Ordering::Release);
        }
        poll
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
    }
}

impl Read for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_read(cx, buf);
        self.noted(poll)
    }
}

impl Write for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.noted(poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        self.noted(poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.closed.store(true, Ordering::Release);
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.noted(poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn the_flag_rises_when_the_connection_is_dropped_and_not_before() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: http::Uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let connector = WatchedConnector::new(Duration::from_secs(5));
        let closed = connector.closed();
        let io = connector.oneshot(uri).await.unwrap();
        let _accepted = listener.accept().await.unwrap();
        assert!(!closed.load(Ordering::Acquire), "open connection flagged");
        drop(io);
        assert!(
            closed.load(Ordering::Acquire),
            "closed connection not flagged"
        );
    }
}
