//! A cap on a worker's open connections.
//!
//! tonic's server accepts every connection it is offered, and with TLS it
//! runs each handshake as a task of its own: nothing bounds how many sockets
//! a peer can hold open (idle, or never finishing its handshake) until the
//! process runs out of file descriptors. The worker accepts through this
//! stream instead: each connection holds a permit until it closes, and one
//! that finds none is closed at once (a client sees the connection reset and
//! its error says so; a coordinator treats the worker as unreachable and
//! retries). Accept errors (`EMFILE` among them) are logged and waited out,
//! never returned: tonic would stop serving on them.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The default cap on a worker's open connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

static REFUSED: AtomicU64 = AtomicU64::new(0);

/// Connections this process closed at once because it had `--max-connections` open.
pub fn refused_connections() -> u64 {
    REFUSED.load(Ordering::Relaxed)
}

/// An accepted connection, counted until it closes.
pub struct CountedConnection {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

/// The connections `listener` accepts, at most `max` open at a time.
pub fn limited_incoming(
    listener: TcpListener,
    max: usize,
) -> impl Stream<Item = io::Result<CountedConnection>> {
    let permits = Arc::new(Semaphore::new(max.max(1)));
    let state = (listener, permits, None::<Instant>);
    futures::stream::unfold(state, move |(listener, permits, mut warned)| async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection failed; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match Arc::clone(&permits).try_acquire_owned() {
                Ok(permit) => {
                    let _ = stream.set_nodelay(true);
                    let connection = CountedConnection {
                        stream,
                        _permit: permit,
                    };
                    return Some((Ok(connection), (listener, permits, warned)));
                }
                Err(_) => {
                    drop(stream);
                    let refused = REFUSED.fetch_add(1, Ordering::Relaxed) + 1;
                    let now = Instant::now();
                    if warned.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1)) {
                        warned = Some(now);
                        tracing::warn!(
                            %peer,
                            refused_total = refused,
                            "closed a new connection: {max} connections are open \
                             (--max-connections); raise it if so many clients are expected"
                        );
                    }
                }
            }
        }
    })
}

impl Connected for CountedConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for CountedConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
