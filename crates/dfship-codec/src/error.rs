//! Every way an inline UDF payload can be refused, each with the remedy.
//!
//! Errors cross into DataFusion as `DataFusionError::External(Box<UdfPayloadError>)`,
//! so callers can match on the class with [`UdfPayloadError::find`].

use datafusion::error::DataFusionError;

/// Why an inline Python UDF payload could not be encoded, decoded or loaded.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum UdfPayloadError {
    #[error(
        "no inline definition was sent for scalar function '{name}', and this codec only \
         rebuilds Python UDFs from inline payloads; register '{name}' in this process's \
         function registry (it travels by name)"
    )]
    NotInline { name: String },

    #[error(
        "inline payload for scalar function '{name}' has an unknown format (starts with \
         {prefix}); expected a DFSHIPU frame (this project) or DFPYUDF (datafusion-python). \
         Make sure coordinator and workers use the same codec"
    )]
    UnknownFamily { name: String, prefix: String },

    #[error(
        "inline payload for scalar function '{name}' uses {family} format version {found}, \
         but this build reads only version {supported}; upgrade the receiving side"
    )]
    UnsupportedVersion {
        name: String,
        family: &'static str,
        found: u8,
        supported: u8,
    },

    #[error(
        "inline payload for scalar function '{name}' is truncated: reading {what} at byte \
         {offset} needs {needed} bytes but only {available} remain; the plan bytes were \
         corrupted or cut in transit"
    )]
    Truncated {
        name: String,
        what: &'static str,
        offset: usize,
        needed: usize,
        available: usize,
    },

    #[error(
        "inline payload for scalar function '{name}' is malformed: {detail}; the plan \
         bytes were corrupted, or were written by an incompatible encoder"
    )]
    Malformed { name: String, detail: String },

    #[error(
        "inline payload names scalar function '{found}' but the plan calls '{expected}'; \
         the plan bytes were tampered with or spliced"
    )]
    NameMismatch { expected: String, found: String },

    #[error(
        "inline payload for scalar function '{name}' failed its integrity check (SHA-256 of \
         the pickled callable does not match the digest in the frame); the plan bytes were \
         corrupted in transit"
    )]
    DigestMismatch { name: String },

    #[error(
        "refusing inline payload for scalar function '{name}': this process requires payloads \
         signed with the cluster key, and this one is unsigned; configure the same cluster \
         key (key file or environment variable) on the coordinator that planned the query"
    )]
    Unsigned { name: String },

    #[error(
        "refusing inline payload for scalar function '{name}': its HMAC-SHA256 tag does not \
         match the cluster key of this process; coordinator and workers must use the same key"
    )]
    BadTag { name: String },

    #[error(
        "inline payload for scalar function '{name}' is {size} bytes, above the limit of \
         {limit} bytes; avoid capturing large objects in the UDF (load data inside the \
         function instead), or raise the payload size limit on every process"
    )]
    TooLarge {
        name: String,
        size: usize,
        limit: usize,
    },

    #[error(
        "refusing inline Python payload for scalar function '{name}': strict mode is on, so \
         Python UDFs are never unpickled here; register '{name}' on this process by name, or \
         turn strict mode off on every worker that should run inline Python UDFs"
    )]
    Strict { name: String },

    #[error(
        "Python UDF '{name}' was pickled by Python {payload_major}.{payload_minor} but this \
         process runs Python {local_major}.{local_minor}; cloudpickle bytecode is not \
         portable across Python minor versions: run coordinator and workers on the same \
         Python minor version"
    )]
    PythonVersion {
        name: String,
        payload_major: u8,
        payload_minor: u8,
        local_major: u8,
        local_minor: u8,
    },

    #[error(
        "Python UDF '{name}' was pickled by cloudpickle {payload} but this process has \
         cloudpickle {local}; payloads do not load across cloudpickle major versions: install \
         the same cloudpickle major version everywhere"
    )]
    CloudpickleVersion {
        name: String,
        payload: u8,
        local: u8,
    },

    #[error(
        "Python UDF '{name}' could not be loaded: module '{module}' is not installed in this \
         process's Python environment. Functions and modules a UDF imports travel by \
         reference, not by value: install '{module}' on every worker, or call \
         cloudpickle.register_pickle_by_value({module}) before defining the UDF so it travels \
         inside the payload"
    )]
    ModuleNotFound { name: String, module: String },

    #[error(
        "Python UDF '{name}' could not be unpickled: {detail}; check that coordinator and \
         workers have the same Python packages installed"
    )]
    Unpickle { name: String, detail: String },

    #[error("Python UDF '{name}' could not be pickled: {detail}")]
    Pickle { name: String, detail: String },
}

impl UdfPayloadError {
    /// Finds the payload error inside a DataFusion error, however deeply wrapped.
    pub fn find(error: &DataFusionError) -> Option<&UdfPayloadError> {
        match error {
            DataFusionError::External(inner) => inner.downcast_ref::<UdfPayloadError>(),
            DataFusionError::Context(_, inner) | DataFusionError::Diagnostic(_, inner) => {
                Self::find(inner)
            }
            DataFusionError::Shared(inner) => Self::find(inner),
            _ => None,
        }
    }
}

impl From<UdfPayloadError> for DataFusionError {
    fn from(error: UdfPayloadError) -> Self {
        DataFusionError::External(Box::new(error))
    }
}
