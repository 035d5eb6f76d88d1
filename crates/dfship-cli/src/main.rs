//! `dfship`: SQL with Python UDFs on a datafusion-distributed cluster.
//!
//! - `dfship sql`: run a query against `--workers`, print or write the result.
//! - `dfship explain`: the distributed plan, and how each UDF travels.
//! - `dfship worker`: run a worker (same as `dfship-worker`).
//! - `dfship demo`: start a local cluster and run Python UDF queries on a generated dataset.

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
}

#[tokio::main]
async fn main() -> ExitCode {
    dfship_worker::init_logging();
    let result = match Cli::parse().command {
        Command::Sql(args) => cluster::sql(args).await,
        Command::Explain(args) => cluster::explain(args).await,
        Command::Worker(options) => dfship_worker::run(options).await,
        Command::Demo(args) => demo::run(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("dfship: {error}");
            ExitCode::FAILURE
        }
    }
}
