fn main() -> std::process::ExitCode {
    let options = match dfship_worker::parse_worker_args(std::env::args_os()) {
        Ok(options) => options,
        Err(error) => {
            // --help and --version print and succeed; usage errors print and fail.
            let _ = error.print();
            return std::process::ExitCode::from(error.exit_code() as u8);
        }
    };
    dfship_worker::init_logging(options.worker.log_format);
    // The key is read, and removed from the environment, before any other
    // thread (the runtime's) or Python starts.
    let result = options.security.take_cluster_key().and_then(|key| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?
            .block_on(dfship_worker::run(options, key))
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("dfship-worker: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
