//! The `dfship-worker` process: options, start-up checks and the gRPC server.
//!
//! A worker is a datafusion-distributed `Worker` whose sessions carry the
//! Python UDF codec (so inline Python UDFs need no registration) and whose
//! UDFs run in a pool of runner processes from the Python environment given
//! with `--python-env` ([`PythonOptions`]).

mod python_options;
mod transport_options;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, Parser};
use datafusion::error::{DataFusionError, Result};
use dfship_codec::{
    ClusterKey, CodecOptions, CLUSTER_KEY_ENV, DEFAULT_MAX_PAYLOAD_BYTES,
    DEFAULT_WARN_PAYLOAD_BYTES,
};
use dfship_distributed::{ChannelOptions, PythonWorkerSessionBuilder};
use tokio::net::TcpListener;

pub use python_options::{parse_bytes, parse_duration, PythonOptions};
pub use transport_options::TransportOptions;

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

    /// Listen beyond loopback without a cluster key or mutual TLS: anyone
    /// who reaches the port can then run plans that read and write files as
    /// this worker. Only for isolated networks; a loud warning is logged.
    #[arg(long, env = "DFSHIP_INSECURE", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    pub insecure: bool,

    #[command(flatten)]
    pub python: PythonOptions,

    #[command(flatten)]
    pub transport: TransportOptions,
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
    /// The cluster key, read once: from `--cluster-key-file`, else from
    /// `DFSHIP_CLUSTER_KEY`, which is then removed from the environment so
    /// no UDF or child process can read it. Call it first thing, before
    /// other threads and Python start.
    pub fn take_cluster_key(&self) -> Result<Option<ClusterKey>> {
        let key = match &self.cluster_key_file {
            Some(path) => Some(ClusterKey::from_file(path)?),
            None => ClusterKey::take_from_env(CLUSTER_KEY_ENV)?,
        };
        // A key file wins; a variable set beside it must not linger either.
        if std::env::var_os(CLUSTER_KEY_ENV).is_some() {
            std::env::remove_var(CLUSTER_KEY_ENV);
        }
        Ok(key)
    }

    pub fn codec_options(&self, key: Option<ClusterKey>) -> CodecOptions {
        CodecOptions::default()
            .with_strict(self.strict)
            .with_optional_cluster_key(key)
            .with_max_payload_bytes(self.max_payload_bytes)
            .with_warn_payload_bytes(self.warn_payload_bytes)
    }

    /// Refuses to listen beyond loopback unprotected (no key, no mutual
    /// TLS) unless `--insecure`, which then warns loudly.
    pub fn check_exposure(
        &self,
        key: Option<&ClusterKey>,
        channels: &ChannelOptions,
    ) -> Result<()> {
        let loopback = self.host == "localhost"
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        let mutual_tls = channels
            .tls
            .as_ref()
            .is_some_and(|tls| tls.requires_client_certificates());
        if loopback || key.is_some() || mutual_tls {
            return Ok(());
        }
        if !self.insecure {
            return Err(DataFusionError::Configuration(format!(
                "refusing to listen on {} without a cluster key: anyone who can reach the port \
                 could run plans that read and write files as this worker. Give \
                 --cluster-key-file (or DFSHIP_CLUSTER_KEY), or mutual TLS with --tls-cert, \
                 --tls-key and --tls-ca; or pass --insecure if this network is isolated and you \
                 accept the risk",
                self.host
            )));
        }
        let warning = format!(
            "INSECURE: listening on {} with no cluster key and no mutual TLS (--insecure): \
             anyone who reaches this port can run plans that read and write files as this \
             worker, and run Python code in its UDF runners",
            self.host
        );
        eprintln!("dfship-worker: WARNING: {warning}");
        tracing::warn!("{warning}");
        Ok(())
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
    key: Option<ClusterKey>,
    channels: ChannelOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let mut builder =
        PythonWorkerSessionBuilder::with_channel_options(options.codec_options(key), channels);
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
/// `key` comes from [`WorkerOptions::take_cluster_key`], called before.
pub async fn run(options: WorkerOptions, key: Option<ClusterKey>) -> Result<()> {
    let channels = options.transport.channel_options()?;
    options.check_exposure(key.as_ref(), &channels)?;
    prepare_python(&options)?;
    let (listener, address) = bind(&options).await?;
    let tls = channels
        .tls
        .as_ref()
        .is_some_and(|tls| tls.identity.is_some());
    // Scripts and tests wait for this exact line.
    println!(
        "dfship-worker listening on {}://{address}",
        if tls { "https" } else { "http" }
    );
    let execution = dfship_codec::python_execution();
    tracing::info!(
        %address,
        strict = options.strict,
        authenticated = key.is_some(),
        tls,
        mutual_tls = channels.tls.as_ref().is_some_and(|t| t.requires_client_certificates()),
        python_mode = ?execution.mode,
        python_runners = execution.runners,
        python = %execution.python.display(),
        "worker started"
    );
    serve(listener, &options, key, channels, shutdown_signal()).await?;
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
