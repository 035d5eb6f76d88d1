//! How errors that come back from a worker are worded for the user: a
//! missing by-name UDF names the flag that provides it, a lost connection
//! names the worker and what to do, and every error says which worker it
//! came from.

use datafusion::error::DataFusionError;
use dfship_codec::ErrorKind;
use url::Url;

/// What upstream says when a by-name UDF is missing from a worker's registry.
const MISSING_UDF: &str = "PhysicalExtensionCodec is not provided for scalar function ";

/// Rewrites a worker's "missing UDF" error to name the UDF, the worker and the remedy.
fn explain_missing_udf(error: DataFusionError, worker: &Url) -> DataFusionError {
    let text = error.to_string();
    let Some(at) = text.find(MISSING_UDF) else {
        return error;
    };
    let name: String = text[at + MISSING_UDF.len()..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"' && *c != '\'')
        .collect();
    DataFusionError::Plan(format!(
        "{} worker {worker} has no scalar function '{name}'. It is not a Python UDF, so it travels \
         by name and every worker must register it: start the workers with \
         `--ffi-udf SPEC` providing '{name}' (SPEC is /path/to/lib.so:symbol or \
         python.module:attribute), or register it in their session builder. ({text})",
        ErrorKind::Planning.tag()
    ))
}

/// Explains a missing by-name UDF, and otherwise adds the worker's URL to
/// an error that does not name it yet (errors from deeper stages keep the
/// name of the worker they started on).
pub(crate) fn explain_worker_error(error: DataFusionError, worker: &Url) -> DataFusionError {
    let error = explain_missing_udf(error, worker);
    let text = error.to_string();
    let url = worker.as_str().trim_end_matches('/');
    if text.contains(url) {
        return error;
    }
    let lost = [
        "h2 protocol error",
        "transport error",
        "broken pipe",
        "connection reset",
        "connection refused",
        "tcp connect error",
        "the service is currently unavailable",
        "keepalive",
    ]
    .iter()
    .any(|needle| text.to_lowercase().contains(needle));
    let context = if lost {
        format!(
            "{} lost the connection to worker {url} (it stopped, or the network to it failed); the \
             query cannot finish without it: check that worker, or run the query again with it \
             left out of the worker list",
            ErrorKind::WorkerLost.tag()
        )
    } else {
        format!("on worker {url}")
    };
    DataFusionError::Context(context, Box::new(error))
}

/// What upstream says when a worker waited in vain for a task's plan.
const PLAN_WAIT_TIMEOUT: &str = "timed-out while waiting for the plan to be set";

/// How long a failure to send a plan explains a worker's later timeout.
const FAILURE_MEMORY: std::time::Duration = std::time::Duration::from_secs(120);

/// Why sending a stage plan to a worker failed, kept for a while.
///
/// datafusion-distributed sends each task's plan from a background task
/// whose error it reports only after the query ends; meanwhile the query
/// fails with the worker's "timed-out while waiting for the plan to be set"
/// ten seconds later. Remembering the real cause per worker lets that
/// timeout be replaced by it.
#[derive(Debug, Clone, Default)]
pub(crate) struct PlanSendFailures(
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<Url, (std::time::Instant, String)>>>,
);

impl PlanSendFailures {
    pub(crate) fn record(&self, worker: &Url, error: &DataFusionError) {
        tracing::error!(%worker, %error, "could not send a stage plan");
        let mut failures = self.0.lock().unwrap_or_else(|p| p.into_inner());
        failures.retain(|_, (when, _)| when.elapsed() < FAILURE_MEMORY);
        failures.insert(
            worker.clone(),
            (std::time::Instant::now(), error.to_string()),
        );
    }

    /// `error`, or the recorded reason the worker never got its plan.
    pub(crate) fn explain(&self, error: DataFusionError, worker: &Url) -> DataFusionError {
        if !error.to_string().contains(PLAN_WAIT_TIMEOUT) {
            return error;
        }
        let failures = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match failures.get(worker) {
            Some((when, cause)) if when.elapsed() < FAILURE_MEMORY => DataFusionError::Context(
                format!("the coordinator could not send worker {worker} its plan: {cause}"),
                Box::new(error),
            ),
            _ => error,
        }
    }
}
