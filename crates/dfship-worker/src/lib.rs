//! The `dfship-worker` process: options, start-up checks and the gRPC server.
//!
//! A worker is a datafusion-distributed `Worker` whose sessions carry the
//! Python UDF codec (so inline Python UDFs need no registration) and whose
//! UDFs run in a pool of runner processes from the Python environment given
//! with `--python-env`. Its settings are declared in `dfship-settings`
//! ([`WorkerOptions`]).

use std::net::SocketAddr;

use datafusion::error::{DataFusionError, Result};
use dfship_codec::ClusterKey;
use dfship_distributed::{ChannelOptions, Drain, PythonWorkerSessionBuilder};
use tokio::net::TcpListener;

pub use dfship_settings::{
    layers, parse_bytes, parse_duration, PythonSettings, TransportSettings, WorkerOptions,
};

/// Parses a worker's command line (program name first) with every layer of
/// settings: flags, `DFSHIP_*` variables, the `--config` file. Credentials
/// on it are refused ([`layers::refuse_secret_flags`]): every user of the
/// machine can read a process's arguments.
pub fn parse_worker_args<I, S>(argv: I) -> std::result::Result<WorkerOptions, clap::Error>
where
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString> + Clone,
{
    let argv: Vec<std::ffi::OsString> = argv.into_iter().map(Into::into).collect();
    layers::refuse_secret_flags(&argv)?;
    layers::parse_from(argv)
}

/// Refuses to listen beyond loopback unprotected (no key, no mutual TLS)
/// unless `--insecure`, which then warns loudly.
pub fn check_exposure(
    options: &WorkerOptions,
    key: Option<&ClusterKey>,
    channels: &ChannelOptions,
) -> Result<()> {
    let host = &options.worker.host;
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let mutual_tls = channels
        .tls
        .as_ref()
        .is_some_and(|tls| tls.requires_client_certificates());
    if loopback || key.is_some() || mutual_tls {
        return Ok(());
    }
    if !options.worker.insecure {
        return Err(DataFusionError::Configuration(format!(
            "refusing to listen on {host} without a cluster key: anyone who can reach the port \
             could run plans that read and write files as this worker. Give \
             --cluster-key-file (or DFSHIP_CLUSTER_KEY), or mutual TLS with --tls-cert, \
             --tls-key and --tls-ca; or pass --insecure if this network is isolated and you \
             accept the risk"
        )));
    }
    let warning = format!(
        "INSECURE: listening on {host} with no cluster key and no mutual TLS (--insecure): \
         anyone who reaches this port can run plans that read and write files as this \
         worker, and run Python code in its UDF runners"
    );
    eprintln!("dfship-worker: WARNING: {warning}");
    tracing::warn!("{warning}");
    Ok(())
}

/// Makes this process non-dumpable (`PR_SET_DUMPABLE` 0): its `/proc`
/// files that show memory (`environ`, `mem`, `maps`) become readable by
/// root only and other processes of its user cannot attach to it, so a UDF
/// runner cannot read the key or credentials out of it. (No core dumps
/// either; attach profilers such as py-spy as root.)
pub fn make_undumpable() {
    // SAFETY: prctl with these arguments only changes a flag of this process.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "could not make the worker non-dumpable: processes of its user can read its memory"
        );
    }
}

/// Raises this process's soft limit on open files (`RLIMIT_NOFILE`) to its
/// hard limit: every connection, runner pipe and file scan takes a file
/// descriptor, and a soft limit of 1024 (a common default) is below what
/// `--max-connections` allows. Never fails: it logs what the limit became
/// (at debug) or why it stayed; returns the soft limit in force, if known.
pub fn raise_open_file_limit() -> Option<libc::rlim_t> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not read the open-file limit (RLIMIT_NOFILE); left as it is"
        );
        return None;
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur >= limit.rlim_max {
        tracing::debug!(
            soft = before,
            hard = limit.rlim_max,
            "open-file limit (RLIMIT_NOFILE) already at its hard limit"
        );
        return Some(before);
    }
    let raised = libc::rlimit {
        rlim_cur: limit.rlim_max,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit only reads the struct; raising the soft limit up to
    // the hard one needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            soft = before,
            hard = limit.rlim_max,
            "could not raise the open-file limit (RLIMIT_NOFILE) to its hard limit; left as it is"
        );
        return Some(before);
    }
    tracing::debug!(
        before,
        now = raised.rlim_cur,
        "raised the open-file limit (RLIMIT_NOFILE) to its hard limit"
    );
    Some(raised.rlim_cur)
}

