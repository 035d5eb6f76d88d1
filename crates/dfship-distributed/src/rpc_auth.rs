//! Every RPC to a keyed worker carries a proof of the cluster key, made for
//! that worker and bound to what the request carries.
//!
//! The cluster key signs Python UDF payloads; on its own that protects
//! pickles, not the worker: a client without the key could still reach
//! `CoordinatorChannel` with a plan that reads or writes files. So with a key
//! configured, a worker checks — in a tower layer, before anything of the
//! request is decoded — that every request (every method, every service)
//! carries a fresh proof, and answers `UNAUTHENTICATED` otherwise. dfship's
//! channels (coordinator to worker, and worker to worker for shuffles) add
//! the proof to each request.
//!
//! Three messages, all HMAC-SHA256 under the rpc key
//! `HMAC-SHA256(cluster key, "dfship-rpc-auth-v1")` (the key itself never
//! travels):
//!
//! - **Identity challenge.** Before a client sends anything signed to an
//!   endpoint, it asks it to prove it holds the key: a `POST
//!   /dfship.Auth/Hello` with a fresh 16-byte challenge in `dfship-hello`,
//!   answered with `dfship-identity: <worker id: 32 hex>.<tag: 64 hex>`,
//!   `tag = HMAC(rpc key, "dfship-hello\nv1\n" + challenge + worker id)`.
//!   An endpoint that cannot answer (an impostor, a stale DNS record, a typo
//!   in the worker list, a worker with another key) gets nothing else: no
//!   proof, no plan. The worker id is `HMAC(rpc key, "dfship-worker-id\n" +
//!   host name + ":" + port)[..16]`: the worker computes and checks it, it
//!   does not depend on the names clients reach the worker by, and it stays
//!   the same when the worker restarts on its host and port.
//! - **Request proof**, in `dfship-auth`: `v2.<unix ms>.<nonce: 32
//!   hex>.<worker id: 32 hex>.<tag: 64 hex>`, `tag = HMAC(rpc key,
//!   "dfship-rpc\nv2\n" + method path + "\n" + ms + "\n" + nonce + worker
//!   id)`. A worker refuses a proof that names another worker, a timestamp
//!   beyond [`MAX_CLOCK_SKEW`] of its clock, and a nonce it has seen (a
//!   replay cache keeps each for as long as its timestamp is acceptable);
//!   tags are compared in constant time.
//! - **Message tags** (`crate::signed_body`): every gRPC message of the
//!   request body (a `SetPlanRequest` in the bidirectional
//!   `CoordinatorChannel` stream as much as a unary request) is followed by
//!   `HMAC(rpc key, "dfship-frame\nv2\n" + nonce + message index (u64 LE) +
//!   the message's 5-byte gRPC prefix + the message)`, checked and removed
//!   by the worker before tonic decodes it. So a body is bound to the proof
//!   of its request (its nonce) and to its place in the stream: a harvested
//!   proof with another body, messages reordered, dropped at the end or
//!   taken from another request are refused.
//!
//! Identity challenges are answered without the key being checked, so
//! each peer address (an IPv6 /64) may send at most
//! [`HELLO_RATE_PER_SECOND`] a second, in bursts of [`HELLO_BURST`]; more
//! are answered `RESOURCE_EXHAUSTED`. Answered, malformed and rate-limited
//! challenges are counted in `/metrics` ([`hello_requests`]). An address
//! whose request proof passes is remembered as a known peer
//! (`crate::connection_limit::KnownPeers`: slots are kept for it).
//!
//! What it does not do: hide the bytes (TLS, `--tls-*`, does), or authenticate
//! responses beyond the identity challenge. A relay that forwards everything
//! both ways to a real worker is a man in the middle: it can read traffic and
//! drop it, not alter or replay it; only TLS keeps it from reading.

