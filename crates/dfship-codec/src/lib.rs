//! Ship Python scalar UDFs inside DataFusion physical plans.
//!
//! [`PythonUdfCodec`] is a datafusion-proto `PhysicalExtensionCodec`: a plan
//! that calls a [`PythonScalarUdf`] carries the cloudpickled callable inline,
//! so the process that decodes it needs no registration; every other UDF
//! (native, FFI) travels by name as usual.
//!
//! Module map:
//! - [`python_udf`]: the `ScalarUDFImpl` that calls Python through pyarrow.
//! - [`codec`]: the extension codec (encode/decode dispatch, strict mode, limits).
//! - [`wire`]: byte layouts, ours (`DFSHIPU`) and datafusion-python's (`DFPYUDF`).
//! - [`auth`]: the shared cluster key (HMAC-SHA256).
//! - [`cache`]: the per-process cache of unpickled callables.
//! - [`python`]: interpreter start-up and environment.
//! - `declarations`: loading `udf()` declarations from a Python file or module.

mod auth;
mod cache;
mod callable;
pub mod codec;
mod declarations;
mod error;
mod options;
pub mod python;
pub mod python_udf;
mod signature;
pub mod wire;

pub use auth::{ClusterKey, CLUSTER_KEY_ENV, MIN_KEY_BYTES};
pub use cache::{CacheStats, CallableCache, DEFAULT_CACHE_CAPACITY};
pub use callable::PicklerVersions;
pub use codec::PythonUdfCodec;
pub use declarations::{
    load_python_udfs_from_file, load_python_udfs_from_module, python_udf_from_declaration,
};
pub use error::UdfPayloadError;
pub use options::{CodecOptions, DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_WARN_PAYLOAD_BYTES};
pub use python::ensure_python;
pub use python_udf::PythonScalarUdf;
pub use signature::UdfSignature;
pub use wire::WireFormat;
