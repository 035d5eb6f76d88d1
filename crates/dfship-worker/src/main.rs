use clap::Parser;

/// A datafusion-distributed worker that runs Python UDFs sent inline in plans.
#[derive(Parser)]
#[command(name = "dfship-worker", version)]
struct Cli {
    #[command(flatten)]
    options: dfship_worker::WorkerOptions,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    dfship_worker::init_logging();
    let cli = Cli::parse();
    match dfship_worker::run(cli.options).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("dfship-worker: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
