//! The per-process cache of unpickled callables, keyed by the SHA-256 of
//! their pickle and bounded by the bytes of those pickles.
//!
//! A worker decodes the same stage plan once per task; without this cache
//! every task would run `cloudpickle.loads` again (as datafusion-python does).
//! Each digest is loaded at most once while it stays cached, even when tasks
//! race: the entry is a [`PyOnceLock`], which detaches from the interpreter
//! while it waits, so a loader that releases the GIL cannot deadlock.
//!
//! Payloads may be up to 100 MiB, so a count of entries says little about
//! memory: the cache weighs each entry by its pickle's size (what an
//! unpickled closure holds is usually about as large) and evicts the least
//! recently used entries beyond [`DEFAULT_CACHE_BYTES`]. An entry larger than
//! the whole budget is still loaded and kept alone, so a big UDF is not
//! unpickled again on every call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use datafusion::error::Result;
use lru::LruCache;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

/// How many bytes of pickles the process-wide cache keeps by default.
pub const DEFAULT_CACHE_BYTES: usize = 256 * 1024 * 1024;

/// The least weight of an entry: a tiny pickle still costs a function object.
const MIN_ENTRY_BYTES: usize = 1024;

type Slot = Arc<PyOnceLock<Py<PyAny>>>;

struct Entries {
    slots: LruCache<[u8; 32], (Slot, usize)>,
    bytes: usize,
}

/// A byte-bounded LRU of unpickled Python objects, keyed by content digest.
pub struct CallableCache {
    entries: Mutex<Entries>,
    capacity_bytes: usize,
    loads: AtomicU64,
    hits: AtomicU64,
}

impl std::fmt::Debug for CallableCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallableCache")
            .field("capacity_bytes", &self.capacity_bytes)
            .field("stats", &self.stats())
            .finish()
    }
}

/// What a [`CallableCache`] has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Objects unpickled (cache misses that ran the loader successfully).
    pub loads: u64,
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Objects held now.
    pub entries: usize,
    /// Bytes of the pickles of the objects held now.
    pub bytes: usize,
}

impl CallableCache {
    /// A cache holding pickles of at most `capacity_bytes` in all (it still
    /// keeps the most recent entry when that one alone is larger).
    pub fn new(capacity_bytes: usize) -> Self {
        Self {
            entries: Mutex::new(Entries {
                slots: LruCache::unbounded(),
                bytes: 0,
            }),
            capacity_bytes,
            loads: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        }
    }

    /// The process-wide cache every codec uses unless given another.
    pub fn global() -> Arc<Self> {
        static GLOBAL: LazyLock<Arc<CallableCache>> =
            LazyLock::new(|| Arc::new(CallableCache::new(DEFAULT_CACHE_BYTES)));
        Arc::clone(&GLOBAL)
    }

    pub fn capacity_bytes(&self) -> usize {
        self.capacity_bytes
    }

    pub fn stats(&self) -> CacheStats {
        let entries = self.lock();
        CacheStats {
            loads: self.loads.load(Ordering::Relaxed),
            hits: self.hits.load(Ordering::Relaxed),
            entries: entries.slots.len(),
            bytes: entries.bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // The critical sections never panic, but a poisoned map is still a valid map.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The object cached under `digest`, loading it with `load` on a miss.
    /// `pickle_bytes` is the size of the pickle `load` reads, the entry's weight.
    pub(crate) fn get_or_load<'py>(
        &self,
        py: Python<'py>,
        digest: &[u8; 32],
        pickle_bytes: usize,
        load: impl FnOnce() -> Result<Py<PyAny>>,
    ) -> Result<Bound<'py, PyAny>> {
        let (slot, evicted) = {
            let mut entries = self.lock();
            match entries.slots.get(digest) {
                Some((slot, _)) => (Arc::clone(slot), Vec::new()),
                None => {
                    let slot: Slot = Arc::new(PyOnceLock::new());
                    let weight = pickle_bytes.max(MIN_ENTRY_BYTES);
                    entries.slots.push(*digest, (Arc::clone(&slot), weight));
                    entries.bytes += weight;
                    let mut evicted = Vec::new();
                    while entries.bytes > self.capacity_bytes && entries.slots.len() > 1 {
                        let Some((_, (old, old_weight))) = entries.slots.pop_lru() else {
                            break;
                        };
                        entries.bytes -= old_weight;
                        evicted.push(old);
                    }
                    (slot, evicted)
                }
            }
        };
        // Dropping a Python object can run Python code: never under our lock.
        drop(evicted);
        if let Some(object) = slot.get(py) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(object.bind(py).clone());
        }
        let mut loaded_here = false;
        let object = slot.get_or_try_init(py, || {
            let object = load()?;
            loaded_here = true;
            self.loads.fetch_add(1, Ordering::Relaxed);
            Ok::<_, datafusion::error::DataFusionError>(object)
        });
        match object {
            Ok(object) => {
                if !loaded_here {
                    // Another task loaded it while this one waited.
                    self.hits.fetch_add(1, Ordering::Relaxed);
                }
                Ok(object.bind(py).clone())
            }
            Err(error) => {
                // A failed load must not hold budget: forget the empty slot
                // (unless a concurrent loader has filled it meanwhile).
                let mut entries = self.lock();
                let empty = entries
                    .slots
                    .peek(digest)
                    .is_some_and(|(found, _)| Arc::ptr_eq(found, &slot) && found.get(py).is_none());
                if empty {
                    if let Some((_, weight)) = entries.slots.pop(digest) {
                        entries.bytes -= weight;
                    }
                }
                Err(error)
            }
        }
    }
}
