//! [`PayloadStore`]: the pickles this process received in full, by digest,
//! for the frames that name a pickle by its digest instead of carrying it
//! (see [`crate::wire::inline`]).
//!
//! A coordinator hands a worker each large pickle once (dfship's payload
//! service, before the plans that name it), and names it by digest in every
//! plan after that, across queries, for as long as the worker holds it (the
//! coordinator asks). A lookup that misses answers at once by default (a
//! store made with a wait can also wait for a pickle still in flight).
//! Entries are kept least-recently-used first up to a byte budget.

use std::sync::{Arc, Condvar, LazyLock, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::pickled::{short_hex, PickledCallable};

/// How many bytes of pickles the process-wide store keeps by default.
pub const DEFAULT_STORE_BYTES: usize = 1024 * 1024 * 1024;

/// How long a lookup waits for a pickle still in flight by default: not at
/// all (pickles are handed over before the plans that name them).
pub const DEFAULT_STORE_WAIT: Duration = Duration::ZERO;

struct Entries {
    pickles: LruCache<[u8; 32], PickledCallable>,
    bytes: usize,
}

/// Pickles received in full, by digest, bounded by bytes.
pub struct PayloadStore {
    entries: Mutex<Entries>,
    /// Plans' references to a pickle answered from the store.
    hits: std::sync::atomic::AtomicU64,
    arrived: Condvar,
    capacity_bytes: usize,
    wait: Duration,
}

impl std::fmt::Debug for PayloadStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let entries = self.lock();
        f.debug_struct("PayloadStore")
            .field("entries", &entries.pickles.len())
            .field("bytes", &entries.bytes)
            .field("capacity_bytes", &self.capacity_bytes)
            .finish()
    }
}

impl PayloadStore {
    pub fn new(capacity_bytes: usize, wait: Duration) -> Self {
        Self {
            entries: Mutex::new(Entries {
                pickles: LruCache::unbounded(),
                bytes: 0,
            }),
            hits: std::sync::atomic::AtomicU64::new(0),
            arrived: Condvar::new(),
            capacity_bytes,
            wait,
        }
    }

    /// The process-wide store every codec uses unless given another.
    pub fn global() -> Arc<Self> {
        static GLOBAL: LazyLock<Arc<PayloadStore>> =
            LazyLock::new(|| Arc::new(PayloadStore::new(DEFAULT_STORE_BYTES, DEFAULT_STORE_WAIT)));
        Arc::clone(&GLOBAL)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a pickle that arrived in full (and wakes lookups waiting for it).
    pub fn insert(&self, pickled: &PickledCallable) {
        let mut entries = self.lock();
        if entries.pickles.get(pickled.digest()).is_none() {
            entries.bytes += pickled.bytes().len();
            entries.pickles.push(*pickled.digest(), pickled.clone());
            while entries.bytes > self.capacity_bytes && entries.pickles.len() > 1 {
                match entries.pickles.pop_lru() {
                    Some((_, old)) => entries.bytes -= old.bytes().len(),
                    None => break,
                }
            }
        }
        self.arrived.notify_all();
    }

    /// Whether the store holds exactly `pickle` under `digest` (so its digest
    /// need not be computed again). Does not wait.
    pub fn holds(&self, digest: &[u8; 32], pickle: &[u8]) -> bool {
        let held = self.lock().pickles.peek(digest).cloned();
        held.is_some_and(|held| held.bytes().as_ref() == pickle)
    }

    /// Whether the store holds `digest` now (does not wait, does not touch its recency).
    pub fn contains(&self, digest: &[u8; 32]) -> bool {
        self.lock().pickles.contains(digest)
    }

    /// The pickle with `digest`, waiting for it while it may still be in flight.
    pub fn get(&self, digest: &[u8; 32]) -> Option<PickledCallable> {
        let deadline = Instant::now() + self.wait;
        let mut entries = self.lock();
        loop {
            if let Some(found) = entries.pickles.get(digest) {
                self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Some(found.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(
                    digest = %short_hex(digest),
                    "a plan names a Python UDF pickle this process never received"
                );
                return None;
            }
            entries = self
                .arrived
                .wait_timeout(entries, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// `(pickles held, their bytes, lookups answered)`.
    pub fn stats(&self) -> (usize, usize, u64) {
        let entries = self.lock();
        (
            entries.pickles.len(),
            entries.bytes,
            self.hits.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// How long [`Self::get`] waits for a pickle in flight.
    pub fn wait(&self) -> Duration {
        self.wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pickled::{sha256, PickleContent, PicklerVersions};

    fn pickle(byte: u8, len: usize) -> PickledCallable {
        let bytes = vec![byte; len];
        PickledCallable::new(
            bytes.clone().into(),
            sha256(&bytes),
            PicklerVersions {
                python_major: 3,
                python_minor: 11,
                cloudpickle_major: 3,
            },
            PickleContent::Callable,
        )
    }

    #[test]
    fn a_lookup_waits_for_a_pickle_in_flight_and_gives_up_after_the_wait() {
        let store = Arc::new(PayloadStore::new(1 << 20, Duration::from_millis(300)));
        let late = pickle(1, 10);
        let digest = *late.digest();
        let sender = Arc::clone(&store);
        let arrives = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            sender.insert(&late);
        });
        assert!(store.get(&digest).is_some(), "found once it arrived");
        arrives.join().unwrap();
        let started = Instant::now();
        assert!(store.get(&[9; 32]).is_none());
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[test]
    fn the_store_is_bounded_by_bytes() {
        let store = PayloadStore::new(250, Duration::from_millis(1));
        let (a, b, c) = (pickle(1, 100), pickle(2, 100), pickle(3, 100));
        for p in [&a, &b, &c] {
            store.insert(p);
        }
        assert!(store.get(a.digest()).is_none(), "the oldest was dropped");
        assert!(store.get(b.digest()).is_some() && store.get(c.digest()).is_some());
    }
}
