//! In-process mode: this process's own interpreter, called from a small
//! pool of dedicated threads rather than from the engine's threads. One GIL
//! serializes the calls (UDFs that release it, like most of
//! `pyarrow.compute`, still overlap); there is no isolation and no timeout.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use arrow::array::ArrayData;
use arrow::datatypes::DataType;
use datafusion::error::{DataFusionError, Result};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyBytes;

use crate::callable::PythonCallable;
use crate::execution::pool::runner_error;
use crate::execution::protocol::{self, RunnerErrorClass};
use crate::execution::runner::RUNNER_SOURCE;
use crate::python;
use crate::result_check::invalid_array;

type Job = Box<dyn FnOnce() + Send>;

pub(crate) struct InterpreterThreads {
    jobs: Mutex<Sender<Job>>,
}

impl InterpreterThreads {
    pub(crate) fn new(threads: usize) -> Self {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for index in 0..threads.max(1) {
            let queue: Arc<Mutex<Receiver<Job>>> = Arc::clone(&queue);
            let spawned = std::thread::Builder::new()
                .name(format!("dfship-python-{index}"))
                .spawn(move || loop {
                    let job = {
                        let queue = queue.lock().unwrap_or_else(|p| p.into_inner());
                        queue.recv()
                    };
                    match job {
                        // A panicking call drops its reply (the caller gets
                        // an error); the thread serves on.
                        Ok(job) => {
                            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                        }
                        Err(_) => return,
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a Python interpreter thread");
            }
        }
        Self {
            jobs: Mutex::new(jobs),
        }
    }

    /// Runs `call` on an interpreter thread and waits for its result.
    pub(crate) fn run(
        &self,
        call: impl FnOnce() -> Result<ArrayData> + Send + 'static,
    ) -> Result<ArrayData> {
        let (reply, result) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = reply.send(call());
        });
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .map_err(|_| {
                DataFusionError::Internal("the Python interpreter threads have stopped".to_string())
            })?;
        result.recv().map_err(|_| {
            DataFusionError::Internal(
                "a Python interpreter thread stopped during a UDF call".to_string(),
            )
        })?
    }
}

/// An `AGGREGATE` or `WINDOW` message (`message`, and `body` after the
/// digest) evaluated in this process's interpreter by the runner's own code
/// (`stateless_call` of `python/dfship/_runner.py`), so both modes behave
/// alike; its answer or failure is read as a runner's would be.
pub(crate) fn stateless_call(
    callable: &PythonCallable,
    udf_name: &str,
    returns: &DataType,
    message: u8,
    body: &[u8],
) -> Result<ArrayData> {
    let failed = |class: Option<RunnerErrorClass>, text: &str| {
        runner_error(udf_name, returns, class, text, None)
    };
    python::ensure_python()?;
    let reply = Python::attach(|py| {
        let factory = callable.get(py, udf_name)?;
        let describe = |e: PyErr| {
            failed(
                Some(RunnerErrorClass::Protocol),
                &python::describe_exception(py, &e),
            )
        };
        let module = runner_module(py).map_err(describe)?;
        let pyarrow = py.import("pyarrow").map_err(describe)?;
        match module.call_method1(
            "stateless_call",
            (pyarrow, message, factory, PyBytes::new(py, body)),
        ) {
            Ok(reply) => reply.extract::<Vec<u8>>().map_err(describe),
            // The runner code raises `Failure(error_class, text)` for every
            // failure it reports; anything else is a fault of that code.
            Err(error) => {
                let value = error.value(py);
                let class = value
                    .getattr("error_class")
                    .and_then(|c| c.extract::<u8>())
                    .ok()
                    .and_then(RunnerErrorClass::from_code);
                match (
                    class,
                    value.getattr("text").and_then(|t| t.extract::<String>()),
                ) {
                    (Some(class), Ok(text)) => Err(failed(Some(class), &text)),
                    _ => Err(describe(error)),
                }
            }
        }
    })?;
    protocol::decode_result(reply).map_err(|detail| invalid_array(udf_name, &detail))
}

/// `python/dfship/_runner.py` as a module of this interpreter (loaded once).
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
