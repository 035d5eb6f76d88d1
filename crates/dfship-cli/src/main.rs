//! `dfship`: SQL with Python UDFs on a datafusion-distributed cluster.
//!
//! - `dfship sql`: run a query against `--workers`, print or write the result.
//! - `dfship explain`: the distributed plan, and how each UDF travels.
//! - `dfship worker`: run a worker (same as `dfship-worker`).
//! - `dfship demo`: start a local cluster and run Python UDF queries on a generated dataset.
//! - `dfship tls-init`: a certificate authority and certificate for test clusters.

mod cluster;
mod demo;
mod local_cluster;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "dfship",
    version,
    about = "SQL with Python UDFs on a datafusion-distributed cluster"
)]
struct Cli {
    /// Log lines on stderr as `text` or `json` (one object per line, with
    /// the query id of the lines a query logs); `RUST_LOG` filters. For
    /// `dfship worker`, its own --log-format.
    #[arg(long, env = "DFSHIP_LOG_FORMAT", default_value = "text")]
    log_format: dfship_settings::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a SQL query on the cluster and print (or write) its result.
    Sql(cluster::SqlArgs),
    /// Show the distributed plan of a query and how its UDFs travel.
    Explain(cluster::ExplainArgs),
    /// Run a worker (the same as the dfship-worker binary).
    Worker(dfship_worker::WorkerOptions),
    /// Start a local cluster, generate a dataset and run Python UDF queries on it.
    Demo(demo::DemoArgs),
    /// Write a fresh certificate authority and a certificate for test or
    /// local clusters (ca.pem, cert.pem, key.pem); use your own PKI in production.
    TlsInit(TlsInitArgs),
}

#[derive(clap::Args)]
struct TlsInitArgs {
    /// Folder to write ca.pem, cert.pem and key.pem into.
    #[arg(long)]
    out: std::path::PathBuf,
    /// A host name or IP address the certificate is valid for (repeatable).
    #[arg(long = "host", required = true)]
    hosts: Vec<String>,
}

/// What `dfship sql`/`explain` say when Ctrl-C stopped them.
const INTERRUPTED: &str =
    "interrupted (Ctrl-C): the query was cancelled, and its tasks end on every worker";

/// Runs `work` until it ends or Ctrl-C (SIGINT) comes; then `work` is
/// dropped, which cancels its query on every worker (`dfship_distributed::collect_with`).
async fn until_interrupted(
    work: impl std::future::Future<Output = datafusion::error::Result<()>>,
) -> datafusion::error::Result<()> {
    tokio::select! {
        result = work => result,
        _ = tokio::signal::ctrl_c() => {
            Err(datafusion::error::DataFusionError::Execution(INTERRUPTED.to_string()))
        }
    }
}

fn main() -> ExitCode {
    let (log_format, command) = match dfship_settings::layers::parse_command_line::<Cli>() {
        Ok(cli) => (cli.log_format, cli.command),
        Err(error) => {
            // --help and --version print and succeed; usage errors print and fail.
            let _ = error.print();
            return ExitCode::from(error.exit_code() as u8);
        }
    };
    dfship_worker::init_logging(match &command {
        Command::Worker(options) => options.worker.log_format,
        _ => log_format,
    });
    // A cluster key is read, and removed from the environment, before any
    // other thread (the runtime's) or Python starts.
    let key = match &command {
        Command::Sql(args) => args.cluster.take_cluster_key(),
        Command::Explain(args) => args.cluster.take_cluster_key(),
        Command::Worker(options) => options.security.take_cluster_key(),
        Command::Demo(_) | Command::TlsInit(_) => Ok(None),
    };
    let result = key.and_then(|key| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
        runtime.block_on(async move {
            match command {
                Command::Sql(args) => until_interrupted(cluster::sql(args, key)).await,
                Command::Explain(args) => until_interrupted(cluster::explain(args, key)).await,
                Command::Worker(options) => dfship_worker::run(options, key).await,
                Command::Demo(args) => demo::run(args).await,
                Command::TlsInit(args) => {
                    let files = dfship_distributed::generate_tls_files(&args.out, &args.hosts)?;
                    println!(
                        "wrote {}, {} and {} (valid for {})",
                        files.ca.display(),
                        files.cert.display(),
                        files.key.display(),
                        args.hosts.join(", ")
                    );
                    Ok(())
                }
            }
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.to_string().contains(INTERRUPTED) => {
            eprintln!("dfship: {INTERRUPTED}");
            // As shells report a command stopped by SIGINT.
            ExitCode::from(130)
        }
        Err(error) => {
            eprintln!("dfship: {error}");
            ExitCode::FAILURE
        }
    }
}