use std::collections::{HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dfship_codec::ClusterKey;
use futures::future::BoxFuture;
use http::HeaderValue;
use tonic::transport::server::TcpConnectInfo;
use tower::{Layer, Service};

use crate::connection_limit::{peer_key, KnownPeers, PeerTable, MAX_TRACKED_PEERS};

/// The metadata entry that carries the proof.
pub const AUTH_HEADER: &str = "dfship-auth";

/// How far a proof's timestamp may be from the worker's clock.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// The purpose the rpc key is derived for (so a proof never uses the
/// payload-signing key directly).
const RPC_KEY_PURPOSE: &[u8] = b"dfship-rpc-auth-v1";

/// Nonces remembered at most (~50 MB). A nonce is never forgotten while its
/// proof could still pass the clock check, so beyond this requests are
/// refused until older nonces expire: a worker would have to accept more
/// than 4,000 RPCs a second for two minutes.
const REPLAY_CACHE_LIMIT: usize = 1_000_000;

/// Makes and checks proofs of the cluster key for RPCs.
#[derive(Clone)]
pub struct RpcAuthenticator {
    key: Arc<ClusterKey>,
    skew: Duration,
    seen: Arc<Mutex<ReplayCache>>,
    /// A worker's own identity (set by [`Self::for_worker`]).
    identity: Option<WorkerId>,
}

/// The nonces of accepted proofs, each kept until its proof can no longer
/// pass the clock check, and forgotten oldest first: O(1) per request.
#[derive(Debug, Default)]
struct ReplayCache {
    seen: HashSet<[u8; 16]>,
    /// When each nonce may be forgotten, in the order they were accepted.
    /// The expiry is `now + 2 * skew` at acceptance (the proof's own time is
    /// within `skew` of that `now`, so it fails the clock check from then
    /// on), which keeps the queue in time order as long as the clock does.
    expiries: VecDeque<(u64, [u8; 16])>,
}

impl ReplayCache {
    /// Accepts `nonce` once, at `now` (ms), remembering it for `keep_ms`.
    fn admit(&mut self, nonce: [u8; 16], now: u64, keep_ms: u64) -> Result<(), String> {
        while let Some(&(expires, old)) = self.expiries.front() {
            if expires > now {
                break;
            }
            self.expiries.pop_front();
            self.seen.remove(&old);
        }
        if self.seen.contains(&nonce) {
            return Err("the proof was already used: a replayed request".to_string());
        }
        if self.seen.len() >= REPLAY_CACHE_LIMIT {
            return Err(format!(
                "more than {REPLAY_CACHE_LIMIT} requests within the replay window; retry later"
            ));
        }
        self.seen.insert(nonce);
        self.expiries
            .push_back((now.saturating_add(keep_ms), nonce));
        Ok(())
    }
}

impl std::fmt::Debug for RpcAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcAuthenticator")
            .field("skew", &self.skew)
            .finish_non_exhaustive()
    }
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// What a request proof covers: a fixed prefix, the method, the time, the
/// nonce and the worker it is for.
fn signed_parts<'a>(
    path: &'a str,
    millis: &'a str,
    nonce: &'a [u8; 16],
    worker: &'a WorkerId,
) -> [&'a [u8]; 7] {
    [
        b"dfship-rpc\nv2\n",
        path.as_bytes(),
        b"\n",
        millis.as_bytes(),
        b"\n",
        nonce,
        worker,
    ]
}

/// The path of the identity challenge (answered by [`RpcAuthLayer`] itself).
pub const HELLO_PATH: &str = "/dfship.Auth/Hello";
/// The request entry that carries the challenge.
pub const HELLO_HEADER: &str = "dfship-hello";
/// The response entry that carries the answer.
pub const IDENTITY_HEADER: &str = "dfship-identity";
/// Set on a refusal of a proof made for another worker: the client's
/// knowledge of who is at this address is stale.
pub const IDENTITY_CHANGED_HEADER: &str = "dfship-identity-changed";
/// How the refusal of a proof made for another worker begins.
const OTHER_WORKER: &str = "the proof was made for worker";

/// What a worker is known by: 16 bytes it derives from the key and its host
/// name and port, and proves in the identity challenge.
pub type WorkerId = [u8; 16];

impl RpcAuthenticator {
    /// Proofs for `cluster_key`, as a client makes them.
    pub fn new(cluster_key: &ClusterKey) -> Self {
        let derived = cluster_key.derive(RPC_KEY_PURPOSE);
        Self {
            key: Arc::new(
                ClusterKey::new(derived.to_vec())
                    .unwrap_or_else(|_| unreachable!("a derived key is 32 bytes")),
            ),
            skew: MAX_CLOCK_SKEW,
            seen: Arc::default(),
            identity: None,
        }
    }

