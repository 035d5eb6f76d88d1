//! Where Python UDFs run: this process's runner pool (`dfship-runtime`),
//! whose runners are child processes (the default) or threads of this
//! process's own interpreter (in-process mode). Both modes run the same
//! runner code and speak the same protocol, so a UDF behaves the same in
//! either; only isolation differs.
//!
//! DataFusion calls UDFs synchronously, from inside the poll of a stream on
//! one of the engine's (tokio) threads. A call is handed to the pool and
//! waited for with [`tokio::task::block_in_place`], which first moves the
//! runtime's other work off the waiting thread, so the engine keeps running
//! while Python does.
//!
//! Each process that executes stages owns one pool, configured once at
//! start-up with [`configure_python_execution`] (workers do it from their
//! flags); a process that never configures it gets
//! [`PythonExecution::default`] on its first Python call.
//!
//! - `calls`: scalar UDF calls (sliced by `batch_size`, slices in flight
//!   together) and window evaluator calls, each stateless;
//! - `objects`: an aggregate's accumulators, living in one runner;
//! - `errors`: what users read when a call fails;
//! - `in_process`: the runner served on a thread of this interpreter;
//! - `output`: what UDFs print, from the runner to the query's client.

mod calls;
mod errors;
mod figures;
mod in_process;
mod objects;
mod output;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::Duration;

use datafusion::common::config::ConfigExtension;
use datafusion::common::extensions_options;
use datafusion::error::{DataFusionError, Result};
use dfship_runtime::protocol::{CONTENT_CALLABLE, CONTENT_DATAFUSION_TUPLE};
use dfship_runtime::{
    FunctionSpec, Launcher, PoolConfig, ProcessSettings, RunnerPool, RunnerVersions,
    DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_REPLY_BYTES,
};

use crate::function::PythonFunction;
use crate::pickled::PickleContent;

pub(crate) use calls::{call_scalar, call_window, convert_to_state};
pub use dfship_runtime::{CancelToken, PoolStats};
pub(crate) use figures::record as record_udf_figures;
pub use figures::{label_task, query_figures, udf_figures, TaskLabel, UdfFigures};
pub(crate) use objects::RunnerObject;
pub(crate) use output::sink_for as output_sink;
pub use output::{
    bind_task_output, forget_query_output, set_query_output, take_query_output, OutputLimits,
    OutputLine, OutputOrigin, TakenOutput, UdfOutputMode, DEFAULT_OUTPUT_BYTES,
    DEFAULT_OUTPUT_LINES,
};

/// How a process evaluates Python UDFs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PythonMode {
    /// In runner processes: every core, isolated (a crash, a hang or a
    /// memory blow-up costs one runner).
    #[default]
    Pool,
    /// In threads of this process's interpreter: for debugging and tiny
    /// UDFs (one GIL, no isolation, no timeout).
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
    /// How long one call (one batch) may run before its runner is killed
    /// (pool only; default [`dfship_runtime::DEFAULT_CALL_TIMEOUT`], `None`
    /// for no limit).
    pub udf_timeout: Option<Duration>,
    /// The bytes of replies all runners may be sending at once (pool only;
    /// default [`dfship_runtime::DEFAULT_REPLY_BYTES_IN_FLIGHT`]).
    pub replies_in_flight: u64,
    /// Variables runner processes do not inherit, besides the cluster key
    /// (pool only): credentials UDFs have no business with.
    pub runner_env_deny: Vec<String>,
    /// The most memory (bytes of data segment, `RLIMIT_DATA`) a runner may use (pool only).
    pub runner_memory_limit: Option<u64>,
    /// The Python interpreter runners run: an ordinary `python` of the
    /// environment whose packages UDFs import.
    pub python: PathBuf,
    /// The user runner processes run as (pool only; `None`: this process's).
    pub runner_user: Option<dfship_runtime::RunnerUser>,
    /// Whether a runner serves the calls of one query only (pool only).
    pub isolation: dfship_runtime::Isolation,
}

