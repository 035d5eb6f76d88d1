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
