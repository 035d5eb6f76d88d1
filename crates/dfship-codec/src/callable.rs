//! A Python callable that is either live, pickled, or both.
//!
//! A UDF created from a function holds it live and pickles it once, on first
//! encode. A UDF decoded from a plan holds only the pickle and unpickles it on
//! first call (through the [`CallableCache`]), so decoding needs no Python and
//! a coordinator that only plans never runs `cloudpickle.loads`.

use std::sync::{Arc, OnceLock};

use datafusion::error::{DataFusionError, Result};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use crate::cache::CallableCache;
use crate::error::UdfPayloadError;
use crate::pickled::{sha256, short_hex, PickleContent, PickledCallable};
use crate::python;
use crate::store::PayloadStore;

pub(crate) struct PythonCallable {
    live: PyOnceLock<Py<PyAny>>,
    pickled: OnceLock<PickledCallable>,
    /// For a callable a plan names by digest: where its pickle is kept.
    reference: Option<(Arc<PayloadStore>, [u8; 32])>,
    cache: Arc<CallableCache>,
}

impl std::fmt::Debug for PythonCallable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PythonCallable")
            .field("digest", &self.pickled.get().map(|p| p.short_digest()))
            .field(
                "pickled_bytes",
                &self.pickled.get().map(|p| p.bytes().len()),
            )
            .finish_non_exhaustive()
    }
}

impl PythonCallable {
    pub(crate) fn from_live(callable: Bound<'_, PyAny>) -> Self {
        let live = PyOnceLock::new();
        // A fresh cell cannot be full.
        let _ = live.set(callable.py(), callable.unbind());
        Self {
            live,
            pickled: OnceLock::new(),
            reference: None,
            cache: CallableCache::global(),
        }
    }

    pub(crate) fn from_pickle(pickled: PickledCallable, cache: Arc<CallableCache>) -> Self {
        let cell = OnceLock::new();
        let _ = cell.set(pickled);
        Self {
            live: PyOnceLock::new(),
            pickled: cell,
            reference: None,
            cache,
        }
    }

    /// A callable whose pickle this process received earlier, in another
    /// frame, and keeps in `store`.
    pub(crate) fn from_reference(
        digest: [u8; 32],
        store: Arc<PayloadStore>,
        cache: Arc<CallableCache>,
    ) -> Self {
        Self {
            live: PyOnceLock::new(),
            pickled: OnceLock::new(),
            reference: Some((store, digest)),
            cache,
        }
    }

    /// The digest, when the callable has been pickled (or came pickled, or named).
    pub(crate) fn digest(&self) -> Option<&[u8; 32]> {
        self.pickled
            .get()
            .map(PickledCallable::digest)
            .or(self.reference.as_ref().map(|(_, digest)| digest))
    }

    /// The same callable: equal digests, or the very same live Python object.
    pub(crate) fn same_as(&self, other: &Self) -> bool {
        match (self.digest(), other.digest()) {
            (Some(a), Some(b)) => a == b,
            _ if std::ptr::eq(self, other) => true,
            // Live objects exist only where an interpreter runs.
            _ if !python::is_running() => false,
            _ => Python::attach(|py| match (self.live.get(py), other.live.get(py)) {
                (Some(a), Some(b)) => a.is(b),
                _ => false,
            }),
        }
    }

    /// The callable, unpickling it on first use.
    pub(crate) fn get<'py>(&self, py: Python<'py>, udf_name: &str) -> Result<Bound<'py, PyAny>> {
        if let Some(live) = self.live.get(py) {
            return Ok(live.bind(py).clone());
        }
        let pickled = self.pickled(udf_name)?;
        let object = load_pickle(py, &self.cache, pickled, udf_name)?;
        let live = self.live.get_or_init(py, || object.unbind());
        Ok(live.bind(py).clone())
    }

    /// The pickle: fetched from the store for a callable named by digest,
    /// pickled from the live callable on first use otherwise.
    pub(crate) fn pickled(&self, udf_name: &str) -> Result<&PickledCallable> {
        if let Some(pickled) = self.pickled.get() {
            return Ok(pickled);
        }
        if let Some((store, digest)) = &self.reference {
            let pickled = store
                .get(digest)
                .ok_or_else(|| UdfPayloadError::MissingPickle {
                    name: udf_name.to_string(),
                    digest: short_hex(digest),
                    waited_secs: store.wait().as_secs(),
                })?;
            return Ok(self.pickled.get_or_init(|| pickled));
        }
        python::ensure_python()?;
        let pickled = Python::attach(|py| -> Result<PickledCallable> {
            let live = self.live.get(py).ok_or_else(|| {
                DataFusionError::Internal(format!(
                    "Python UDF '{udf_name}' has neither a callable nor a pickle"
                ))
            })?;
            let pickle_error = |e: PyErr| UdfPayloadError::Pickle {
                name: udf_name.to_string(),
                detail: python::describe_exception(py, &e),
            };
            let bytes = python::dumps(py, live.bind(py)).map_err(pickle_error)?;
            let versions = python::local_versions(py).map_err(pickle_error)?;
            let digest = sha256(&bytes);
            Ok(PickledCallable::new(
                bytes.into(),
                digest,
                versions,
                PickleContent::Callable,
            ))
        })?;
        Ok(self.pickled.get_or_init(|| pickled))
    }
}

/// Unpickles `pickled` through `cache`, after checking that this process can
/// load what that pickler wrote. Returns the unpickled object (for a
/// datafusion-python payload, the whole tuple).
pub(crate) fn load_pickle<'py>(
    py: Python<'py>,
    cache: &CallableCache,
    pickled: &PickledCallable,
    udf_name: &str,
) -> Result<Bound<'py, PyAny>> {
    let local = python::local_versions(py).map_err(|e| UdfPayloadError::Unpickle {
        name: udf_name.to_string(),
        detail: python::describe_exception(py, &e),
    })?;
    pickled.versions().check_loadable_by(udf_name, local)?;
    cache.get_or_load(py, pickled.digest(), pickled.bytes().len(), || {
        python::loads(py, pickled.bytes()).map_err(|e| unpickle_error(py, udf_name, &e).into())
    })
}

pub(crate) fn unpickle_error(py: Python<'_>, udf_name: &str, error: &PyErr) -> UdfPayloadError {
    match python::missing_module(py, error) {
        Some(module) => UdfPayloadError::ModuleNotFound {
            name: udf_name.to_string(),
            module,
        },
        None => UdfPayloadError::Unpickle {
            name: udf_name.to_string(),
            detail: python::describe_exception(py, error),
        },
    }
}