    /// A worker's authenticator: it answers identity challenges as the
    /// worker `name` (its host name and port) and accepts only proofs made
    /// for that identity.
    pub fn for_worker(cluster_key: &ClusterKey, name: &str) -> Self {
        let mut auth = Self::new(cluster_key);
        let derived = auth.key.sign(&[b"dfship-worker-id\n", name.as_bytes()]);
        let mut id = [0u8; 16];
        id.copy_from_slice(&derived[..16]);
        auth.identity = Some(id);
        auth
    }

    /// This worker's identity, if it is a worker's authenticator.
    pub fn identity(&self) -> Option<WorkerId> {
        self.identity
    }

    pub(crate) fn key(&self) -> &Arc<ClusterKey> {
        &self.key
    }

    fn tag(&self, path: &str, millis: u64, nonce: &[u8; 16], worker: &WorkerId) -> [u8; 32] {
        let millis = millis.to_string();
        self.key.sign(&signed_parts(path, &millis, nonce, worker))
    }

    /// A fresh proof for a request to `path` (e.g.
    /// `/worker.WorkerService/ExecuteTask`) on `worker`, and its nonce (which
    /// the request's message tags use).
    pub fn proof(&self, path: &str, worker: &WorkerId) -> (String, [u8; 16]) {
        let nonce = Self::challenge();
        (self.proof_at(path, now_millis(), &nonce, worker), nonce)
    }

    /// The proof for `path` on `worker` at a given time with a given nonce.
    pub fn proof_at(&self, path: &str, millis: u64, nonce: &[u8; 16], worker: &WorkerId) -> String {
        format!(
            "v2.{millis}.{}.{}.{}",
            hex(nonce),
            hex(worker),
            hex(&self.tag(path, millis, nonce, worker))
        )
    }

    /// 16 fresh random bytes: an identity challenge, or a proof's nonce.
    pub fn challenge() -> [u8; 16] {
        *uuid::Uuid::new_v4().as_bytes()
    }

    /// A worker's answer to `challenge`, or `None` for a client's authenticator.
    pub fn answer(&self, challenge: &[u8; 16]) -> Option<String> {
        let id = self.identity?;
        let tag = self.key.sign(&[b"dfship-hello\nv1\n", challenge, &id]);
        Some(format!("{}.{}", hex(&id), hex(&tag)))
    }

    /// The identity `answer` proves for `challenge`; says why it proves none.
    pub fn check_answer(&self, challenge: &[u8; 16], answer: &str) -> Result<WorkerId, String> {
        let (id, tag) = answer
            .split_once('.')
            .ok_or_else(|| "its answer is not <id>.<tag>".to_string())?;
        let id: WorkerId = unhex(id).ok_or_else(|| "its id is not 32 hex digits".to_string())?;
        let tag: [u8; 32] = unhex(tag).ok_or_else(|| "its tag is not 64 hex digits".to_string())?;
        if self
            .key
            .verify(&[b"dfship-hello\nv1\n", challenge, &id], &tag)
        {
            Ok(id)
        } else {
            Err("its answer does not match this process's cluster key".to_string())
        }
    }

