//! `dfship._native`: the Rust side of the dfship Python package.
//!
//! - [`ClusterContext`]: a coordinator session for a cluster (SQL, tables,
//!   Python UDFs, datafusion-python plans) whose queries run distributed.
//! - [`DataFrame`]: a planned query; `collect` returns pyarrow record batches.
//! - [`run_worker`]: a worker serving in this Python process (what
//!   `python -m dfship worker` runs), so the modules a UDF imports resolve in
//!   the user's own environment.
//!
//! Every blocking call releases the GIL: Python UDFs evaluated in-process
//! (tasks the coordinator keeps) and on workers take it only for their call.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use arrow::pyarrow::{FromPyArrow, ToPyArrow};
use arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionContext};
use dfship_codec::{ClusterKey, ErrorKind};
use dfship_distributed::InlineUdfs;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    dfship._native,
    DfshipError,
    PyException,
    "An error from the engine. Subclasses say what caused it; the message says what to do."
);
create_exception!(
    dfship._native,
    PlanningError,
    DfshipError,
    "The query could not be planned: SQL, schema, configuration, or a function no process provides."
);
create_exception!(
    dfship._native,
    PayloadRefusedError,
    DfshipError,
    "A process refused a UDF's inline payload before unpickling it: strict mode, a missing or wrong \
     cluster-key signature, a size limit, or corrupted bytes."
);
create_exception!(
    dfship._native,
    VersionMismatchError,
    DfshipError,
    "A UDF was pickled by another Python minor or cloudpickle major version than the one that runs it."
);
create_exception!(
    dfship._native,
    UdfLoadError,
    DfshipError,
    "A UDF's callable could not be pickled or unpickled (e.g. a module it imports is missing where it runs)."
);
create_exception!(
    dfship._native,
    UdfRaisedError,
    DfshipError,
    "A UDF raised an exception; its type, message and traceback tail are in the message."
);
create_exception!(
    dfship._native,
    UdfResultError,
    DfshipError,
    "A UDF returned bad data: wrong length, type or nullability, or an invalid Arrow array."
);
create_exception!(
    dfship._native,
    AuthenticationError,
    DfshipError,
    "A worker refused this client: it lacks the cluster key, holds another one, or replayed a request."
);
create_exception!(
    dfship._native,
    StorageError,
    DfshipError,
    "An object store (S3, GCS, Azure, HTTP) failed or is not set up: missing credentials, a missing bucket or object, an endpoint that does not answer, or a URL scheme no store serves."
);
create_exception!(
    dfship._native,
    QueryTimeoutError,
    DfshipError,
    "The query ran past its timeout (`timeout=` or the `query_timeout` setting) and was cancelled on every worker."
);
create_exception!(
    dfship._native,
    WorkerLostError,
    DfshipError,
    "A worker stopped or became unreachable during the query."
);

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("dfship")
            .build()
            .expect("a tokio runtime")
    })
}

/// The engine's error as the Python exception of its kind.
fn to_py(error: DataFusionError) -> PyErr {
    let message = error.to_string();
    match ErrorKind::of(&error) {
        ErrorKind::Planning => PlanningError::new_err(message),
        ErrorKind::PayloadRefused => PayloadRefusedError::new_err(message),
        ErrorKind::VersionMismatch => VersionMismatchError::new_err(message),
        ErrorKind::UdfLoadFailed => UdfLoadError::new_err(message),
        ErrorKind::UdfRaised => UdfRaisedError::new_err(message),
        ErrorKind::UdfBadResult => UdfResultError::new_err(message),
        ErrorKind::WorkerLost => WorkerLostError::new_err(message),
        ErrorKind::Storage => StorageError::new_err(message),
        ErrorKind::Unauthenticated => AuthenticationError::new_err(message),
        ErrorKind::QueryTimeout => QueryTimeoutError::new_err(message),
        ErrorKind::Other => DfshipError::new_err(message),
    }
}

/// How often a waiting call looks at signals (Ctrl-C) and hands UDF output
/// to Python.
const TICK: std::time::Duration = std::time::Duration::from_millis(50);

