//! What users read when a Python UDF call fails: the pool's [`CallError`]
//! worded with the UDF's name, the cause and the remedy, tagged with the
//! [`ErrorKind`] the Python package raises a class for.

use arrow::datatypes::DataType;
use datafusion::error::DataFusionError;
use dfship_runtime::{CallError, ErrorClass};

use crate::error::{ErrorKind, UdfPayloadError};
use crate::execution::python_execution;
use crate::pickled::PicklerVersions;
use crate::result_check::not_an_array;

/// `error`, from a call of the Python UDF `name` declared to return `returns`.
pub(crate) fn call_error(name: &str, returns: &DataType, error: CallError) -> DataFusionError {
    let execution = python_execution();
    let message = match error {
        CallError::Failed { class, text } => return runner_error(name, returns, class, &text),
        CallError::TimedOut { after } => format!(
            "{} Python UDF '{name}' did not finish a call within {after:?} (--udf-timeout); its \
             runner was killed and is replaced. Make the UDF faster, give it fewer rows per call \
             (batch_size), or raise --udf-timeout",
            ErrorKind::UdfRaised.tag()
        ),
        CallError::Cancelled => {
            format!("the query was cancelled while Python UDF '{name}' ran; its call was stopped")
        }
        CallError::Lost { how } => {
            let memory = match execution.runner_memory_limit {
                Some(limit) => format!(
                    " Its runner may use at most {} (--runner-memory-limit).",
                    human_bytes(limit)
                ),
                None => String::new(),
            };
            format!(
                "{} the runner process evaluating Python UDF '{name}' crashed: {how}. Only the \
                 calls on that runner failed; it is replaced and the worker keeps serving. Look \
                 for native code in the UDF (ctypes, extensions) or memory use.{memory}",
                ErrorKind::UdfRaised.tag()
            )
        }
        CallError::Stopped { reason } => format!(
            "{} the call of Python UDF '{name}' was stopped: {reason}. The runner is replaced and \
             the worker keeps serving; if a call timed out, make that UDF faster, give it fewer \
             rows per call (batch_size), or raise --udf-timeout",
            ErrorKind::UdfRaised.tag()
        ),
        CallError::Broken { detail } => format!(
            "{} the runner evaluating Python UDF '{name}' broke the runner protocol ({detail}); \
             it was killed and is replaced, and none of its messages reached another call. A UDF \
             must not write to its runner's socket (file descriptor 3) or otherwise talk to the \
             runner's parent",
            ErrorKind::UdfRaised.tag()
        ),
        CallError::StateLost { how } => format!(
            "{} the accumulators of Python aggregate UDF '{name}' lived in a runner that is gone \
             ({how}); their state cannot be rebuilt, so this query fails rather than give a wrong \
             answer. Run the query again; if the runner crashed, look at the UDF's memory use \
             and native code",
            ErrorKind::UdfRaised.tag()
        ),
        CallError::VersionMismatch { pickled, runner } => {
            let pickled = PicklerVersions {
                python_major: pickled.python_major,
                python_minor: pickled.python_minor,
                cloudpickle_major: pickled.cloudpickle_major,
            };
            let runner = PicklerVersions {
                python_major: runner.python_major,
                python_minor: runner.python_minor,
                cloudpickle_major: runner.cloudpickle_major,
            };
            if let Err(mismatch) = pickled.check_loadable_by(name, runner) {
                return mismatch.into();
            }
            format!("Python UDF '{name}': the runners cannot load its pickle")
        }
        CallError::StartFailed { detail } => format!(
            "{} cannot run Python UDF '{name}': {detail}",
            ErrorKind::UdfLoadFailed.tag()
        ),
    };
    DataFusionError::Execution(message)
}

/// A runner's ERROR message (`class`, `text`) as the error users see.
fn runner_error(
    name: &str,
    returns: &DataType,
    class: Option<ErrorClass>,
    text: &str,
) -> DataFusionError {
    let message = match class {
        Some(ErrorClass::Raised) => {
            format!(
                "{} Python UDF '{name}' raised: {text}",
                ErrorKind::UdfRaised.tag()
            )
        }
        Some(ErrorClass::ModuleMissing) => {
            return UdfPayloadError::ModuleNotFound {
                name: name.to_string(),
                module: text.to_string(),
            }
            .into()
        }
        Some(ErrorClass::UnpickleFailed) => {
            return UdfPayloadError::Unpickle {
                name: name.to_string(),
                detail: text.to_string(),
            }
            .into()
        }
        Some(ErrorClass::InitFailed) => format!(
            "{} Python UDF '{name}' could not create its instance: {text}. A class UDF's \
             __init__ runs once in each runner that serves it, on its first call (and again \
             there after a failure); make it succeed on every worker",
            ErrorKind::UdfLoadFailed.tag()
        ),
        Some(ErrorClass::NotAnArray) => return not_an_array(name, returns, text),
        Some(ErrorClass::BadResult) => format!(
            "{} Python UDF '{name}': {text}",
            ErrorKind::UdfBadResult.tag()
        ),
        Some(ErrorClass::OutOfMemory) => match python_execution().runner_memory_limit {
            Some(limit) => format!(
                "{} Python UDF '{name}' ran out of memory: its runner may use at most {} \
                 (--runner-memory-limit); give it fewer rows per call (batch_size), use less \
                 memory per call, or raise the limit ({text})",
                ErrorKind::UdfRaised.tag(),
                human_bytes(limit)
            ),
            None => format!(
                "{} Python UDF '{name}' ran out of memory ({text})",
                ErrorKind::UdfRaised.tag()
            ),
        },
        Some(ErrorClass::Protocol | ErrorClass::Startup) | None => format!(
            "{} the runner of Python UDF '{name}' failed: {text}",
            ErrorKind::UdfLoadFailed.tag()
        ),
    };
    DataFusionError::Execution(message)
}

/// 512 MiB, 2 GiB, 1.5 GiB, 900 KiB…
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if bytes >= size {
            let value = bytes as f64 / size as f64;
            return if value.fract() == 0.0 {
                format!("{value:.0} {unit}")
            } else {
                format!("{value:.1} {unit}")
            };
        }
    }
    format!("{bytes} bytes")
}