    /// Checks the proof of a request to `path` on this worker; returns its
    /// nonce (for the message tags) or says why it is refused.
    pub fn verify(&self, path: &str, proof: Option<&HeaderValue>) -> Result<[u8; 16], String> {
        let proof = proof.ok_or_else(|| {
            "this worker requires the cluster key: the request carries no proof of it \
             (dfship-auth); configure the same cluster key on this client"
                .to_string()
        })?;
        let text = proof
            .to_str()
            .map_err(|_| "the proof of the cluster key is not ASCII".to_string())?;
        let mut parts = text.split('.');
        let (Some(version), Some(millis), Some(nonce), Some(worker), Some(tag), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(if text.starts_with("v1.") {
                "the proof is of version 1, which this worker no longer accepts: the client \
                 runs an older dfship; run the same dfship version on every process"
                    .to_string()
            } else {
                "the proof of the cluster key is malformed (expected v2.time.nonce.worker.tag)"
                    .to_string()
            });
        };
        if version != "v2" {
            return Err(format!(
                "the proof is of version '{}', this worker accepts v2; run the same dfship \
                 version on every process",
                version.chars().take(8).collect::<String>().escape_debug()
            ));
        }
        let millis: u64 = millis
            .parse()
            .map_err(|_| "the proof's timestamp is not a number".to_string())?;
        let nonce: [u8; 16] =
            unhex(nonce).ok_or_else(|| "the proof's nonce is not 32 hex digits".to_string())?;
        let worker: WorkerId = unhex(worker)
            .ok_or_else(|| "the proof's worker id is not 32 hex digits".to_string())?;
        let tag: [u8; 32] =
            unhex(tag).ok_or_else(|| "the proof's tag is not 64 hex digits".to_string())?;
        if !self.key.verify(
            &signed_parts(path, &millis.to_string(), &nonce, &worker),
            &tag,
        ) {
            return Err(
                "the proof does not match this worker's cluster key; coordinator and workers \
                 must use the same key"
                    .to_string(),
            );
        }
        if let Some(own) = self.identity.filter(|own| *own != worker) {
            return Err(format!(
                "{OTHER_WORKER} {}, and this is worker {}: a request meant for \
                 another worker (replayed, or sent to a stale address); the client asks this \
                 address who it is again on its next connection",
                hex(&worker),
                hex(&own)
            ));
        }
        let now = now_millis();
        let skew = self.skew.as_millis() as u64;
        if now.abs_diff(millis) > skew {
            return Err(format!(
                "the proof is {} s away from this worker's clock (at most {} s are accepted): a \
                 replayed request, or clocks out of sync; synchronise the clocks (NTP)",
                now.abs_diff(millis) / 1000,
                skew / 1000
            ));
        }
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(nonce, now, 2 * skew + 1)?;
        Ok(nonce)
    }
}

/// Identity challenges one peer address may send a second, on average.
pub const HELLO_RATE_PER_SECOND: f64 = 20.0;
/// Identity challenges one peer address may send at once.
pub const HELLO_BURST: f64 = 40.0;

/// A token bucket per peer address (by [`peer_key`]) for identity
/// challenges; at most [`MAX_TRACKED_PEERS`] addresses are tracked (the
/// least recently seen are forgotten first).
#[derive(Debug)]
struct HelloLimiter {
    buckets: PeerTable<Bucket>,
    rate: f64,
    burst: f64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Default for HelloLimiter {
    fn default() -> Self {
        Self {
            buckets: PeerTable::new(MAX_TRACKED_PEERS),
            rate: HELLO_RATE_PER_SECOND,
            burst: HELLO_BURST,
        }
    }
}

impl HelloLimiter {
    /// Whether a challenge from `ip` at `now` is within its rate (and takes a token).
    fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        let (rate, burst) = (self.rate, self.burst);
        let bucket = self.buckets.touch(peer_key(ip), now, || Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

static HELLOS_ANSWERED: AtomicU64 = AtomicU64::new(0);
static HELLOS_INVALID: AtomicU64 = AtomicU64::new(0);
static HELLOS_LIMITED: AtomicU64 = AtomicU64::new(0);

/// Identity challenges (`/dfship.Auth/Hello`) this process received, by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HelloCounts {
    /// Answered with this worker's identity.
    pub answered: u64,
    /// Refused as malformed (no 32-hex-digit challenge).
    pub invalid: u64,
    /// Refused because their address sent more than its rate.
    pub rate_limited: u64,
}

/// The identity challenges this process received, by outcome.
pub fn hello_requests() -> HelloCounts {
    HelloCounts {
        answered: HELLOS_ANSWERED.load(Ordering::Relaxed),
        invalid: HELLOS_INVALID.load(Ordering::Relaxed),
        rate_limited: HELLOS_LIMITED.load(Ordering::Relaxed),
    }
}

/// The address of the peer that sent `request` (tonic records it for TCP
/// connections, with TLS too).
fn peer_ip<B>(request: &http::Request<B>) -> Option<IpAddr> {
    request
        .extensions()
        .get::<TcpConnectInfo>()
        .and_then(|info| info.remote_addr())
        .map(|address| address.ip())
}

/// The worker side: answers identity challenges, and refuses, before
/// reading its body, any request without a valid proof (every method of
/// every service on the server); checks the message tags of the body.
#[derive(Debug, Clone, Default)]
pub struct RpcAuthLayer {
    auth: Option<RpcAuthenticator>,
    max_message_bytes: usize,
    known: Option<KnownPeers>,
    hellos: Arc<Mutex<HelloLimiter>>,
}

impl RpcAuthLayer {
    /// `None`: no key, every request passes (a worker that refuses to listen
    /// beyond loopback without `--insecure`, see `dfship-worker`). `auth`
    /// should be a worker's ([`RpcAuthenticator::for_worker`]).
    pub fn new(auth: Option<RpcAuthenticator>, max_message_bytes: usize) -> Self {
        Self {
            auth,
            max_message_bytes,
            known: None,
            hellos: Arc::default(),
        }
    }

