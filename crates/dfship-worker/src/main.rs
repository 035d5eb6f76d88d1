use clap::Parser;

fn main() -> std::process::ExitCode {
    dfship_worker::init_logging();
    let command = dfship_worker::WorkerCommand::parse();
    // The key is read, and removed from the environment, before any other
    // thread (the runtime's) or Python starts.
    let result = command.options.take_cluster_key().and_then(|key| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?
            .block_on(dfship_worker::run(command.options, key))
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("dfship-worker: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