impl Default for PythonExecution {
    /// The pool, one runner per core this process may use, the Python of
    /// `$VIRTUAL_ENV` (else `python3` on the `PATH`), calls of at most 10
    /// minutes, no memory limit.
    fn default() -> Self {
        Self {
            mode: PythonMode::Pool,
            runners: default_runners(),
            udf_timeout: Some(dfship_runtime::DEFAULT_CALL_TIMEOUT),
            replies_in_flight: dfship_runtime::DEFAULT_REPLY_BYTES_IN_FLIGHT,
            runner_env_deny: Vec::new(),
            runner_memory_limit: None,
            python: default_python(),
            runner_user: None,
            isolation: dfship_runtime::Isolation::Shared,
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

    /// See [`Self::replies_in_flight`].
    pub fn with_replies_in_flight(mut self, bytes: u64) -> Self {
        self.replies_in_flight = bytes.max(1);
        self
    }

    /// See [`Self::runner_env_deny`].
    pub fn with_runner_env_deny(mut self, names: Vec<String>) -> Self {
        self.runner_env_deny = names;
        self
    }

    pub fn with_runner_memory_limit(mut self, bytes: Option<u64>) -> Self {
        self.runner_memory_limit = bytes;
        self
    }

    /// Runner processes switch to `user` before they start Python (pool
    /// only; a process running as root should not run UDFs as root).
    pub fn with_runner_user(mut self, user: Option<dfship_runtime::RunnerUser>) -> Self {
        self.runner_user = user;
        self
    }

    /// `Query`: a runner serves one query's calls, then a fresh process
    /// replaces it (pool only).
    pub fn with_isolation(mut self, isolation: dfship_runtime::Isolation) -> Self {
        self.isolation = isolation;
        self
    }

    pub fn with_python(mut self, python: impl Into<PathBuf>) -> Self {
        self.python = python.into();
        self
    }

    fn pool_config(&self) -> PoolConfig {
        let launcher = match self.mode {
            PythonMode::Pool => Launcher::Process(ProcessSettings {
                python: self.python.clone(),
                memory_limit: self.runner_memory_limit,
                env_remove: std::iter::once(crate::auth::CLUSTER_KEY_ENV)
                    .chain(self.runner_env_deny.iter().map(String::as_str))
                    .map(Into::into)
                    .collect(),
                user: self.runner_user,
            }),
            PythonMode::InProcess => Launcher::InProcess(in_process::runner()),
        };
        let mut config = PoolConfig::new(self.runners, launcher);
        config.call_timeout = self.udf_timeout;
        config.reply_bytes_in_flight = self.replies_in_flight;
        config.isolation = self.isolation;
        // A runner cannot legitimately send more than it may hold.
        config.max_reply_bytes = self
            .runner_memory_limit
            .map_or(DEFAULT_MAX_REPLY_BYTES, |limit| {
                limit.min(DEFAULT_MAX_REPLY_BYTES)
            });
        config
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

static EXECUTOR: OnceLock<(PythonExecution, RunnerPool)> = OnceLock::new();

fn build(config: PythonExecution) -> (PythonExecution, RunnerPool) {
    let pool = RunnerPool::new(config.pool_config());
    (config, pool)
}

/// Sets how this process evaluates Python UDFs. Call it once, before the
/// first Python UDF runs; calling it again with the same settings is fine.
pub fn configure_python_execution(config: PythonExecution) -> Result<()> {
    let config = config.clone().with_runners(config.runners);
    if config.mode == PythonMode::InProcess && config.isolation == dfship_runtime::Isolation::Query
    {
        return Err(DataFusionError::Configuration(
            "--runner-isolation query needs runner processes: in-process mode runs every UDF in \
             this process's interpreter, which cannot be replaced between queries; use \
             --python-mode pool"
                .to_string(),
        ));
    }
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

/// Starts every runner now, so a broken environment fails at start-up
/// rather than at the first query (each runner imports pyarrow and cloudpickle).
pub fn start_python() -> Result<()> {
    if python_execution().mode == PythonMode::InProcess {
        crate::python::ensure_python()?;
    }
    pool().warm_up().map_err(DataFusionError::Configuration)
}

/// What this process's runner pool has done.
pub fn runner_pool_stats() -> Option<PoolStats> {
    EXECUTOR.get().map(|(_, pool)| pool.stats())
}

fn executor() -> &'static (PythonExecution, RunnerPool) {
    EXECUTOR.get_or_init(|| build(PythonExecution::default()))
}

pub(crate) fn pool() -> &'static RunnerPool {
    &executor().1
}

/// Runs `wait` — which blocks until Python is done — without holding up
/// the engine: on a multi-threaded tokio runtime the thread's other work
/// moves to another thread first.
pub(crate) fn wait_off_runtime<T>(wait: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}

/// What the pool needs to run `function` (built once per function): its
/// pickle, who pickled it, and its call options. May pickle a live callable
/// or look a pickle up: call it off the async runtime.
pub(crate) fn function_spec(function: &PythonFunction) -> Result<Arc<FunctionSpec>> {
    if let Some(spec) = function.spec.get() {
        return Ok(Arc::clone(spec));
    }
    let name = &function.signature.name;
    let pickled = function.callable.pickled(name)?;
    let versions = pickled.versions();
    let spec = Arc::new(FunctionSpec {
        name: name.clone(),
        digest: *pickled.digest(),
        content: match pickled.content() {
            PickleContent::Callable => CONTENT_CALLABLE,
            PickleContent::DataFusionPythonTuple => CONTENT_DATAFUSION_TUPLE,
        },
        pickle: pickled.bytes().clone(),
        versions: RunnerVersions {
            python_major: versions.python_major,
            python_minor: versions.python_minor,
            cloudpickle_major: versions.cloudpickle_major,
        },
        concurrency: function.options.concurrency.map(|n| usize::from(n.get())),
        environment: function.options.environment,
        max_in_flight: function
            .options
            .max_in_flight
            .map_or(DEFAULT_MAX_IN_FLIGHT, |n| usize::from(n.get())),
        // Only a stateless call of a UDF that gives the same answer again
        // may run twice (module docs of `dfship_runtime::scheduler`).
        replayable: function.signature.volatility != datafusion::logical_expr::Volatility::Volatile,
    });
    Ok(Arc::clone(function.spec.get_or_init(|| spec)))
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

static TASKS: LazyLock<Mutex<HashMap<String, CancelToken>>> = LazyLock::new(Default::default);

/// The live tasks of each tenant (query) that made calls, by task id.
static TENANTS: LazyLock<Mutex<HashMap<u64, HashSet<String>>>> = LazyLock::new(Default::default);

/// The tenant of task `id`: its query (from the coordinator's label), else
/// the task itself.
fn tenant_of(id: &str) -> u64 {
    match figures::query_of(id) {
        Some(query) => u64::from_le_bytes(query[..8].try_into().unwrap_or_default()),
        None => {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            id.hash(&mut hasher);
            hasher.finish()
        }
    }
}

/// The token of task `id` (created on first use, with the task's tenant).
pub fn task_token(id: &str) -> CancelToken {
    let mut tasks = TASKS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(token) = tasks.get(id) {
        return token.clone();
    }
    let tenant = tenant_of(id);
    let token = CancelToken::for_tenant(tenant);
    tasks.insert(id.to_string(), token.clone());
    TENANTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(tenant)
        .or_default()
        .insert(id.to_string());
    token
}

/// How many ended tasks are remembered (so their late calls fail too)
/// before they are forgotten.
const ENDED_TASKS_KEPT: usize = 16_384;

/// Ends task `id`: its Python calls still running are stopped, and calls
/// it makes later fail at once.
pub fn end_task(id: &str) {
    figures::task_ended(id);
    let tenant = {
        let mut tasks = TASKS.lock().unwrap_or_else(|p| p.into_inner());
        let token = tasks.entry(id.to_string()).or_default();
        token.cancel();
        let tenant = token.tenant();
        if tasks.len() > ENDED_TASKS_KEPT {
            tasks.retain(|_, token| !token.is_cancelled());
        }
        tenant
    };
    // The last task of its tenant on this process: under query isolation,
    // the tenant's runners are replaced by fresh ones.
    if let Some(tenant) = tenant {
        let mut tenants = TENANTS.lock().unwrap_or_else(|p| p.into_inner());
        let over = tenants.get_mut(&tenant).is_some_and(|live| {
            live.remove(id);
            live.is_empty()
        });
        if over {
            tenants.remove(&tenant);
            drop(tenants);
            if let Some((_, pool)) = EXECUTOR.get() {
                pool.end_tenant(tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runner_may_send_no_more_than_its_memory_limit() {
        let unlimited = PythonExecution::default().pool_config();
        assert_eq!(unlimited.max_reply_bytes, DEFAULT_MAX_REPLY_BYTES);
        let limited = PythonExecution::default()
            .with_runner_memory_limit(Some(256 << 20))
            .pool_config();
        assert_eq!(limited.max_reply_bytes, 256 << 20);
        let generous = PythonExecution::default()
            .with_runner_memory_limit(Some(64 << 30))
            .pool_config();
        assert_eq!(generous.max_reply_bytes, DEFAULT_MAX_REPLY_BYTES);
    }

    #[test]
    fn query_isolation_needs_runner_processes() {
        let error = configure_python_execution(
            PythonExecution::default()
                .with_mode(PythonMode::InProcess)
                .with_isolation(dfship_runtime::Isolation::Query),
        )
        .unwrap_err();
        assert!(error.to_string().contains("--python-mode pool"), "{error}");
    }
}