/// Runs `future` on the runtime with the GIL released, taking the GIL back
/// every [`TICK`] to run Python's signal handlers (so Ctrl-C raises
/// `KeyboardInterrupt` at once) and `tick` (which shows UDF output from this
/// thread: in a notebook, the cell's own stream). When a handler raises, the
/// future is dropped, which cancels the query on every worker.
fn wait_interruptibly<T: Send>(
    py: Python<'_>,
    future: impl Future<Output = Result<T, DataFusionError>> + Send,
    mut tick: impl FnMut(Python<'_>) -> PyResult<()>,
) -> PyResult<T> {
    let mut future = Box::pin(future);
    loop {
        let step = py.detach(|| {
            runtime().block_on(async { tokio::time::timeout(TICK, &mut future).await.ok() })
        });
        if let Some(result) = step {
            tick(py)?;
            return result.map_err(to_py);
        }
        if let Err(error) = py.check_signals().and_then(|()| tick(py)) {
            // Dropped off the GIL, inside the runtime (its tasks and timers).
            py.detach(move || {
                let _inside = runtime().enter();
                drop(future);
            });
            return Err(error);
        }
    }
}

/// Runs `future` on the runtime with the GIL released.
fn wait<T: Send>(
    py: Python<'_>,
    future: impl Future<Output = Result<T, DataFusionError>> + Send,
) -> PyResult<T> {
    py.detach(|| runtime().block_on(future)).map_err(to_py)
}

/// A coordinator session whose queries run on the given workers.
#[pyclass(module = "dfship._native")]
struct ClusterContext {
    ctx: SessionContext,
    inline: InlineUdfs,
}

#[pymethods]
impl ClusterContext {
    /// `workers` and the coordinator settings (`dfship-settings`) given as
    /// Python keywords in `settings` (each named as its field: `strict`,
    /// `python_runners`, `udf_timeout`, `tls_ca`, …); `cluster_key` (bytes)
    /// is the one setting that is not a flag.
    #[new]
    #[pyo3(signature = (workers, cluster_key=None, settings=None))]
    fn new(
        py: Python<'_>,
        workers: Vec<String>,
        cluster_key: Option<Vec<u8>>,
        settings: Option<Bound<'_, pyo3::types::PyDict>>,
    ) -> PyResult<Self> {
        use clap::CommandFactory;
        dfship_codec::ensure_python().map_err(to_py)?;
        let mut keywords = Vec::new();
        if !workers.is_empty() {
            keywords.push((
                "workers".to_string(),
                dfship_settings::layers::Keyword::List(workers),
            ));
        }
        if let Some(settings) = settings {
            for (name, value) in settings.iter() {
                if value.is_none() {
                    continue;
                }
                keywords.push((name.extract()?, keyword(&value)?));
            }
        }
        let command = dfship_settings::CoordinatorOptions::command();
        let flags = dfship_settings::layers::flags_from_keywords(&command, &keywords)
            .map_err(PlanningError::new_err)?;
        let options: dfship_settings::CoordinatorOptions = dfship_settings::layers::parse_from(
            std::iter::once("dfship.ClusterContext".to_string()).chain(flags),
        )
        .map_err(|e| PlanningError::new_err(e.to_string().trim().to_string()))?;
        let key = match (cluster_key, &options.security.cluster_key_file) {
            (Some(_), Some(_)) => {
                return Err(PlanningError::new_err(
                    "give cluster_key or cluster_key_file, not both",
                ))
            }
            (Some(bytes), None) => Some(ClusterKey::new(bytes).map_err(to_py)?),
            (None, file) => ClusterKey::from_file_or_env(file.as_deref()).map_err(to_py)?,
        };
        // Runners run this very interpreter unless told otherwise, so they
        // import what it imports.
        let mut execution = options.python.execution();
        if options.python.python_executable.is_none() && options.python.python_env.is_none() {
            execution = execution.with_python(host_python(py)?);
        }
        dfship_codec::hide_from_runners(dfship_settings::secret_files(
            &options.security,
            &options.transport,
        ));
        options.python.apply_with(execution).map_err(to_py)?;
        let (builder, inline) = options.builder_with_inline(key).map_err(to_py)?;
        let ctx = py.detach(|| builder.build()).map_err(to_py)?;
        Ok(Self { ctx, inline })
    }

    /// Registers a UDF made by `dfship.udf`, `dfship.udaf` or `dfship.udwf`;
    /// it travels inline to the workers.
    fn register_udf(&self, udf: &Bound<'_, PyAny>) -> PyResult<()> {
        let udf = dfship_codec::python_udf_from_declaration(udf).map_err(to_py)?;
        udf.register(&self.ctx);
        Ok(())
    }

    /// Registers Parquet file(s) at `path` (a file or directory every worker can read).
    fn register_parquet(&self, py: Python<'_>, name: &str, path: &str) -> PyResult<()> {
        let ctx = self.ctx.clone();
        wait(py, async move {
            ctx.register_parquet(name, path, ParquetReadOptions::default())
                .await
        })
    }

    /// Registers CSV file(s) at `path` (a file or directory every worker can read).
    #[pyo3(signature = (name, path, has_header=true, delimiter=","))]
    fn register_csv(
        &self,
        py: Python<'_>,
        name: &str,
        path: &str,
        has_header: bool,
        delimiter: &str,
    ) -> PyResult<()> {
        let delimiter = match delimiter.as_bytes() {
            [byte] => *byte,
            _ => {
                return Err(PlanningError::new_err(format!(
                    "delimiter must be one byte, got {delimiter:?}"
                )))
            }
        };
        let ctx = self.ctx.clone();
        wait(py, async move {
            let options = CsvReadOptions::new()
                .has_header(has_header)
                .delimiter(delimiter);
            ctx.register_csv(name, path, options).await
        })
    }

    /// Registers in-memory record batches (pyarrow) as a table.
    fn register_record_batches(
        &self,
        name: &str,
        batches: Vec<Bound<'_, PyAny>>,
        schema: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let schema = Arc::new(arrow::datatypes::Schema::from_pyarrow_bound(schema)?);
        let batches = batches
            .iter()
            .map(RecordBatch::from_pyarrow_bound)
            .collect::<PyResult<Vec<_>>>()?;
        let table = MemTable::try_new(schema, vec![batches]).map_err(to_py)?;
        self.ctx
            .register_table(name, Arc::new(table))
            .map_err(to_py)?;
        Ok(())
    }

    fn deregister_table(&self, name: &str) -> PyResult<()> {
        self.ctx.deregister_table(name).map_err(to_py)?;
        Ok(())
    }

    /// Plans `query` (nothing runs until `collect`).
    fn sql(&self, py: Python<'_>, query: &str) -> PyResult<DataFrame> {
        let ctx = self.ctx.clone();
        let query = query.to_string();
        let df = wait(py, async move { ctx.sql(&query).await })?;
        Ok(DataFrame::new(df, self.ctx.clone()))
    }

    /// A DataFrame over datafusion-python 55 logical plan bytes.
    fn load_datafusion_logical_plan(&self, py: Python<'_>, data: Vec<u8>) -> PyResult<DataFrame> {
        let ctx = self.ctx.clone();
        let codec = Arc::clone(self.inline.codec());
        let df = wait(py, async move {
            dfship_distributed::dataframe_from_logical_bytes(&ctx, codec, &data).await
        })?;
        Ok(DataFrame::new(df, self.ctx.clone()))
    }

    /// A DataFrame over datafusion-python 55 physical plan bytes.
    fn load_datafusion_physical_plan(&self, py: Python<'_>, data: Vec<u8>) -> PyResult<DataFrame> {
        let ctx = self.ctx.clone();
        let codec = Arc::clone(self.inline.codec());
        let df = wait(py, async move {
            dfship_distributed::dataframe_from_physical_bytes(&ctx, codec, &data).await
        })?;
        Ok(DataFrame::new(df, self.ctx.clone()))
    }

    /// Each worker as (url, "live" | "down", cause).
    fn workers_status(&self) -> Vec<(String, &'static str, Option<String>)> {
        let Some(retry) = dfship_distributed::QueryRetry::of(&self.ctx.state()) else {
            return Vec::new();
        };
        retry
            .membership()
            .snapshot()
            .into_iter()
            .map(|(url, health)| {
                // As workers are written: http://HOST:PORT, no trailing slash.
                let url = url.as_str().trim_end_matches('/').to_string();
                match health {
                    dfship_distributed::WorkerHealth::Live => (url, "live", None),
                    dfship_distributed::WorkerHealth::Down { cause } => (url, "down", Some(cause)),
                }
            })
            .collect()
    }

    /// {"queries", "retries", "exhausted"} since this context was made.
    fn retry_stats(&self) -> std::collections::HashMap<&'static str, u64> {
        let stats = dfship_distributed::QueryRetry::of(&self.ctx.state())
            .map(|r| r.stats())
            .unwrap_or_default();
        [
            ("queries", stats.queries),
            ("retries", stats.retries),
            ("exhausted", stats.exhausted),
        ]
        .into_iter()
        .collect()
    }

    /// (stage plans shipped, inline UDF calls written) since this context was made.
    fn shipped(&self) -> (u64, u64) {
        let stats = self.inline.encoder().stats();
        (stats.plans, stats.inline_udfs)
    }
}

