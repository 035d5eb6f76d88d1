//! Every RPC to a keyed worker carries a proof of the cluster key.
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
//! The proof, in the `dfship-auth` metadata entry, is
//! `v1.<unix milliseconds>.<nonce: 32 hex>.<tag: 64 hex>` where
//! `tag = HMAC-SHA256(rpc key, "dfship-rpc\nv1\n" + method path + "\n" +
//! milliseconds + "\n" + nonce)` and the rpc key is
//! `HMAC-SHA256(cluster key, "dfship-rpc-auth-v1")`. The key itself never
//! travels. A worker accepts a timestamp within [`MAX_CLOCK_SKEW`] of its
//! clock and each nonce once (a replay cache remembers them for as long as
//! their timestamp is acceptable), and compares tags in constant time.
//!
//! What it does not do: hide or protect the bytes of a request — a proof
//! binds the method, not the body, so someone who can read and alter
//! traffic in flight can replace a body within the same request. That is
//! what TLS (`--tls-*`) is for.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dfship_codec::ClusterKey;
use futures::future::BoxFuture;
use http::HeaderValue;
use tower::{Layer, Service};

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

/// What a tag covers: a fixed prefix, the method, the time and the nonce.
fn signed_parts<'a>(path: &'a str, millis: &'a str, nonce: &'a [u8; 16]) -> [&'a [u8]; 6] {
    [
        b"dfship-rpc\nv1\n",
        path.as_bytes(),
        b"\n",
        millis.as_bytes(),
        b"\n",
        nonce,
    ]
}

impl RpcAuthenticator {
    /// Proofs for `cluster_key`.
    pub fn new(cluster_key: &ClusterKey) -> Self {
        let derived = cluster_key.derive(RPC_KEY_PURPOSE);
        Self {
            key: Arc::new(
                ClusterKey::new(derived.to_vec())
                    .unwrap_or_else(|_| unreachable!("a derived key is 32 bytes")),
            ),
            skew: MAX_CLOCK_SKEW,
            seen: Arc::default(),
        }
    }

    fn tag(&self, path: &str, millis: u64, nonce: &[u8; 16]) -> [u8; 32] {
        let millis = millis.to_string();
        self.key.sign(&signed_parts(path, &millis, nonce))
    }

    /// A fresh proof for a request to `path` (e.g. `/worker.WorkerService/ExecuteTask`).
    pub fn proof(&self, path: &str) -> String {
        let nonce = *uuid::Uuid::new_v4().as_bytes();
        self.proof_at(path, now_millis(), &nonce)
    }

    /// The proof for `path` at a given time with a given nonce.
    pub fn proof_at(&self, path: &str, millis: u64, nonce: &[u8; 16]) -> String {
        format!(
            "v1.{millis}.{}.{}",
            hex(nonce),
            hex(&self.tag(path, millis, nonce))
        )
    }

