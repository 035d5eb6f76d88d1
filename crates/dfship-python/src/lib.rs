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
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionConfig, SessionContext};
use dfship_codec::{ClusterKey, CodecOptions, ErrorKind, PythonExecution};
use dfship_distributed::{ChannelOptions, ClusterContextBuilder, InlineUdfs, TlsConfig};
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
        ErrorKind::Unauthenticated => AuthenticationError::new_err(message),
        ErrorKind::Other => DfshipError::new_err(message),
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
    #[new]
    #[pyo3(signature = (workers, *, cluster_key=None, cluster_key_file=None, strict=false, max_payload_bytes=None, warn_payload_bytes=None, target_partitions=None, bytes_per_partition=None, python_mode=None, python_runners=None, udf_timeout=None, runner_memory_limit=None, tls_ca=None, tls_cert=None, tls_key=None, max_message_bytes=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        workers: Vec<String>,
        cluster_key: Option<Vec<u8>>,
        cluster_key_file: Option<PathBuf>,
        strict: bool,
        max_payload_bytes: Option<usize>,
        warn_payload_bytes: Option<usize>,
        target_partitions: Option<usize>,
        bytes_per_partition: Option<usize>,
        python_mode: Option<&str>,
        python_runners: Option<usize>,
        udf_timeout: Option<f64>,
        runner_memory_limit: Option<u64>,
        tls_ca: Option<PathBuf>,
        tls_cert: Option<PathBuf>,
        tls_key: Option<PathBuf>,
        max_message_bytes: Option<usize>,
    ) -> PyResult<Self> {
        dfship_codec::ensure_python().map_err(to_py)?;
        configure_execution(
            py,
            python_mode,
            python_runners,
            udf_timeout,
            runner_memory_limit,
        )?;
        let key = match (cluster_key, cluster_key_file) {
            (Some(_), Some(_)) => {
                return Err(PlanningError::new_err(
                    "give cluster_key or cluster_key_file, not both",
                ))
            }
            (Some(bytes), None) => Some(ClusterKey::new(bytes).map_err(to_py)?),
            (None, file) => ClusterKey::from_file_or_env(file.as_deref()).map_err(to_py)?,
        };
        let mut options = CodecOptions::default()
            .with_strict(strict)
            .with_optional_cluster_key(key);
        if let Some(bytes) = max_payload_bytes {
            options = options.with_max_payload_bytes(bytes);
        }
        if let Some(bytes) = warn_payload_bytes {
            options = options.with_warn_payload_bytes(bytes);
        }
        let mut channels = ChannelOptions {
            tls: TlsConfig::from_files(tls_cert.as_deref(), tls_key.as_deref(), tls_ca.as_deref())
                .map_err(to_py)?,
            ..ChannelOptions::default()
        };
        if let Some(bytes) = max_message_bytes {
            channels.max_message_bytes = bytes;
        }
        let inline = InlineUdfs::with_channel_options(options, channels);
        let mut config = SessionConfig::new();
        if let Some(partitions) = target_partitions {
            config = config.with_target_partitions(partitions.max(1));
        }
        let mut builder = ClusterContextBuilder::new(&workers)
            .map_err(to_py)?
            .with_config(config)
            .with_inline_udfs(inline.clone());
        if let Some(bytes) = bytes_per_partition {
            builder = builder.with_file_scan_bytes_per_partition(bytes.max(1));
        }
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
        Ok(DataFrame {
            df,
            ctx: self.ctx.clone(),
        })
    }

    /// A DataFrame over datafusion-python 55 logical plan bytes.
    fn load_datafusion_logical_plan(&self, py: Python<'_>, data: Vec<u8>) -> PyResult<DataFrame> {
        let ctx = self.ctx.clone();
        let codec = Arc::clone(self.inline.codec());
        let df = wait(py, async move {
            dfship_distributed::dataframe_from_logical_bytes(&ctx, codec, &data).await
        })?;
        Ok(DataFrame {
            df,
            ctx: self.ctx.clone(),
        })
    }

    /// A DataFrame over datafusion-python 55 physical plan bytes.
    fn load_datafusion_physical_plan(&self, py: Python<'_>, data: Vec<u8>) -> PyResult<DataFrame> {
        let ctx = self.ctx.clone();
        let codec = Arc::clone(self.inline.codec());
        let df = wait(py, async move {
            dfship_distributed::dataframe_from_physical_bytes(&ctx, codec, &data).await
        })?;
        Ok(DataFrame {
            df,
            ctx: self.ctx.clone(),
        })
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
}

