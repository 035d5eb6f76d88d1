//! In-process mode: this process's own interpreter, called from a small
//! pool of dedicated threads rather than from the engine's threads. One GIL
//! serializes the calls (UDFs that release it, like most of
//! `pyarrow.compute`, still overlap); there is no isolation and no timeout.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use arrow::array::ArrayData;
use datafusion::error::{DataFusionError, Result};

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
