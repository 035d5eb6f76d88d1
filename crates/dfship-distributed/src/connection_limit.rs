//! Caps on a worker's open connections, per peer and in all.
//!
//! tonic's server accepts every connection it is offered, and with TLS it
//! runs each handshake as a task of its own: nothing bounds how many sockets
//! a peer can hold open (idle, or never finishing its handshake) until the
//! process runs out of file descriptors. The worker accepts through this
//! stream instead, which keeps four rules:
//!
//! - **In all**: at most `--max-connections` connections are open
//!   ([`DEFAULT_MAX_CONNECTIONS`]).
//! - **Per peer**: one peer address holds at most
//!   [`MAX_CONNECTIONS_PER_IP`] of them (an IPv6 peer is counted by its /64,
//!   which one host usually owns whole; loopback addresses count like any
//!   other), so one host cannot take every slot.
//! - **Reserved for known peers**: on a keyed worker, the last quarter of
//!   the slots ([`reserved_for_known_peers`]) goes only to addresses that
//!   made an authenticated request within [`KNOWN_PEER_TTL`] (a coordinator
//!   or worker of the cluster), so many hosts together still leave room for
//!   the cluster's own processes.
//! - **Speak first**: a connection that has not sent the 24 bytes of the
//!   HTTP/2 client preface (with TLS: of its handshake) within
//!   [`PREFACE_TIMEOUT`] is closed.
//!
//! A connection over a cap is closed at once (a client sees the connection
//! reset and its error says so; a coordinator treats the worker as
//! unreachable and retries); each refusal is counted in `/metrics`. Accept
//! errors (`EMFILE` among them) are logged and waited out (100 ms), never
//! returned: tonic would stop serving on them.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The default cap on a worker's open connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Connections one peer address (an IPv6 /64) may hold open at a time.
pub const MAX_CONNECTIONS_PER_IP: usize = 64;

/// How long a new connection may take to send the HTTP/2 client preface
/// (or the first bytes of its TLS handshake) before it is closed.
pub const PREFACE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an address that made an authenticated request counts as a
/// known peer (for the slots kept for known peers).
pub const KNOWN_PEER_TTL: Duration = Duration::from_secs(600);

/// Peer addresses remembered at most, in each table (known peers, Hello
/// rate limits); the least recently seen are forgotten first.
pub const MAX_TRACKED_PEERS: usize = 4096;

/// The bytes of the HTTP/2 client preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`);
/// a TLS ClientHello is longer.
const PREFACE_BYTES: usize = 24;

/// The slots of `max` kept for known peers on a keyed worker: a quarter.
pub fn reserved_for_known_peers(max: usize) -> usize {
    max / 4
}

static REFUSED: AtomicU64 = AtomicU64::new(0);
static REFUSED_PER_IP: AtomicU64 = AtomicU64::new(0);
static PREFACE_TIMEOUTS: AtomicU64 = AtomicU64::new(0);

/// Connections this process closed at once because it had `--max-connections`
/// open (or all those not kept for known peers).
pub fn refused_connections() -> u64 {
    REFUSED.load(Ordering::Relaxed)
}

/// Connections this process closed at once because their peer address
/// already held [`MAX_CONNECTIONS_PER_IP`].
pub fn refused_connections_per_ip() -> u64 {
    REFUSED_PER_IP.load(Ordering::Relaxed)
}

/// Connections this process closed because they sent no HTTP/2 preface (or
/// TLS handshake) within [`PREFACE_TIMEOUT`].
pub fn preface_timeouts() -> u64 {
    PREFACE_TIMEOUTS.load(Ordering::Relaxed)
}

/// What limits are counted by: an IPv4 address (IPv4-mapped IPv6 ones
/// included), or the /64 of an IPv6 address.
pub(crate) fn peer_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// Values kept per peer address, at most `limit` of them: when full, the
/// least recently touched quarter is forgotten (O(1) amortised per entry).
#[derive(Debug)]
pub(crate) struct PeerTable<V> {
    entries: HashMap<IpAddr, (Instant, V)>,
    limit: usize,
}