    /// Records in `known` the address of every request whose proof passes.
    pub fn with_known_peers(mut self, known: KnownPeers) -> Self {
        self.known = Some(known);
        self
    }
}

impl<S> Layer<S> for RpcAuthLayer {
    type Service = RpcAuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcAuthService {
            inner,
            auth: self.auth.clone(),
            max_message_bytes: self.max_message_bytes,
            known: self.known.clone(),
            hellos: Arc::clone(&self.hellos),
        }
    }
}

/// The service [`RpcAuthLayer`] makes.
#[derive(Debug, Clone)]
pub struct RpcAuthService<S> {
    inner: S,
    auth: Option<RpcAuthenticator>,
    max_message_bytes: usize,
    known: Option<KnownPeers>,
    hellos: Arc<Mutex<HelloLimiter>>,
}

impl<S> Service<http::Request<tonic::body::Body>> for RpcAuthService<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>
        + Send,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let Some(auth) = &self.auth else {
            return Box::pin(self.inner.call(request));
        };
        let path = request.uri().path().to_string();
        if path == HELLO_PATH {
            let peer = peer_ip(&request);
            let allowed = self.hellos.lock().unwrap_or_else(|p| p.into_inner()).allow(
                peer.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
                Instant::now(),
            );
            if !allowed {
                let limited = HELLOS_LIMITED.fetch_add(1, Ordering::Relaxed) + 1;
                let peer =
                    peer.map_or_else(|| "an unknown address".to_string(), |ip| ip.to_string());
                log_rate_limited_hello(&peer, limited);
                let reply = tonic::Status::resource_exhausted(format!(
                    "{} this worker answers at most {HELLO_RATE_PER_SECOND} identity challenges \
                     a second (bursts of {HELLO_BURST}) from one address, and {peer} sent more: \
                     this one was not answered. Wait a second and connect again; a client needs \
                     one challenge per connection, so look for one that reconnects in a loop",
                    dfship_codec::ErrorKind::WorkerLost.tag()
                ))
                .into_http();
                return Box::pin(async move { Ok(reply) });
            }
            let challenge = request
                .headers()
                .get(HELLO_HEADER)
                .and_then(|value| value.to_str().ok())
                .and_then(unhex::<16>);
            let reply = match challenge.and_then(|challenge| auth.answer(&challenge)) {
                Some(answer) => {
                    HELLOS_ANSWERED.fetch_add(1, Ordering::Relaxed);
                    let mut headers = http::HeaderMap::new();
                    if let Ok(value) = HeaderValue::from_str(&answer) {
                        headers.insert(IDENTITY_HEADER, value);
                    }
                    crate::signed_body::empty_reply(headers)
                }
                None => {
                    HELLOS_INVALID.fetch_add(1, Ordering::Relaxed);
                    tonic::Status::invalid_argument(format!(
                        "{} an identity challenge needs {HELLO_HEADER}: 32 hex digits",
                        dfship_codec::ErrorKind::Unauthenticated.tag()
                    ))
                    .into_http()
                }
            };
            return Box::pin(async move { Ok(reply) });
        }
        match auth.verify(&path, request.headers().get(AUTH_HEADER)) {
            Ok(nonce) => {
                if let (Some(known), Some(peer)) = (&self.known, peer_ip(&request)) {
                    known.mark(peer);
                }
                let key = Arc::clone(auth.key());
                let limit = self.max_message_bytes;
                let request =
                    request.map(|body| crate::signed_body::verify(body, key, nonce, limit));
                Box::pin(self.inner.call(request))
            }
            Err(why) => {
                let refused = REFUSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                log_refusal(&path, &why, refused);
                let mut refused = tonic::Status::unauthenticated(format!(
                    "{} {why}",
                    dfship_codec::ErrorKind::Unauthenticated.tag()
                ))
                .into_http();
                if why.starts_with(OTHER_WORKER) {
                    refused
                        .headers_mut()
                        .insert(IDENTITY_CHANGED_HEADER, HeaderValue::from_static("1"));
                }
                Box::pin(async move { Ok(refused) })
            }
        }
    }
}

static REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Logs a refused request: its path cut to 120 characters (a client chooses
/// it), at most one line per second; the lines in between are counted in
/// the next one (`refused_total`, and `/metrics`).
fn log_refusal(path: &str, why: &str, refused_total: u64) {
    static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    {
        let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < std::time::Duration::from_secs(1)) {
            return;
        }
        *last = Some(now);
    }
    let cut = |text: &str| -> String {
        let mut short: String = text.chars().take(120).collect();
        if short.len() < text.len() {
            short.push('…');
        }
        short.escape_debug().to_string()
    };
    tracing::warn!(
        method = %cut(path),
        reason = %cut(why),
        refused_total,
        "refused an unauthenticated request (at most one such line a second; refused_total counts them all)"
    );
}

/// Logs a rate-limited identity challenge, at most one line a second; the
/// lines in between are counted in the next one (and `/metrics`).
fn log_rate_limited_hello(peer: &str, limited_total: u64) {
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    {
        let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < Duration::from_secs(1)) {
            return;
        }
        *last = Some(now);
    }
    tracing::warn!(
        %peer,
        rate_limited_total = limited_total,
        "turned away identity challenges (/dfship.Auth/Hello) from {peer}: more than \
         {HELLO_RATE_PER_SECOND} a second (bursts of {HELLO_BURST}); a client that reconnects in \
         a loop, or a flood (at most one such line a second; rate_limited_total counts them all)"
    );
}

/// Requests this process refused for a missing, wrong, stale or replayed proof.
pub fn refused_requests() -> u64 {
    REFUSED.load(std::sync::atomic::Ordering::Relaxed)
}

/// The client side: adds a fresh proof for `worker` to every request of a
/// channel, and tags its messages. Build it after [`challenge_endpoint`], which
/// learns `worker` from the endpoint's answer to an identity challenge.
///
/// When the worker says a proof was made for another worker (the address now
/// leads to another worker, or it restarted with another identity), the
/// channel marks itself stale ([`Self::stale_flag`]: its owner challenges the
/// address again) and the request fails as a lost worker, which queries
/// retry.
#[derive(Debug, Clone)]
pub struct SignedChannel<S> {
    inner: S,
    auth: RpcAuthenticator,
    worker: WorkerId,
    url: Arc<str>,
    stale: Arc<std::sync::atomic::AtomicBool>,
}

impl<S> SignedChannel<S> {
    pub fn new(inner: S, auth: RpcAuthenticator, worker: WorkerId, url: &str) -> Self {
        Self {
            inner,
            auth,
            worker,
            url: Arc::from(url),
            stale: Arc::default(),
        }
    }

    /// Raised once a worker refused a proof of this channel as made for
    /// another (shared by every clone).
    pub fn stale_flag(&self) -> Arc<std::sync::atomic::AtomicBool> {
        Arc::clone(&self.stale)
    }
}

impl<S> Service<http::Request<tonic::body::Body>> for SignedChannel<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        let (proof, nonce) = self.auth.proof(request.uri().path(), &self.worker);
        if let Ok(value) = HeaderValue::from_str(&proof) {
            request.headers_mut().insert(AUTH_HEADER, value);
        }
        let key = Arc::clone(self.auth.key());
        let response = self
            .inner
            .call(request.map(|body| crate::signed_body::sign(body, key, nonce)));
        let (stale, url) = (Arc::clone(&self.stale), Arc::clone(&self.url));
        Box::pin(async move {
            let response = response.await?;
            if response.headers().get(IDENTITY_CHANGED_HEADER).is_none() {
                return Ok(response);
            }
            stale.store(true, std::sync::atomic::Ordering::Release);
            Ok(tonic::Status::unavailable(format!(
                "{} {url} is no longer the worker this process verified there (it was replaced, \
                 or the address now leads to another worker); it is asked who it is again, and \
                 the query planned again",
                dfship_codec::ErrorKind::WorkerLost.tag()
            ))
            .into_http())
        })
    }
}

