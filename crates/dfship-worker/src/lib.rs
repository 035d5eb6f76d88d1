//! The `dfship-worker` process: options, start-up checks and the gRPC server.
//!
//! A worker is a datafusion-distributed `Worker` whose sessions carry the
//! Python UDF codec (so inline Python UDFs need no registration) and whose
//! UDFs run in a pool of runner processes from the Python environment given
//! with `--python-env` ([`PythonOptions`]).

mod python_options;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, Parser};
use datafusion::error::{DataFusionError, Result};
use dfship_codec::{
    ClusterKey, CodecOptions, DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_WARN_PAYLOAD_BYTES,
};
use dfship_distributed::PythonWorkerSessionBuilder;
use tokio::net::TcpListener;

pub use python_options::{parse_bytes, parse_duration, PythonOptions};

/// Options of a worker process, declared once for every way to start one:
/// the `dfship-worker` binary, `dfship worker`, and `python -m dfship worker`
/// (which hands its arguments to [`WorkerCommand`]). Each flag also reads the
/// environment variable named in its help; boolean variables accept
/// `1/0/true/false/yes/no/on/off`.
#[derive(Debug, Clone, Args)]
pub struct WorkerOptions {
    /// Address to listen on.
    #[arg(long, env = "DFSHIP_WORKER_HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on; 0 picks a free one (the address is printed on start).
    #[arg(long, env = "DFSHIP_WORKER_PORT", default_value_t = 50051)]
    pub port: u16,

    /// File holding the shared cluster key; payloads must then be signed with it.
    /// The key may also come from the DFSHIP_CLUSTER_KEY environment variable.
    #[arg(long, env = "DFSHIP_CLUSTER_KEY_FILE")]
    pub cluster_key_file: Option<PathBuf>,

    /// Refuse every inline Python UDF (only UDFs registered by name run).
    #[arg(long, env = "DFSHIP_STRICT", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    pub strict: bool,

    /// Refuse inline payloads larger than this many bytes.
    #[arg(long, env = "DFSHIP_MAX_PAYLOAD_BYTES", default_value_t = DEFAULT_MAX_PAYLOAD_BYTES)]
    pub max_payload_bytes: usize,

    /// An FFI scalar UDF to register by name: /path/lib.so:symbol or python.module:attribute (repeatable).
    #[arg(long = "ffi-udf", env = "DFSHIP_FFI_UDFS", value_delimiter = ',')]
    pub ffi_udfs: Vec<String>,

    /// Log a warning for inline payloads larger than this many bytes.
    #[arg(long, env = "DFSHIP_WARN_PAYLOAD_BYTES", default_value_t = DEFAULT_WARN_PAYLOAD_BYTES)]
    pub warn_payload_bytes: usize,

    #[command(flatten)]
    pub python: PythonOptions,
}

/// A worker's command line on its own (`dfship-worker`, `python -m dfship worker`).
#[derive(Debug, Parser)]
#[command(
    name = "dfship-worker",
    version,
    about = "A datafusion-distributed worker that runs Python UDFs sent inline in plans"
)]
pub struct WorkerCommand {
    #[command(flatten)]
    pub options: WorkerOptions,
}

impl WorkerOptions {
    /// The cluster key from `--cluster-key-file`, else from the environment.
    pub fn cluster_key(&self) -> Result<Option<ClusterKey>> {
        ClusterKey::from_file_or_env(self.cluster_key_file.as_deref())
    }

    pub fn codec_options(&self) -> Result<CodecOptions> {
        Ok(CodecOptions::default()
            .with_strict(self.strict)
            .with_optional_cluster_key(self.cluster_key()?)
            .with_max_payload_bytes(self.max_payload_bytes)
            .with_warn_payload_bytes(self.warn_payload_bytes))
    }
}

/// Sets up Python UDF execution and, unless strict mode means Python UDFs
/// never run here, checks it works now rather than at the first query: the
/// runners start (pool), or the interpreter imports cloudpickle and pyarrow.
pub fn prepare_python(options: &WorkerOptions) -> Result<()> {
    options.python.apply()?;
    if options.strict {
        return Ok(());
    }
    dfship_codec::start_python()
}

/// Binds the listener; port 0 picks a free port.
pub async fn bind(options: &WorkerOptions) -> Result<(TcpListener, SocketAddr)> {
    let address = format!("{}:{}", options.host, options.port);
    let listener = TcpListener::bind(&address).await.map_err(|e| {
        DataFusionError::Configuration(format!(
            "cannot listen on {address}: {e}; pick another --port (0 picks a free one) or --host"
        ))
    })?;
    let local = listener
        .local_addr()
        .map_err(|e| DataFusionError::External(Box::new(e)))?;
    Ok((listener, local))
}

/// Serves the worker on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    options: &WorkerOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let mut builder = PythonWorkerSessionBuilder::new(options.codec_options()?);
    for spec in &options.ffi_udfs {
        let udf = dfship_distributed::load_ffi_udf(spec)?;
        tracing::info!(udf = udf.name(), spec = spec.as_str(), "registered FFI UDF");
        builder = builder.with_udf(udf);
    }
    dfship_distributed::serve_worker(builder, listener, shutdown).await
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        _ = terminate => {}
    }
}

/// Runs a worker process to completion: checks, bind, announce, serve.
pub async fn run(options: WorkerOptions) -> Result<()> {
    prepare_python(&options)?;
    let (listener, address) = bind(&options).await?;
    // Scripts and tests wait for this exact line.
    println!("dfship-worker listening on http://{address}");
    let execution = dfship_codec::python_execution();
    tracing::info!(
        %address,
        strict = options.strict,
        signed = options.cluster_key()?.is_some(),
        python_mode = ?execution.mode,
        python_runners = execution.runners,
        python = %execution.python.display(),
        "worker started"
    );
    serve(listener, &options, shutdown_signal()).await?;
    tracing::info!(%address, "worker stopped");
    Ok(())
}

/// Logs to stderr; `RUST_LOG` filters (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