impl<V> PeerTable<V> {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            entries: HashMap::new(),
            limit: limit.max(1),
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The value of `key`, if it is tracked, and when it was last touched.
    pub(crate) fn get(&self, key: &IpAddr) -> Option<&(Instant, V)> {
        self.entries.get(key)
    }

    /// The value of `key`, made with `make` if it is not tracked, touched at `now`.
    pub(crate) fn touch(&mut self, key: IpAddr, now: Instant, make: impl FnOnce() -> V) -> &mut V {
        if !self.entries.contains_key(&key) && self.entries.len() >= self.limit {
            self.evict_oldest_quarter();
        }
        let entry = self.entries.entry(key).or_insert_with(|| (now, make()));
        entry.0 = now;
        &mut entry.1
    }

    fn evict_oldest_quarter(&mut self) {
        let mut times: Vec<Instant> = self.entries.values().map(|(at, _)| *at).collect();
        let cut = (times.len() / 4).max(1).min(times.len()) - 1;
        let (_, cutoff, _) = times.select_nth_unstable(cut);
        let cutoff = *cutoff;
        self.entries.retain(|_, (at, _)| *at > cutoff);
    }
}

/// Addresses (by [`peer_key`]) that made an authenticated request within
/// [`KNOWN_PEER_TTL`], shared by a worker's auth layer (which marks them)
/// and its connection caps (which keep slots for them).
#[derive(Debug, Clone)]
pub struct KnownPeers(Arc<Mutex<PeerTable<()>>>);

impl Default for KnownPeers {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(PeerTable::new(MAX_TRACKED_PEERS))))
    }
}

impl KnownPeers {
    /// Records that `ip` made an authenticated request now.
    pub fn mark(&self, ip: IpAddr) {
        let mut table = self.0.lock().unwrap_or_else(|p| p.into_inner());
        table.touch(peer_key(ip), Instant::now(), || ());
    }

    /// Whether `ip` made an authenticated request within [`KNOWN_PEER_TTL`].
    pub fn contains(&self, ip: IpAddr) -> bool {
        let table = self.0.lock().unwrap_or_else(|p| p.into_inner());
        table
            .get(&peer_key(ip))
            .is_some_and(|(at, _)| at.elapsed() < KNOWN_PEER_TTL)
    }
}

/// The caps [`limited_incoming`] keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at most (`--max-connections`).
    pub max: usize,
    /// Connections one peer address may hold.
    pub per_ip: usize,
    /// Of `max`, the slots only known peers may take.
    pub reserved_for_known: usize,
    /// How long a connection may take to send its first 24 bytes.
    pub preface_timeout: Duration,
}

impl ConnectionLimits {
    /// `max` in all, the defaults otherwise; with `keyed`, a quarter of
    /// `max` kept for known peers (without a key no peer becomes known).
    pub fn new(max: usize, keyed: bool) -> Self {
        let max = max.max(1);
        Self {
            max,
            per_ip: MAX_CONNECTIONS_PER_IP,
            reserved_for_known: if keyed {
                reserved_for_known_peers(max)
            } else {
                0
            },
            preface_timeout: PREFACE_TIMEOUT,
        }
    }
}

/// Why a connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    PerIp,
    Full,
}

/// The connections open now, in all and per peer key.
#[derive(Debug, Default)]
struct OpenConnections {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

impl OpenConnections {
    /// Counts a new connection from `key`, or says which cap it is over.
    fn admit(
        &mut self,
        key: IpAddr,
        known: bool,
        limits: &ConnectionLimits,
    ) -> Result<(), Refusal> {
        let of_peer = self.per_peer.get(&key).copied().unwrap_or(0);
        if of_peer >= limits.per_ip {
            return Err(Refusal::PerIp);
        }
        let cap = if known {
            limits.max
        } else {
            limits.max.saturating_sub(limits.reserved_for_known).max(1)
        };
        if self.total >= cap {
            return Err(Refusal::Full);
        }
        self.total += 1;
        *self.per_peer.entry(key).or_insert(0) += 1;
        Ok(())
    }

