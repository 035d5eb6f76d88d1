use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    dfship_worker::init_logging();
    let command = dfship_worker::WorkerCommand::parse();
    match dfship_worker::run(command.options).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("dfship-worker: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