#[pymethods]
impl DataFrame {
    /// The result schema as a `pyarrow.Schema`.
    fn schema<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.df.schema().as_arrow().to_pyarrow(py)
    }

    /// Runs the query on the cluster; returns a list of `pyarrow.RecordBatch`.
    fn collect<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let df = self.df.clone();
        let batches = wait(py, async move { df.collect().await })?;
        batches.iter().map(|batch| batch.to_pyarrow(py)).collect()
    }

    /// The distributed plan (stages, tasks) and how each UDF travels.
    fn explain(&self, py: Python<'_>) -> PyResult<String> {
        let df = self.df.clone();
        let plan = wait(py, async move { df.create_physical_plan().await })?;
        Ok(dfship_distributed::explain_plan(&self.ctx, &plan))
    }
}

/// Serves a worker in this process until SIGINT/SIGTERM, with the command
/// line `argv` parsed exactly as `dfship-worker` parses its own (same flags,
/// same environment variables). Prints `dfship-worker listening on URL` once
/// it accepts connections. Returns the process exit code.
#[pyfunction]
fn run_worker(py: Python<'_>, argv: Vec<String>) -> PyResult<i32> {
    use clap::Parser;
    let program = "python -m dfship worker".to_string();
    let command =
        match dfship_worker::WorkerCommand::try_parse_from(std::iter::once(program).chain(argv)) {
            Ok(command) => command,
            Err(error) => {
                // --help and --version print and succeed; usage errors print and fail.
                let _ = error.print();
                return Ok(error.exit_code());
            }
        };
    let mut options = command.options;
    let key = options.take_cluster_key().map_err(to_py)?;
    // Python keeps its own copy of the environment: drop the key there too,
    // so a UDF run in this process never reads it.
    py.import("os")?
        .getattr("environ")?
        .call_method1("pop", (dfship_codec::CLUSTER_KEY_ENV, py.None()))?;
    if options.python.python_executable.is_none() && options.python.python_env.is_none() {
        // Runners run this very interpreter, so they import what it imports.
        options.python.python_executable = Some(host_python(py)?);
    }
    dfship_worker::init_logging();
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

/// Sets up how this process runs Python UDFs (for the stages a coordinator
/// keeps), with this interpreter as the runners' Python.
fn configure_execution(
    py: Python<'_>,
    mode: Option<&str>,
    runners: Option<usize>,
    udf_timeout: Option<f64>,
    runner_memory_limit: Option<u64>,
) -> PyResult<()> {
    let mut execution = PythonExecution::default().with_python(host_python(py)?);
    if let Some(mode) = mode {
        execution = execution.with_mode(mode.parse().map_err(PlanningError::new_err)?);
    }
    if let Some(runners) = runners {
        execution = execution.with_runners(runners);
    }
    if let Some(seconds) = udf_timeout {
        if !(seconds > 0.0 && seconds.is_finite()) {
            return Err(PlanningError::new_err(format!(
                "udf_timeout must be a positive number of seconds, got {seconds}"
            )));
        }
        execution = execution.with_udf_timeout(Some(std::time::Duration::from_secs_f64(seconds)));
    }
    execution = execution.with_runner_memory_limit(runner_memory_limit);
    dfship_codec::configure_python_execution(execution).map_err(to_py)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ClusterContext>()?;
    m.add_class::<DataFrame>()?;
    m.add_function(wrap_pyfunction!(run_worker, m)?)?;
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
    m.add("AuthenticationError", py.get_type::<AuthenticationError>())?;
    Ok(())
}
