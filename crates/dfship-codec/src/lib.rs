//! Ship Python UDFs (scalar, aggregate and window) inside DataFusion plans.
//!
//! [`PythonUdfCodec`] is a datafusion-proto `PhysicalExtensionCodec`: a plan
//! that calls a [`PythonScalarUdf`] carries the cloudpickled callable inline,
//! so the process that decodes it needs no registration; every other UDF
//! (native, FFI) travels by name as usual. [`PythonUdfLogicalCodec`] does the
//! same for logical plans (datafusion-python's `LogicalPlan.to_bytes()`).
//!
//! Layers, bottom up (a module only uses the ones above it in this list):
//! - pure bytes, no interpreter: `error`, `auth` (the cluster key),
//!   `signature` (types and their Arrow IPC form), `pickled` (a pickle's
//!   digest and versions), and [`wire`] (the `DFSHIPU` and `DFPYUDF` byte layouts);
//! - the interpreter: `python` (start-up, environment, cloudpickle calls),
//!   `cache` (unpickled callables by digest), `callable` (live or pickled);
//! - where Python runs: `execution` (the glue to `dfship-runtime`'s runner
//!   pool: calls, runner-held aggregate state, error wording),
//!   `result_check` (what a UDF returns is validated before the engine reads it);
//! - UDFs and formats: `python_udf` (the `ScalarUDFImpl`), `payload` (the
//!   Python work of each format, `encode`/`decode` per format), `declarations`
//!   (`dfship.udf` declarations from files and modules);
//! - codecs: `options`, `codec` (dispatch, strict mode, limits), `logical_codec`.

mod auth;
mod cache;
mod call_options;
mod callable;
mod codec;
mod declarations;
mod error;
mod execution;
mod function;
mod logical_codec;
mod options;
mod payload;
mod pickled;
mod python;
mod python_udaf;
mod python_udf;
mod python_udwf;
mod result_check;
mod signature;
mod store;
mod task_binding;
mod window_node;
pub mod wire;

pub use auth::{erase_env_var, ClusterKey, CLUSTER_KEY_ENV, MIN_KEY_BYTES};
pub use cache::{CacheStats, CallableCache, DEFAULT_CACHE_BYTES};
pub use call_options::CallOptions;
pub use codec::{KeptPayloads, PythonUdfCodec, BY_DIGEST_MIN_BYTES};
pub use declarations::{
    load_python_udfs_from_file, load_python_udfs_from_module, python_udf_from_declaration,
    PythonUdf,
};
/// The user runner processes run as (see [`PythonExecution::with_runner_user`]).
pub use dfship_runtime::landlock::hide_from_runners;
pub use dfship_runtime::OutputStream;
pub use dfship_runtime::{Isolation, RunnerUser, DEFAULT_CALL_TIMEOUT};
pub use error::{ErrorKind, UdfPayloadError};
pub use execution::{
    bind_task_output, configure_python_execution, default_python, default_runners, end_task,
    forget_query_output, label_task, python_execution, query_figures, runner_pool_stats,
    set_query_output, start_python, take_query_output, task_token, udf_figures, CancelToken,
    OutputLimits, OutputLine, OutputOrigin, PoolStats, PythonExecution, PythonMode, TakenOutput,
    TaskLabel, TaskOptions, UdfFigures, UdfOutputMode, DEFAULT_OUTPUT_BYTES, DEFAULT_OUTPUT_LINES,
};
pub use logical_codec::PythonUdfLogicalCodec;
pub use options::{CodecOptions, DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_WARN_PAYLOAD_BYTES};
pub use pickled::{PickleContent, PickledCallable, PicklerVersions};
pub use python::{ensure_python, is_running as python_is_running, use_python_environment};
pub use python_udaf::PythonAggregateUdf;
pub use python_udf::PythonScalarUdf;
pub use python_udwf::PythonWindowUdf;
pub use signature::UdfSignature;
pub use store::{PayloadStore, DEFAULT_STORE_BYTES, DEFAULT_STORE_WAIT};
pub use task_binding::bind_python_udfs_to_task;
pub use window_node::{
    attach_window_frames, wrap_python_windows, AttachWindowFrames, PythonWindowNode,
};
pub use wire::{FunctionKind, WireFormat};