    /// Checks the proof of a request to `path`; says why it is refused.
    pub fn verify(&self, path: &str, proof: Option<&HeaderValue>) -> Result<(), String> {
        let proof = proof.ok_or_else(|| {
            "this worker requires the cluster key: the request carries no proof of it \
             (dfship-auth); configure the same cluster key on this client"
                .to_string()
        })?;
        let text = proof
            .to_str()
            .map_err(|_| "the proof of the cluster key is not ASCII".to_string())?;
        let mut parts = text.split('.');
        let (Some("v1"), Some(millis), Some(nonce), Some(tag), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(
                "the proof of the cluster key is malformed (expected v1.time.nonce.tag)"
                    .to_string(),
            );
        };
        let millis: u64 = millis
            .parse()
            .map_err(|_| "the proof's timestamp is not a number".to_string())?;
        let nonce: [u8; 16] =
            unhex(nonce).ok_or_else(|| "the proof's nonce is not 32 hex digits".to_string())?;
        let tag: [u8; 32] =
            unhex(tag).ok_or_else(|| "the proof's tag is not 64 hex digits".to_string())?;
        if !self
            .key
            .verify(&signed_parts(path, &millis.to_string(), &nonce), &tag)
        {
            return Err(
                "the proof does not match this worker's cluster key; coordinator and workers \
                 must use the same key"
                    .to_string(),
            );
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
            .admit(nonce, now, 2 * skew + 1)
    }
}

/// The worker side: refuses, before reading its body, any request without
/// a valid proof (every method of every service on the server).
#[derive(Debug, Clone, Default)]
pub struct RpcAuthLayer {
    auth: Option<RpcAuthenticator>,
}

impl RpcAuthLayer {
    /// `None`: no key, every request passes (a worker that refuses to listen
    /// beyond loopback without `--insecure`, see `dfship-worker`).
    pub fn new(auth: Option<RpcAuthenticator>) -> Self {
        Self { auth }
    }
}

impl<S> Layer<S> for RpcAuthLayer {
    type Service = RpcAuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcAuthService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// The service [`RpcAuthLayer`] makes.
#[derive(Debug, Clone)]
pub struct RpcAuthService<S> {
    inner: S,
    auth: Option<RpcAuthenticator>,
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
        if let Some(auth) = &self.auth {
            let path = request.uri().path().to_string();
            if let Err(why) = auth.verify(&path, request.headers().get(AUTH_HEADER)) {
                let refused = REFUSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                log_refusal(&path, &why.to_string(), refused);
                let refused = tonic::Status::unauthenticated(format!(
                    "{} {why}",
                    dfship_codec::ErrorKind::Unauthenticated.tag()
                ))
                .into_http();
                return Box::pin(async move { Ok(refused) });
            }
        }
        Box::pin(self.inner.call(request))
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

/// Requests this process refused for a missing, wrong, stale or replayed proof.
pub fn refused_requests() -> u64 {
    REFUSED.load(std::sync::atomic::Ordering::Relaxed)
}

/// The client side: adds a fresh proof to every request of a channel.
#[derive(Debug, Clone)]
pub struct SignedChannel<S> {
    inner: S,
    auth: RpcAuthenticator,
}

impl<S> SignedChannel<S> {
    pub fn new(inner: S, auth: RpcAuthenticator) -> Self {
        Self { inner, auth }
    }
}

impl<S> Service<http::Request<tonic::body::Body>> for SignedChannel<S>
where
    S: Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        let proof = self.auth.proof(request.uri().path());
        if let Ok(value) = HeaderValue::from_str(&proof) {
            request.headers_mut().insert(AUTH_HEADER, value);
        }
        self.inner.call(request)
    }
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

    #[test]
    fn a_fresh_proof_passes_once() {
        let worker = auth(1);
        let proof = header(&auth(1).proof(PATH));
        assert_eq!(worker.verify(PATH, Some(&proof)), Ok(()));
        assert!(worker
            .verify(PATH, Some(&proof))
            .unwrap_err()
            .contains("replayed"));
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
        let worker = auth(1);
        assert!(worker.verify(PATH, None).unwrap_err().contains("no proof"));
        let wrong_key = header(&auth(2).proof(PATH));
        assert!(worker
            .verify(PATH, Some(&wrong_key))
            .unwrap_err()
            .contains("does not match"));
        let other_method = header(&auth(1).proof("/worker.WorkerService/ExecuteTask"));
        assert!(worker.verify(PATH, Some(&other_method)).is_err());
        let stale = header(&auth(1).proof_at(PATH, now_millis() - 10 * 60 * 1000, &[3; 16]));
        assert!(worker
            .verify(PATH, Some(&stale))
            .unwrap_err()
            .contains("clock"));
        for garbage in ["", "v1", "v2.1.2.3", "v1.x.y.z", "v1.1.00.00", "v1.1.2.3.4"] {
            assert!(
                worker.verify(PATH, Some(&header(garbage))).is_err(),
                "{garbage}"
            );
        }
    }
}