/// Asks the endpoint behind `channel` (at `url`, for messages) to prove it
/// holds the cluster key, within `timeout`; the identity it proved. Nothing
/// signed is sent before it answers.
pub async fn challenge_endpoint<S>(
    channel: &mut S,
    auth: &RpcAuthenticator,
    url: &str,
    timeout: Duration,
) -> Result<WorkerId, String>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>,
    S::Error: std::fmt::Display,
{
    use tower::ServiceExt;
    let challenge = RpcAuthenticator::challenge();
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(HELLO_PATH)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .header(HELLO_HEADER, hex(&challenge))
        // One empty message, as a unary gRPC call carries.
        .body(crate::signed_body::empty_message(false))
        .map_err(|e| format!("cannot build the identity challenge: {e}"))?;
    let not_proved = |why: String| {
        format!(
            "{} the endpoint {url} did not prove that it holds the cluster key ({why}); nothing \
             was sent to it. It is not a worker of this cluster: a wrong or stale address in the \
             worker list, a worker started with another key or without one, or an impostor",
            dfship_codec::ErrorKind::Unauthenticated.tag()
        )
    };
    let response = tokio::time::timeout(timeout, async {
        channel.ready().await?.call(request).await
    })
    .await
    .map_err(|_| not_proved(format!("no answer within {timeout:?}")))?
    .map_err(|e| not_proved(format!("the challenge failed: {e}")))?;
    let answer = match response.headers().get(IDENTITY_HEADER) {
        Some(answer) => answer
            .to_str()
            .map_err(|_| not_proved("its answer is not ASCII".to_string()))?
            .to_string(),
        None => {
            let status = tonic::Status::from_header_map(response.headers());
            if let Some(status) = status
                .as_ref()
                .filter(|status| status.code() == tonic::Code::ResourceExhausted)
            {
                // A worker limiting challenges from this address: busy, not
                // an impostor (nothing was sent either way).
                return Err(format!(
                    "{} the endpoint {url} turned away this process's identity challenge, so \
                     nothing was sent to it: {}",
                    dfship_codec::ErrorKind::WorkerLost.tag(),
                    status.message()
                ));
            }
            let status = status
                .map(|status| format!("{:?}: {}", status.code(), status.message()))
                .unwrap_or_else(|| format!("HTTP {}", response.status()));
            return Err(not_proved(format!(
                "it answered without an identity ({status})"
            )));
        }
    };
    auth.check_answer(&challenge, &answer).map_err(not_proved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(byte: u8) -> RpcAuthenticator {
        RpcAuthenticator::new(&ClusterKey::new(vec![byte; 32]).unwrap())
    }

    const PATH: &str = "/worker.WorkerService/GetWorkerInfo";

    fn header(text: &str) -> HeaderValue {
        HeaderValue::from_str(text).unwrap()
    }

    fn worker(byte: u8, name: &str) -> RpcAuthenticator {
        RpcAuthenticator::for_worker(&ClusterKey::new(vec![byte; 32]).unwrap(), name)
    }

    /// A client's proof for the worker `name`.
    fn proof_for(byte: u8, name: &str, path: &str) -> HeaderValue {
        let id = worker(byte, name).identity().unwrap();
        header(&auth(byte).proof(path, &id).0)
    }

    #[test]
    fn hellos_are_limited_per_address_by_a_token_bucket() {
        let mut limiter = HelloLimiter::default();
        let start = Instant::now();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let burst = HELLO_BURST as usize;
        let allowed = (0..burst + 10).filter(|_| limiter.allow(a, start)).count();
        assert_eq!(allowed, burst, "a burst, then nothing at the same instant");
        assert!(
            limiter.allow(b, start),
            "another address has its own bucket"
        );
        // A second later, `rate` more.
        let later = start + Duration::from_secs(1);
        let allowed = (0..100).filter(|_| limiter.allow(a, later)).count();
        assert_eq!(allowed, HELLO_RATE_PER_SECOND as usize);
        // Many addresses: the table stays bounded.
        for i in 0..(3 * MAX_TRACKED_PEERS as u32) {
            limiter.allow(IpAddr::V4(std::net::Ipv4Addr::from(i)), later);
        }
        assert!(limiter.buckets.len() <= MAX_TRACKED_PEERS);
    }

    #[test]
    fn a_fresh_proof_passes_once() {
        let worker = worker(1, "a:1");
        let proof = proof_for(1, "a:1", PATH);
        assert!(worker.verify(PATH, Some(&proof)).is_ok());
        assert!(worker
            .verify(PATH, Some(&proof))
            .unwrap_err()
            .contains("replayed"));
    }

    #[test]
    fn a_proof_opens_only_the_worker_it_was_made_for() {
        let (a, b) = (worker(1, "host-a:7000"), worker(1, "host-b:7000"));
        assert_ne!(a.identity(), b.identity());
        assert_eq!(
            a.identity(),
            worker(1, "host-a:7000").identity(),
            "an identity survives a restart in place"
        );
        let for_a = proof_for(1, "host-a:7000", PATH);
        let refused = b.verify(PATH, Some(&for_a)).unwrap_err();
        assert!(refused.contains("made for worker"), "{refused}");
        assert!(a.verify(PATH, Some(&for_a)).is_ok());
    }

    #[test]
    fn only_a_key_holder_answers_the_identity_challenge() {
        let client = auth(1);
        let challenge = RpcAuthenticator::challenge();
        let real = worker(1, "a:1");
        let answer = real.answer(&challenge).unwrap();
        assert_eq!(
            client.check_answer(&challenge, &answer),
            Ok(real.identity().unwrap())
        );
        // An answer relayed from another challenge, or made with another key.
        let other = RpcAuthenticator::challenge();
        assert!(client.check_answer(&other, &answer).is_err());
        let impostor = worker(2, "a:1").answer(&challenge).unwrap();
        assert!(client.check_answer(&challenge, &impostor).is_err());
        // A claimed identity with a made-up tag.
        let forged = format!("{}.{}", hex(&real.identity().unwrap()), "0".repeat(64));
        assert!(client.check_answer(&challenge, &forged).is_err());
        for garbage in ["", ".", "zz.zz", "00.00"] {
            assert!(
                client.check_answer(&challenge, garbage).is_err(),
                "{garbage}"
            );
        }
        assert_eq!(client.answer(&challenge), None, "a client has no identity");
    }

    #[test]
    fn the_replay_cache_forgets_a_nonce_only_once_its_proof_is_stale() {
        let mut cache = ReplayCache::default();
        let keep = 2 * 60_000 + 1;
        for i in 0..10_000u32 {
            let mut nonce = [0; 16];
            nonce[..4].copy_from_slice(&i.to_le_bytes());
            assert_eq!(cache.admit(nonce, 1_000 + u64::from(i), keep), Ok(()));
        }
        let first = [0; 16];
        let replayed = cache.admit(first, 1_000 + keep - 1, keep).unwrap_err();
        assert!(replayed.contains("replayed"), "{replayed}");
        assert_eq!(
            cache.seen.len(),
            10_000,
            "nothing forgotten within the window"
        );
        // Later, every nonce's proof fails the clock check: all are forgotten.
        assert_eq!(cache.admit([9; 16], 1_000 + 10_000 + keep, keep), Ok(()));
        assert_eq!(cache.seen.len(), 1);
        assert_eq!(cache.expiries.len(), 1);
    }

    #[test]
    fn missing_wrong_key_other_method_stale_and_garbage_proofs_are_refused() {
        let worker = worker(1, "a:1");
        let id = worker.identity().unwrap();
        assert!(worker.verify(PATH, None).unwrap_err().contains("no proof"));
        let wrong_key = header(&auth(2).proof(PATH, &id).0);
        assert!(worker
            .verify(PATH, Some(&wrong_key))
            .unwrap_err()
            .contains("does not match"));
        let other_method = header(&auth(1).proof("/worker.WorkerService/ExecuteTask", &id).0);
        assert!(worker.verify(PATH, Some(&other_method)).is_err());
        let stale = header(&auth(1).proof_at(PATH, now_millis() - 10 * 60 * 1000, &[3; 16], &id));
        assert!(worker
            .verify(PATH, Some(&stale))
            .unwrap_err()
            .contains("clock"));
        let old = format!(
            "v1.{}.{}.{}",
            now_millis(),
            "00".repeat(16),
            "00".repeat(32)
        );
        assert!(worker
            .verify(PATH, Some(&header(&old)))
            .unwrap_err()
            .contains("version 1"));
        for garbage in [
            "",
            "v1",
            "v2.1.2.3",
            "v2.x.y.z.w",
            "v2.1.00.00.00",
            "v2.1.2.3.4.5",
            "v3.1.2.3.4",
        ] {
            assert!(
                worker.verify(PATH, Some(&header(garbage))).is_err(),
                "{garbage}"
            );
        }
    }
}