/// A planned query.
#[pyclass(module = "dfship._native")]
struct DataFrame {
    df: datafusion::dataframe::DataFrame,
    ctx: SessionContext,
    /// What the UDFs of the last `collect` wrote (within the query's caps).
    output: Arc<std::sync::Mutex<Vec<dfship_distributed::UdfOutput>>>,
}

impl DataFrame {
    fn new(df: datafusion::dataframe::DataFrame, ctx: SessionContext) -> Self {
        Self {
            df,
            ctx,
            output: Arc::default(),
        }
    }
}

#[pymethods]
impl DataFrame {
    /// The result schema as a `pyarrow.Schema`.
    fn schema<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.df.schema().as_arrow().to_pyarrow(py)
    }

    /// Runs the query on the cluster; returns a list of `pyarrow.RecordBatch`.
    /// `progress`, if given, is called with a dict per new view of the
    /// query's progress; `timeout` (seconds) overrides the context's
    /// `query_timeout`; `on_output` is called (on this thread) with a dict
    /// per line the query's UDFs wrote, else each line is written to
    /// `sys.stderr` (see `dfship.DataFrame.collect`). Ctrl-C (SIGINT) cancels
    /// the query on every worker and raises `KeyboardInterrupt`.
    #[pyo3(signature = (progress=None, timeout=None, on_output=None))]
    fn collect<'py>(
        &self,
        py: Python<'py>,
        progress: Option<Py<PyAny>>,
        timeout: Option<f64>,
        on_output: Option<Py<PyAny>>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let df = self.df.clone();
        let callback = progress.map(|callback| -> dfship_distributed::ProgressCallback {
            Arc::new(move |view: &dfship_distributed::QueryProgress| {
                Python::attach(|py| {
                    let result = progress_dict(py, view)
                        .and_then(|dict| callback.call1(py, (dict,)).map(|_| ()));
                    if let Err(error) = result {
                        // The query goes on; Python's hook for errors in
                        // callbacks (sys.unraisablehook) shows the exception.
                        error.write_unraisable(py, Some(callback.bind(py)));
                    }
                })
            })
        });
        let timeout = match timeout {
            None => None,
            Some(seconds) if seconds.is_finite() && seconds > 0.0 => {
                Some(Some(std::time::Duration::from_secs_f64(seconds)))
            }
            Some(seconds) => {
                return Err(PlanningError::new_err(format!(
                    "timeout must be a positive number of seconds, got {seconds}"
                )))
            }
        };
        // Lines arrive on the runtime's threads; they are shown from this
        // one, at each tick.
        let arrived: Arc<std::sync::Mutex<Vec<dfship_distributed::UdfOutput>>> = Arc::default();
        let sink = Arc::clone(&arrived);
        let options = dfship_distributed::CollectOptions {
            progress: callback,
            output: Some(Arc::new(move |line: &dfship_distributed::UdfOutput| {
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(line.clone());
            })),
            timeout,
        };
        let kept = Arc::clone(&self.output);
        kept.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let show = |py: Python<'_>| -> PyResult<()> {
            let lines = std::mem::take(&mut *arrived.lock().unwrap_or_else(|p| p.into_inner()));
            if lines.is_empty() {
                return Ok(());
            }
            let stderr = py.import("sys")?.getattr("stderr")?;
            for line in &lines {
                match &on_output {
                    Some(callback) => {
                        callback.call1(py, (output_dict(py, line)?,))?;
                    }
                    None => {
                        stderr.call_method1("write", (format!("{line}\n"),))?;
                    }
                }
            }
            if on_output.is_none() {
                let _ = stderr.call_method0("flush");
            }
            kept.lock().unwrap_or_else(|p| p.into_inner()).extend(lines);
            Ok(())
        };
        let batches = wait_interruptibly(py, dfship_distributed::collect_with(df, options), show)?;
        batches.iter().map(|batch| batch.to_pyarrow(py)).collect()
    }

    /// What the UDFs of the last `collect` wrote, as dicts (`worker`,
    /// `stage`, `task`, `udf`, `stream`, `text`).
    fn udf_output<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, pyo3::types::PyDict>>> {
        let lines = self
            .output
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        lines.iter().map(|line| output_dict(py, line)).collect()
    }

    /// The distributed plan (stages, tasks) and how each UDF travels; with
    /// `analyze`, runs the query and adds metrics and per-stage UDF figures.
    #[pyo3(signature = (analyze=false))]
    fn explain(&self, py: Python<'_>, analyze: bool) -> PyResult<String> {
        let df = self.df.clone();
        if analyze {
            return wait_interruptibly(py, dfship_distributed::explain_analyze(df), |_| Ok(()));
        }
        let plan = wait(py, async move { df.create_physical_plan().await })?;
        Ok(dfship_distributed::explain_plan(&self.ctx, &plan))
    }
}

