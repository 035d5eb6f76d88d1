//! Where Python UDFs run: a pool of runner processes (the default), or this
//! process's own interpreter on a dedicated thread pool.
//!
//! DataFusion calls a scalar UDF synchronously, from inside the poll of a
//! stream on one of the engine's (tokio) threads. Both modes hand the call
//! to someone else — a runner process, or an interpreter thread — and wait
//! with [`tokio::task::block_in_place`], which first moves the runtime's
//! other work off the waiting thread, so the engine keeps running while
//! Python does. In the pool, Python runs in as many processes as there are
//! runners, so GIL-bound UDFs use every core, and a UDF that crashes, hangs
//! or exhausts memory costs one runner, not the process.
//!
//! Each process that executes stages owns one executor, configured once at
//! start-up with [`configure_python_execution`] (workers do it from their
//! flags); a process that never configures it gets
//! [`PythonExecution::default`] on its first Python call.

mod in_process;
mod pool;
mod protocol;
mod runner;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::Duration;

use arrow::array::{ArrayData, ArrayRef};
use arrow::datatypes::DataType;
use datafusion::common::config::ConfigExtension;
use datafusion::common::extensions_options;
use datafusion::error::{DataFusionError, Result};

use crate::callable::PythonCallable;

pub use pool::PoolStats;

/// How a process evaluates Python UDFs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PythonMode {
    /// In runner processes (`python/dfship/_runner.py`): every core, isolated.
    #[default]
    Pool,
    /// In this process's interpreter, on a dedicated thread pool: for
    /// debugging and tiny UDFs (one GIL, no isolation).
    InProcess,
}

impl std::str::FromStr for PythonMode {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match text {
            "pool" => Ok(Self::Pool),
            "in-process" => Ok(Self::InProcess),
            other => Err(format!(
                "unknown Python mode '{other}'; use 'pool' or 'in-process'"
            )),
        }
    }
}

/// How a process evaluates Python UDFs (see the module docs).
///
/// ```
/// use std::time::Duration;
/// use dfship_codec::{PythonExecution, PythonMode};
///
/// let execution = PythonExecution::default()
///     .with_runners(4)
///     .with_udf_timeout(Some(Duration::from_secs(60)))
///     .with_runner_memory_limit(Some(2 << 30));
/// assert_eq!(execution.mode, PythonMode::Pool);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PythonExecution {
    pub mode: PythonMode,
    /// Runner processes (pool) or interpreter threads (in-process); at least one.
    pub runners: usize,
    /// How long one call (one batch) may run before its runner is killed (pool only).
    pub udf_timeout: Option<Duration>,
    /// The most memory (bytes of data segment, `RLIMIT_DATA`) a runner may use (pool only).
    pub runner_memory_limit: Option<u64>,
    /// The Python interpreter runners run: an ordinary `python` of the
    /// environment whose packages UDFs import.
    pub python: PathBuf,
}

impl Default for PythonExecution {
    /// The pool, one runner per core this process may use, the Python of
    /// `$VIRTUAL_ENV` (else `python3` on the `PATH`), no timeout, no memory limit.
    fn default() -> Self {
        Self {
            mode: PythonMode::Pool,
            runners: default_runners(),
            udf_timeout: None,
            runner_memory_limit: None,
            python: default_python(),
        }
    }
}

impl PythonExecution {
    pub fn with_mode(mut self, mode: PythonMode) -> Self {
        self.mode = mode;
        self
    }

    pub fn with_runners(mut self, runners: usize) -> Self {
        self.runners = runners.max(1);
        self
    }

    pub fn with_udf_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.udf_timeout = timeout;
        self
    }

    pub fn with_runner_memory_limit(mut self, bytes: Option<u64>) -> Self {
        self.runner_memory_limit = bytes;
        self
    }

    pub fn with_python(mut self, python: impl Into<PathBuf>) -> Self {
        self.python = python.into();
        self
    }
}

/// The cores this process may use.
pub fn default_runners() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// `$VIRTUAL_ENV/bin/python` when it exists, else `python3`.
pub fn default_python() -> PathBuf {
    std::env::var_os("VIRTUAL_ENV")
        .map(|venv| PathBuf::from(venv).join("bin").join("python"))
        .filter(|python| python.exists())
        .unwrap_or_else(|| PathBuf::from("python3"))
}

enum Executor {
    Pool(pool::RunnerPool),
    InProcess(in_process::InterpreterThreads),
}

static EXECUTOR: OnceLock<(PythonExecution, Executor)> = OnceLock::new();

fn build(config: PythonExecution) -> (PythonExecution, Executor) {
    let executor = match config.mode {
        PythonMode::Pool => Executor::Pool(pool::RunnerPool::new(config.clone())),
        PythonMode::InProcess => {
            Executor::InProcess(in_process::InterpreterThreads::new(config.runners))
        }
    };
    (config, executor)
}

/// Sets how this process evaluates Python UDFs. Call it once, before the
/// first Python UDF runs; calling it again with the same settings is fine.
pub fn configure_python_execution(config: PythonExecution) -> Result<()> {
    let config = config.clone().with_runners(config.runners);
    let (active, _) = EXECUTOR.get_or_init(|| build(config.clone()));
    if *active == config {
        Ok(())
    } else {
        Err(DataFusionError::Configuration(format!(
            "Python UDF execution is already set up in this process ({active:?}); configure it \
             once, before the first query"
        )))
    }
}

/// How this process evaluates Python UDFs (configuring the default if nothing did).
pub fn python_execution() -> &'static PythonExecution {
    &executor().0
}

