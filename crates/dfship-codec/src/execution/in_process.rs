//! In-process mode: runners served on threads of this process's own
//! interpreter. Each thread runs the runner's `serve` over its end of a
//! socket pair, exactly as a runner process would, so UDFs behave the same
//! in both modes. One GIL serializes them (UDFs that release it, like most of
//! `pyarrow.compute`, still overlap); there is no isolation and no timeout.

use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use dfship_runtime::{InProcessRunner, RUNNER_SOURCE};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;

use crate::python;

/// Serves the runner protocol on a socket in this interpreter.
pub(crate) fn runner() -> InProcessRunner {
    Arc::new(|socket: UnixStream| {
        python::ensure_python().map_err(|e| e.to_string())?;
        let fd = socket.into_raw_fd();
        Python::attach(|py| -> PyResult<()> {
            // The Python socket object owns the descriptor from here on.
            let kwargs = PyDict::new(py);
            kwargs.set_item("fileno", fd)?;
            let socket = py
                .import("socket")?
                .getattr("socket")?
                .call((), Some(&kwargs))?;
            runner_module(py)?.call_method1("serve", (socket,))?;
            Ok(())
        })
        .map_err(|e| e.to_string())
    })
}

/// The runner's source as a module of this interpreter (loaded once; not
/// `__main__`, so it leaves `sys.path` and signals alone).
fn runner_module(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    static MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
    MODULE
        .get_or_try_init(py, || {
            let source = std::ffi::CString::new(RUNNER_SOURCE)
                .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
            Ok(PyModule::from_code(py, &source, c"dfship_runner.py", c"dfship_runner")?.unbind())
        })
        .map(|module| module.bind(py))
}