/// A line of UDF output as a dict: `worker`, `stage`, `task`, `udf`, `stream`, `text`.
fn output_dict<'py>(
    py: Python<'py>,
    line: &dfship_distributed::UdfOutput,
) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
    let dict = pyo3::types::PyDict::new(py);
    dict.set_item("worker", &line.worker)?;
    dict.set_item("stage", line.stage)?;
    dict.set_item("task", line.task)?;
    dict.set_item("udf", &line.udf)?;
    dict.set_item("stream", &line.stream)?;
    dict.set_item("text", &line.text)?;
    Ok(dict)
}

/// `{"stages": [{"stage", "tasks", "done", "running", "rows"}, …], "done",
/// "total", "finished"}` for a progress callback.
fn progress_dict<'py>(
    py: Python<'py>,
    view: &dfship_distributed::QueryProgress,
) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
    use pyo3::types::PyDict;
    let stages = view
        .stages
        .iter()
        .map(|stage| {
            let dict = PyDict::new(py);
            dict.set_item("stage", stage.stage)?;
            dict.set_item("tasks", stage.tasks)?;
            dict.set_item("done", stage.done)?;
            dict.set_item("running", stage.running)?;
            dict.set_item("rows", stage.rows)?;
            Ok(dict)
        })
        .collect::<PyResult<Vec<_>>>()?;
    let (done, total) = view.tasks();
    let dict = PyDict::new(py);
    dict.set_item("stages", stages)?;
    dict.set_item("done", done)?;
    dict.set_item("total", total)?;
    dict.set_item("finished", view.finished)?;
    Ok(dict)
}

