//! The per-process cache of unpickled callables, keyed by the SHA-256 of
//! their pickle.
//!
//! A worker decodes the same stage plan once per task; without this cache
//! every task would run `cloudpickle.loads` again (as datafusion-python does).
//! Each digest is loaded at most once while it stays cached, even when tasks
//! race: the entry is a [`PyOnceLock`], which detaches from the interpreter
//! while it waits, so a loader that releases the GIL cannot deadlock.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use datafusion::error::Result;
use lru::LruCache;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

/// How many callables the process-wide cache keeps by default.
pub const DEFAULT_CACHE_CAPACITY: usize = 1024;

type Slot = Arc<PyOnceLock<Py<PyAny>>>;

/// A bounded LRU of unpickled Python objects, keyed by content digest.
#[derive(Debug)]
pub struct CallableCache {
    slots: Mutex<LruCache<[u8; 32], Slot>>,
    loads: AtomicU64,
    hits: AtomicU64,
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
}

impl CallableCache {
    /// A cache holding at most `capacity` objects (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        Self {
            slots: Mutex::new(LruCache::new(capacity)),
            loads: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        }
    }

    /// The process-wide cache every codec uses unless given another.
    pub fn global() -> Arc<Self> {
        static GLOBAL: LazyLock<Arc<CallableCache>> =
            LazyLock::new(|| Arc::new(CallableCache::new(DEFAULT_CACHE_CAPACITY)));
        Arc::clone(&GLOBAL)
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            loads: self.loads.load(Ordering::Relaxed),
            hits: self.hits.load(Ordering::Relaxed),
            entries: self.lock().len(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<[u8; 32], Slot>> {
        // The critical sections never panic, but a poisoned map is still a valid map.
        self.slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The object cached under `digest`, loading it with `load` on a miss.
    pub(crate) fn get_or_load<'py>(
        &self,
        py: Python<'py>,
        digest: &[u8; 32],
        load: impl FnOnce() -> Result<Py<PyAny>>,
    ) -> Result<Bound<'py, PyAny>> {
        let (slot, evicted) = {
            let mut slots = self.lock();
            match slots.get(digest) {
                Some(slot) => (Arc::clone(slot), None),
                None => {
                    let slot: Slot = Arc::new(PyOnceLock::new());
                    let evicted = slots.push(*digest, Arc::clone(&slot));
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
        let object = slot.get_or_try_init(py, || {
            let object = load()?;
            self.loads.fetch_add(1, Ordering::Relaxed);
            Ok::<_, datafusion::error::DataFusionError>(object)
        })?;
        Ok(object.bind(py).clone())
    }
}