/// Warns when `--max-connections` plus what the health port and the rest of
/// the worker hold could exceed the open-file limit `open_files`.
fn check_connection_room(open_files: Option<libc::rlim_t>, max_connections: usize) {
    // Runner pipes, libraries, file scans, the health port's 64 connections.
    const OTHER_FILES: libc::rlim_t = 256;
    if let Some(open_files) = open_files {
        let needed = (max_connections as libc::rlim_t).saturating_add(OTHER_FILES);
        if needed > open_files {
            tracing::warn!(
                open_files,
                max_connections,
                "--max-connections {max_connections} leaves too little of the open-file limit \
                 ({open_files}) for the rest of the worker (about {OTHER_FILES} more): with that \
                 many connections, queries would fail with \"Too many open files\". Raise the \
                 hard limit (`ulimit -Hn`, LimitNOFILE= in systemd, --ulimit in Docker) or \
                 lower --max-connections"
            );
        }
    }
}

/// Sets up Python UDF execution and, unless strict mode means Python UDFs
/// never run here, checks it works now rather than at the first query: the
/// runners start (pool), or the interpreter imports cloudpickle and pyarrow.
pub fn prepare_python(options: &WorkerOptions) -> Result<()> {
    dfship_codec::hide_from_runners(dfship_settings::secret_files(
        &options.security,
        &options.transport,
    ));
    options.python.apply()?;
    if options.security.strict {
        return Ok(());
    }
    dfship_codec::start_python()
}

/// Binds the listener; port 0 picks a free port.
pub async fn bind(options: &WorkerOptions) -> Result<(TcpListener, SocketAddr)> {
    let address = format!("{}:{}", options.worker.host, options.worker.port);
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

/// Serves the worker on `listener` until `shutdown` resolves; with
/// [`Stop::Drain`] it drains first (`--drain-notice`, `--drain-timeout`).
pub async fn serve(
    listener: TcpListener,
    options: &WorkerOptions,
    key: Option<ClusterKey>,
    channels: ChannelOptions,
    shutdown: impl std::future::Future<Output = Stop> + Send + 'static,
) -> Result<()> {
    let storage = options.storage.storage_options()?;
    if storage.keys().next().is_some() || storage.cloud_metadata {
        let keys: Vec<&str> = storage.keys().collect();
        tracing::info!(options = ?keys, cloud_metadata = storage.cloud_metadata, "object store settings");
    }
    let mut builder = PythonWorkerSessionBuilder::with_channel_options(
        options.security.codec_options(key),
        channels,
    )
    .with_storage_options(storage);
    for spec in &options.functions.ffi_udfs {
        let udf = dfship_distributed::load_ffi_udf(spec)?;
        tracing::info!(udf = udf.name(), spec = spec.as_str(), "registered FFI UDF");
        builder = builder.with_udf(udf);
    }
    let drain = Drain::default();
    let drain_options = options.worker.drain_options();
    let _health = match options.worker.http_port {
        Some(port) => {
            let address = format!("{}:{port}", options.worker.host);
            let listener = TcpListener::bind(&address).await.map_err(|e| {
                DataFusionError::Configuration(format!(
                    "cannot listen on {address} for /livez, /readyz and /metrics: {e}; pick \
                     another --http-port (0 picks a free one)"
                ))
            })?;
            let local = listener
                .local_addr()
                .map_err(|e| DataFusionError::External(Box::new(e)))?;
            // Scripts and tests read this line.
            println!("dfship-worker http on http://{local}");
            tracing::info!(%local, "serving /livez, /readyz and /metrics");
            Some(AbortOnDrop(tokio::spawn(dfship_distributed::serve_health(
                listener,
                drain.clone(),
            ))))
        }
        None => None,
    };
    let stop = {
        let drain = drain.clone();
        async move {
            if shutdown.await == Stop::Drain {
                drain.run(&drain_options).await;
            }
        }
    };
    dfship_distributed::serve_worker_with_drain(builder, listener, drain, stop).await
}

/// Stops a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a worker is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGINT: stop now (queries running here fail; coordinators retry them).
    Now,
    /// SIGTERM: drain first (see `dfship_distributed::Drain`).
    Drain,
}

/// Resolves on SIGINT ([`Stop::Now`]) or SIGTERM ([`Stop::Drain`]).
pub async fn shutdown_signal() -> Stop {
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
        _ = interrupt => Stop::Now,
        _ = terminate => Stop::Drain,
    }
}

/// Runs a worker process to completion: checks, bind, announce, serve.
/// `key` comes from [`WorkerOptions::take_cluster_key`], called before.
pub async fn run(options: WorkerOptions, key: Option<ClusterKey>) -> Result<()> {
    make_undumpable();
    let open_files = raise_open_file_limit();
    check_connection_room(open_files, options.worker.max_connections);
    let mut channels = options.transport.channel_options()?;
    channels.max_connections = options.worker.max_connections;
    check_exposure(&options, key.as_ref(), &channels)?;
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
        strict = options.security.strict,
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

/// Logs to stderr as `format` says; `RUST_LOG` filters (default `info`).
/// The first call in a process wins.
pub fn init_logging(format: dfship_settings::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        dfship_settings::LogFormat::Text => builder.try_init(),
        // Spans (the query a line belongs to) as a list on every line.
        dfship_settings::LogFormat::Json => builder.json().with_span_list(true).try_init(),
    };
}