/// Serves a worker in this process until SIGINT/SIGTERM, with the command
/// line `argv` parsed exactly as `dfship-worker` parses its own (same flags,
/// same environment variables). Prints `dfship-worker listening on URL` once
/// it accepts connections. Returns the process exit code.
#[pyfunction]
fn run_worker(py: Python<'_>, argv: Vec<String>) -> PyResult<i32> {
    let program = "python -m dfship worker".to_string();
    let mut options = match dfship_worker::parse_worker_args(std::iter::once(program).chain(argv)) {
        Ok(options) => options,
        Err(error) => {
            // --help and --version print and succeed; usage errors print and fail.
            let _ = error.print();
            return Ok(error.exit_code());
        }
    };
    let key = options.security.take_cluster_key().map_err(to_py)?;
    // Python keeps its own copy of the environment: drop the key there too,
    // so a UDF run in this process never reads it.
    py.import("os")?
        .getattr("environ")?
        .call_method1("pop", (dfship_codec::CLUSTER_KEY_ENV, py.None()))?;
    if options.python.python_executable.is_none() && options.python.python_env.is_none() {
        // Runners run this very interpreter, so they import what it imports.
        options.python.python_executable = Some(host_python(py)?);
    }
    dfship_worker::init_logging(options.worker.log_format);
    wait(py, dfship_worker::run(options, key))?;
    Ok(0)
}