/// Starts what Python UDFs will run on now, so a broken environment fails
/// at start-up rather than at the first query: every runner of the pool
/// (each imports pyarrow and cloudpickle), or the embedded interpreter.
pub fn start_python() -> Result<()> {
    match &executor().1 {
        Executor::Pool(pool) => pool.warm_up(),
        Executor::InProcess(_) => crate::python::ensure_python(),
    }
}

/// What the runner pool has done, when this process uses one.
pub fn runner_pool_stats() -> Option<PoolStats> {
    match &EXECUTOR.get()?.1 {
        Executor::Pool(pool) => Some(pool.stats()),
        Executor::InProcess(_) => None,
    }
}

fn executor() -> &'static (PythonExecution, Executor) {
    EXECUTOR.get_or_init(|| build(PythonExecution::default()))
}

/// Runs `wait` — which blocks until Python is done — without holding up
/// the engine: on a multi-threaded tokio runtime the thread's other work
/// moves to another thread first.
fn wait_off_runtime<T>(wait: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}

/// One call of a Python UDF on one batch: the arguments as arrays of the
/// batch's length. Returns the result unchecked (the caller validates it).
pub(crate) fn evaluate(
    udf_name: &str,
    returns: &DataType,
    callable: &Arc<PythonCallable>,
    arrays: &[ArrayRef],
    number_rows: usize,
    task: Option<&str>,
) -> Result<ArrayData> {
    match &executor().1 {
        Executor::Pool(pool) => {
            let arguments = protocol::encode_arguments(arrays, number_rows)?;
            let cancel = task.map(task_token);
            let message = (protocol::CALL, arguments.as_slice());
            in_pool(
                pool,
                udf_name,
                returns,
                callable,
                message,
                number_rows,
                cancel.as_ref(),
            )
        }
        Executor::InProcess(threads) => {
            let callable = Arc::clone(callable);
            let arrays = arrays.to_vec();
            let name = udf_name.to_string();
            let returns = returns.clone();
            wait_off_runtime(|| threads.run(move || callable.call(&name, &returns, &arrays)))
        }
    }
}

/// What a stateless call of an aggregate or window UDF works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StatelessKind {
    /// The callable is an accumulator factory.
    Aggregate,
    /// The callable is a window evaluator factory.
    Window,
}

/// One op of an aggregate or window UDF (`python/dfship/_runner.py`,
/// `_aggregate` and `_window`, documents the ops and their batches). All the
/// state it needs travels in `batches`, so any runner may serve it. Returns
/// the one result column, unchecked.
pub(crate) fn stateless(
    udf_name: &str,
    returns: &DataType,
    callable: &Arc<PythonCallable>,
    kind: StatelessKind,
    op: u8,
    batches: &[arrow::array::RecordBatch],
    number_rows: usize,
) -> Result<ArrayData> {
    let message = match kind {
        StatelessKind::Aggregate => protocol::AGGREGATE,
        StatelessKind::Window => protocol::WINDOW,
    };
    let body = protocol::encode_op(op, batches)?;
    match &executor().1 {
        Executor::Pool(pool) => {
            let message = (message, body.as_slice());
            in_pool(
                pool,
                udf_name,
                returns,
                callable,
                message,
                number_rows,
                None,
            )
        }
        Executor::InProcess(threads) => {
            let callable = Arc::clone(callable);
            let name = udf_name.to_string();
            let returns = returns.clone();
            wait_off_runtime(|| {
                threads.run(move || {
                    in_process::stateless_call(&callable, &name, &returns, message, &body)
                })
            })
        }
    }
}

/// Sends `message` (its kind, and its body after the digest) to a runner of
/// `pool`, off the async runtime.
fn in_pool(
    pool: &'static pool::RunnerPool,
    udf_name: &str,
    returns: &DataType,
    callable: &PythonCallable,
    (message, body): (u8, &[u8]),
    number_rows: usize,
    cancel: Option<&CancelToken>,
) -> Result<ArrayData> {
    let pickled = callable.pickled(udf_name)?;
    wait_off_runtime(|| {
        pool.call(&pool::RunnerCall {
            udf_name,
            returns,
            pickled,
            message,
            body,
            number_rows,
            cancel,
        })
    })
}

extensions_options! {
    /// Settings dfship attaches to each task a worker runs (`dfship.*`).
    pub struct TaskOptions {
        /// Identifies the task, so its Python calls stop when its query is cancelled.
        pub task_id: String, default = String::new()
    }
}

impl ConfigExtension for TaskOptions {
    const PREFIX: &'static str = "dfship";
}

/// Set when the task a call belongs to is over (cancelled, or finished).
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

static TASKS: LazyLock<Mutex<HashMap<String, CancelToken>>> = LazyLock::new(Default::default);

/// The token of task `id` (created on first use).
pub fn task_token(id: &str) -> CancelToken {
    let mut tasks = TASKS.lock().unwrap_or_else(|p| p.into_inner());
    tasks.entry(id.to_string()).or_default().clone()
}

/// How many ended tasks are remembered (so their late calls fail too)
/// before they are forgotten.
const ENDED_TASKS_KEPT: usize = 16_384;

/// Ends task `id`: its Python calls still running are stopped (their
/// runners killed and replaced), and calls it makes later fail at once.
pub fn end_task(id: &str) {
    let mut tasks = TASKS.lock().unwrap_or_else(|p| p.into_inner());
    tasks.entry(id.to_string()).or_default().cancel();
    if tasks.len() > ENDED_TASKS_KEPT {
        tasks.retain(|_, token| !token.is_cancelled());
    }
}