    fn release(&mut self, key: IpAddr) {
        self.total = self.total.saturating_sub(1);
        if let Some(count) = self.per_peer.get_mut(&key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_peer.remove(&key);
            }
        }
    }
}

/// A connection's place in [`OpenConnections`], given back when it closes.
struct Slot {
    open: Arc<Mutex<OpenConnections>>,
    key: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release(self.key);
    }
}

/// An accepted connection, counted until it closes.
pub struct CountedConnection {
    stream: TcpStream,
    peer: SocketAddr,
    /// Until the client has sent [`PREFACE_BYTES`]: its deadline, and the
    /// bytes it sent so far.
    preface: Option<(Pin<Box<Sleep>>, usize)>,
    _slot: Slot,
}

/// At most one warning a second per kind; the counters in `/metrics` count all.
pub(crate) fn warn_rarely(last: &Mutex<Option<Instant>>) -> bool {
    let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    if last.is_some_and(|at| now.duration_since(at) < Duration::from_secs(1)) {
        return false;
    }
    *last = Some(now);
    true
}

/// The connections `listener` accepts, within `limits`; `known` says which
/// peers may take the slots kept for known peers.
pub fn limited_incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    known: KnownPeers,
) -> impl Stream<Item = io::Result<CountedConnection>> {
    let open = Arc::new(Mutex::new(OpenConnections::default()));
    static WARNED_FULL: Mutex<Option<Instant>> = Mutex::new(None);
    static WARNED_PER_IP: Mutex<Option<Instant>> = Mutex::new(None);
    static WARNED_ACCEPT: Mutex<Option<Instant>> = Mutex::new(None);
    futures::stream::unfold(
        (listener, open, known),
        move |(listener, open, known)| async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        if warn_rarely(&WARNED_ACCEPT) {
                            tracing::warn!(
                                %error,
                                "accepting a connection failed; retrying in 100 ms (if it says \
                                 \"Too many open files\", raise the worker's open-file limit, \
                                 `ulimit -n`, or lower --max-connections)"
                            );
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let key = peer_key(peer.ip());
                let admitted = {
                    let is_known = limits.reserved_for_known > 0 && known.contains(peer.ip());
                    open.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .admit(key, is_known, &limits)
                };
                match admitted {
                    Ok(()) => {
                        let _ = stream.set_nodelay(true);
                        let connection = CountedConnection {
                            stream,
                            peer,
                            preface: Some((
                                Box::pin(tokio::time::sleep(limits.preface_timeout)),
                                0,
                            )),
                            _slot: Slot {
                                open: Arc::clone(&open),
                                key,
                            },
                        };
                        return Some((Ok(connection), (listener, open, known)));
                    }
                    Err(Refusal::PerIp) => {
                        drop(stream);
                        let refused = REFUSED_PER_IP.fetch_add(1, Ordering::Relaxed) + 1;
                        if warn_rarely(&WARNED_PER_IP) {
                            tracing::warn!(
                                %peer,
                                refused_total = refused,
                                "closed a new connection: its address already holds {} \
                                 connections to this worker (the cap per address); a client \
                                 needs few (a coordinator multiplexes its queries on one), so \
                                 look for a client that leaks connections or floods this port \
                                 (at most one such line a second; refused_total counts them all)",
                                limits.per_ip
                            );
                        }
                    }
                    Err(Refusal::Full) => {
                        drop(stream);
                        let refused = REFUSED.fetch_add(1, Ordering::Relaxed) + 1;
                        if warn_rarely(&WARNED_FULL) {
                            tracing::warn!(
                                %peer,
                                refused_total = refused,
                                reserved_for_known_peers = limits.reserved_for_known,
                                "closed a new connection: {} connections are open \
                                 (--max-connections, less those kept for peers that proved the \
                                 cluster key recently); raise it if so many clients are expected \
                                 (at most one such line a second; refused_total counts them all)",
                                limits.max
                            );
                        }
                    }
                }
            }
        },
    )
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
        let this = &mut *self;
        let before = buf.filled().len();
        let room = buf.remaining();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        let Some((deadline, seen)) = &mut this.preface else {
            return read;
        };
        match &read {
            Poll::Ready(Ok(())) => {
                let got = buf.filled().len() - before;
                *seen += got;
                // Enough to be a preface (or a TLS ClientHello), or the end
                // of the stream (nothing read into room for something):
                // either way the deadline has done its work.
                if *seen >= PREFACE_BYTES || (got == 0 && room > 0) {
                    this.preface = None;
                }
            }
            Poll::Ready(Err(_)) => this.preface = None,
            Poll::Pending => {
                if deadline.as_mut().poll(cx).is_ready() {
                    let sent = *seen;
                    this.preface = None;
                    let total = PREFACE_TIMEOUTS.fetch_add(1, Ordering::Relaxed) + 1;
                    static WARNED: Mutex<Option<Instant>> = Mutex::new(None);
                    if warn_rarely(&WARNED) {
                        tracing::warn!(
                            peer = %this.peer,
                            bytes_sent = sent,
                            preface_timeouts_total = total,
                            "closed a connection that sent no HTTP/2 preface (or TLS handshake) \
                             within {PREFACE_TIMEOUT:?}: clients of a worker must speak gRPC at \
                             once; if this is a dfship process, check that it uses https:// \
                             exactly when the worker has TLS (at most one such line a second)"
                        );
                    }
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "no HTTP/2 preface or TLS handshake within {PREFACE_TIMEOUT:?}; the \
                             connection is closed"
                        ),
                    )));
                }
            }
        }
        read
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    #[test]
    fn one_address_cannot_take_every_slot() {
        let limits = ConnectionLimits {
            max: 10,
            per_ip: 3,
            reserved_for_known: 0,
            preface_timeout: PREFACE_TIMEOUT,
        };
        let mut open = OpenConnections::default();
        for _ in 0..3 {
            assert_eq!(open.admit(v4(1), false, &limits), Ok(()));
        }
        assert_eq!(open.admit(v4(1), false, &limits), Err(Refusal::PerIp));
        assert_eq!(open.admit(v4(2), false, &limits), Ok(()));
        open.release(v4(1));
        assert_eq!(open.admit(v4(1), false, &limits), Ok(()));
        for _ in 0..4 {
            open.release(v4(1));
        }
        open.release(v4(2));
        assert_eq!(open.total, 0);
        assert!(open.per_peer.is_empty(), "nothing is kept for closed peers");
    }

    #[test]
    fn the_reserved_share_goes_to_known_peers_only() {
        let limits = ConnectionLimits::new(8, true);
        assert_eq!(limits.reserved_for_known, 2);
        assert_eq!(ConnectionLimits::new(8, false).reserved_for_known, 0);
        let mut open = OpenConnections::default();
        for peer in 0..6 {
            assert_eq!(open.admit(v4(peer), false, &limits), Ok(()));
        }
        assert_eq!(open.admit(v4(50), false, &limits), Err(Refusal::Full));
        assert_eq!(open.admit(v4(60), true, &limits), Ok(()));
        assert_eq!(open.admit(v4(61), true, &limits), Ok(()));
        assert_eq!(open.admit(v4(62), true, &limits), Err(Refusal::Full));
    }

    #[test]
    fn ipv6_peers_are_counted_by_their_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(peer_key(a), peer_key(b));
        assert_ne!(peer_key(a), peer_key(c));
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().unwrap();
        assert_eq!(peer_key(mapped), "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_ne!(peer_key(v4(1)), peer_key(v4(2)));
    }

    #[test]
    fn a_peer_table_stays_bounded_and_forgets_the_least_recent_first() {
        let mut table = PeerTable::new(100);
        let start = Instant::now();
        for i in 0..1000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(i));
            *table.touch(ip, start + Duration::from_millis(u64::from(i)), || 0) += 1;
            // A steady peer, touched all along, is never forgotten.
            table.touch(v4(200), start + Duration::from_millis(u64::from(i)), || 0);
            assert!(table.len() <= 100);
        }
        assert!(table.get(&v4(200)).is_some());
        assert!(table.get(&IpAddr::V4(Ipv4Addr::from(999u32))).is_some());
        assert!(table.get(&IpAddr::V4(Ipv4Addr::from(0u32))).is_none());
    }

    /// The next connection `incoming` yields.
    async fn next(
        incoming: &mut (impl Stream<Item = io::Result<CountedConnection>> + Unpin),
    ) -> CountedConnection {
        use futures::StreamExt;
        incoming.next().await.unwrap().unwrap()
    }

    #[tokio::test]
    async fn a_connection_that_sends_no_preface_in_time_is_closed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let limits = ConnectionLimits {
            preface_timeout: Duration::from_millis(300),
            ..ConnectionLimits::new(8, false)
        };
        let mut incoming = Box::pin(limited_incoming(listener, limits, KnownPeers::default()));
        let before = preface_timeouts();

        // Silent, then a few bytes short of a preface: closed at the deadline.
        let mut client = TcpStream::connect(address).await.unwrap();
        let mut server = next(&mut incoming).await;
        client.write_all(b"PRI * HTTP").await.unwrap();
        let started = Instant::now();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A read into no room is not taken for the end of the stream.
        let mut empty = [0u8; 0];
        let within = Duration::from_secs(5);
        let nothing = tokio::time::timeout(within, server.read(&mut empty)).await;
        assert_eq!(nothing.unwrap().unwrap(), 0);
        let mut buf = [0u8; 64];
        assert_eq!(server.read(&mut buf).await.unwrap(), 10);
        let error = tokio::time::timeout(within, server.read(&mut buf))
            .await
            .expect("the deadline ends the read")
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(preface_timeouts() > before);

        // A whole preface in time: served on past the deadline.
        let mut client = TcpStream::connect(address).await.unwrap();
        let mut server = next(&mut incoming).await;
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut preface = [0u8; 24];
        server.read_exact(&mut preface).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        client.write_all(b"later").await.unwrap();
        let mut later = [0u8; 5];
        server.read_exact(&mut later).await.unwrap();
        assert_eq!(&later, b"later");
    }

    #[tokio::test]
    async fn connections_over_the_per_address_cap_are_closed_at_once() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let limits = ConnectionLimits {
            per_ip: 2,
            ..ConnectionLimits::new(8, false)
        };
        let mut incoming = Box::pin(limited_incoming(listener, limits, KnownPeers::default()));
        let before = refused_connections_per_ip();
        let mut kept = Vec::new();
        for _ in 0..2 {
            let client = TcpStream::connect(address).await.unwrap();
            kept.push((client, next(&mut incoming).await));
        }
        let mut third = TcpStream::connect(address).await.unwrap();
        // The stream only yields after it turned the third away (the fourth
        // comes from another address: 127.0.0.2, on the same loopback).
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let _other = socket.connect(address).await.unwrap();
        let _fourth = next(&mut incoming).await;
        let mut buf = [0u8; 8];
        let closed = tokio::time::timeout(Duration::from_secs(2), third.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
        assert!(refused_connections_per_ip() > before);
        // A slot given back is free again.
        drop(kept.pop());
        let _again = TcpStream::connect(address).await.unwrap();
        let _ = next(&mut incoming).await;
    }

    #[test]
    fn known_peers_are_remembered() {
        let known = KnownPeers::default();
        assert!(!known.contains(v4(1)));
        known.mark(v4(1));
        assert!(known.contains(v4(1)));
        assert!(!known.contains(v4(2)));
    }
}