/// Writes a fresh certificate authority and a certificate for `hosts`
/// (names or IP addresses) into `directory`: `(ca, cert, key)` paths. For
/// local clusters and tests (`LocalCluster(tls=True)`); use your own PKI in
/// production.
#[pyfunction]
fn generate_tls_files(
    directory: PathBuf,
    hosts: Vec<String>,
) -> PyResult<(String, String, String)> {
    let files = dfship_distributed::generate_tls_files(&directory, &hosts).map_err(to_py)?;
    let text = |path: PathBuf| path.to_string_lossy().into_owned();
    Ok((text(files.ca), text(files.cert), text(files.key)))
}

/// `sys.executable`: the interpreter this process runs.
fn host_python(py: Python<'_>) -> PyResult<PathBuf> {
    py.import("sys")?.getattr("executable")?.extract()
}

/// A Python keyword argument's value, as a setting takes it.
fn keyword(value: &Bound<'_, PyAny>) -> PyResult<dfship_settings::layers::Keyword> {
    use dfship_settings::layers::Keyword;
    if let Ok(b) = value.cast::<pyo3::types::PyBool>() {
        return Ok(Keyword::Bool(b.is_true()));
    }
    if let Ok(n) = value.extract::<i64>() {
        return Ok(Keyword::Int(n));
    }
    if let Ok(x) = value.extract::<f64>() {
        return Ok(Keyword::Float(x));
    }
    if let Ok(text) = value.extract::<String>() {
        return Ok(Keyword::Text(text));
    }
    if let Ok(items) = value.extract::<Vec<String>>() {
        return Ok(Keyword::List(items));
    }
    // A mapping (`storage_options={"aws_region": "eu-west-1"}`) as KEY=VALUE items.
    if let Ok(map) = value.extract::<std::collections::BTreeMap<String, String>>() {
        return Ok(Keyword::List(
            map.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
        ));
    }
    let path = value
        .py()
        .import("os")?
        .call_method1("fspath", (value,))
        .and_then(|p| p.extract::<String>());
    path.map(Keyword::Text).map_err(|_| {
        PlanningError::new_err(format!(
            "a setting's value must be a bool, number, string, path, list of strings or dict of strings, got {}",
            value
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })
}

/// Every coordinator setting as `(keyword, flag, variable, file key,
/// default, help)`: what `ClusterContext` accepts.
#[pyfunction]
fn coordinator_settings() -> Vec<SettingRow> {
    use clap::CommandFactory;
    settings_rows(&dfship_settings::CoordinatorOptions::command())
}

/// `(keyword, flag, variable, file key, default, help)` of one setting.
type SettingRow = (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
);

/// Every worker setting, in the same shape as [`coordinator_settings`]: what
/// `python -m dfship worker` (and `dfship-worker`) accepts. Deployment files
/// are checked against it.
#[pyfunction]
fn worker_settings() -> Vec<SettingRow> {
    use clap::CommandFactory;
    settings_rows(&dfship_settings::WorkerOptions::command())
}

fn settings_rows(command: &clap::Command) -> Vec<SettingRow> {
    dfship_settings::layers::settings(command)
        .into_iter()
        .map(|s| (s.keyword, s.flag, s.env, s.file_key, s.default, s.help))
        .collect()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ClusterContext>()?;
    m.add_class::<DataFrame>()?;
    m.add_function(wrap_pyfunction!(run_worker, m)?)?;
    m.add_function(wrap_pyfunction!(coordinator_settings, m)?)?;
    m.add_function(wrap_pyfunction!(worker_settings, m)?)?;
    m.add_function(wrap_pyfunction!(generate_tls_files, m)?)?;
    let py = m.py();
    m.add("DfshipError", py.get_type::<DfshipError>())?;
    m.add("PlanningError", py.get_type::<PlanningError>())?;
    m.add("PayloadRefusedError", py.get_type::<PayloadRefusedError>())?;
    m.add(
        "VersionMismatchError",
        py.get_type::<VersionMismatchError>(),
    )?;
    m.add("UdfLoadError", py.get_type::<UdfLoadError>())?;
    m.add("UdfRaisedError", py.get_type::<UdfRaisedError>())?;
    m.add("UdfResultError", py.get_type::<UdfResultError>())?;
    m.add("WorkerLostError", py.get_type::<WorkerLostError>())?;
    m.add("StorageError", py.get_type::<StorageError>())?;
    m.add("AuthenticationError", py.get_type::<AuthenticationError>())?;
    m.add("QueryTimeoutError", py.get_type::<QueryTimeoutError>())?;
    Ok(())
}
