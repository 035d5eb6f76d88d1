//! Every way an inline UDF payload can be refused, each with the remedy, and
//! the [`ErrorKind`] every dfship error belongs to.
//!
//! Errors cross into DataFusion as `DataFusionError::External(Box<UdfPayloadError>)`,
//! so callers in the same process can match on the variant with
//! [`UdfPayloadError::find`]. Errors from a worker reach the coordinator as
//! text (datafusion-distributed keeps DataFusion's error variants but turns
//! external errors into strings), so every dfship message starts with the
//! tag of its kind, e.g. `[payload-refused]`, and [`ErrorKind::of`] reads
//! the kind back from either form.

use datafusion::error::DataFusionError;

/// Why an inline Python UDF payload could not be encoded, decoded or loaded.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum UdfPayloadError {
    #[error(
        "[planning] no inline definition was sent for function '{name}', and this codec only \
         rebuilds Python UDFs from inline payloads; register '{name}' in this process's \
         function registry (it travels by name)"
    )]
    NotInline { name: String },

    #[error(
        "[payload-refused] inline payload for function '{name}' has an unknown format (starts with \
         {prefix}); expected a DFSHIPU frame (this project) or DFPYUDF (datafusion-python). \
         Make sure coordinator and workers use the same codec"
    )]
    UnknownFamily { name: String, prefix: String },

    #[error(
        "[payload-refused] inline payload for function '{name}' uses {family} format version {found}, \
         but this build reads only version {supported}; upgrade the receiving side"
    )]
    UnsupportedVersion {
        name: String,
        family: &'static str,
        found: u8,
        supported: u8,
    },

    #[error(
        "[payload-refused] inline payload for function '{name}' is truncated: reading {what} at byte \
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
        "[payload-refused] inline payload for function '{name}' is malformed: {detail}; the plan \
         bytes were corrupted, or were written by an incompatible encoder"
    )]
    Malformed { name: String, detail: String },

    #[error(
        "[payload-refused] inline payload names function '{found}' but the plan calls '{expected}'; \
         the plan bytes were tampered with or spliced"
    )]
    NameMismatch { expected: String, found: String },

    #[error(
        "[payload-refused] inline payload for function '{name}' failed its integrity check (SHA-256 of \
         the pickled callable does not match the digest in the frame); the plan bytes were \
         corrupted in transit"
    )]
    DigestMismatch { name: String },

    #[error(
        "[payload-refused] refusing inline payload for function '{name}': this process requires payloads \
         signed with the cluster key, and this one is unsigned; configure the same cluster \
         key (key file or environment variable) on the coordinator that planned the query"
    )]
    Unsigned { name: String },

    #[error(
        "[payload-refused] refusing the datafusion-python (DFPYUDF) payload for function \
         '{name}': this process requires payloads signed with the cluster key, and DFPYUDF cannot \
         carry a signature; run datafusion-python plans through a dfship coordinator that has \
         the key (ClusterContext.execute_datafusion_plan re-signs their UDFs), and keep its \
         write format at dfship frames"
    )]
    UnsignableDataFusionPython { name: String },

    #[error(
        "[payload-refused] refusing inline payload for function '{name}': its HMAC-SHA256 tag does not \
         match the cluster key of this process; coordinator and workers must use the same key"
    )]
    BadTag { name: String },

    #[error(
        "[payload-refused] inline payload for function '{name}' is {size} bytes, above the limit of \
         {limit} bytes; avoid capturing large objects in the UDF (load data inside the \
         function instead), or raise the payload size limit on every process"
    )]
    TooLarge {
        name: String,
        size: usize,
        limit: usize,
    },

    #[error(
        "[payload-refused] refusing inline Python payload for function '{name}': strict mode is on, so \
         Python UDFs are never unpickled here; register '{name}' on this process by name, or \
         turn strict mode off on every worker that should run inline Python UDFs"
    )]
    Strict { name: String },

    #[error(
        "[version-mismatch] Python UDF '{name}' was pickled by Python {payload_major}.{payload_minor} but this \
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
        "[version-mismatch] Python UDF '{name}' was pickled by cloudpickle {payload} but this process has \
         cloudpickle {local}; payloads do not load across cloudpickle major versions: install \
         the same cloudpickle major version everywhere"
    )]
    CloudpickleVersion {
        name: String,
        payload: u8,
        local: u8,
    },

    #[error(
        "[udf-load-failed] Python UDF '{name}' could not be loaded: module '{module}' is not installed in this \
         process's Python environment. Functions and modules a UDF imports travel by \
         reference, not by value: install '{module}' on every worker, or call \
         cloudpickle.register_pickle_by_value({module}) before defining the UDF so it travels \
         inside the payload"
    )]
    ModuleNotFound { name: String, module: String },

    #[error(
        "[udf-load-failed] Python UDF '{name}' could not be unpickled: {detail}; check that coordinator and \
         workers have the same Python packages installed"
    )]
    Unpickle { name: String, detail: String },

    #[error("[udf-load-failed] Python UDF '{name}' could not be pickled: {detail}")]
    Pickle { name: String, detail: String },

    #[error(
        "[udf-load-failed] the plan names Python UDF '{name}' by the digest of its pickle \
         ({digest}), but this worker does not hold that pickle (waited {waited_secs} s): it \
         restarted, or dropped it to keep others, after the coordinator checked; run the query \
         again (the coordinator then hands it the pickle first)"
    )]
    MissingPickle {
        name: String,
        digest: String,
        waited_secs: u64,
    },
}

impl UdfPayloadError {
    /// The kind of failure, the tag this error's message starts with.
    pub fn kind(&self) -> ErrorKind {
        use UdfPayloadError::*;
        match self {
            NotInline { .. } => ErrorKind::Planning,
            UnknownFamily { .. }
            | UnsupportedVersion { .. }
            | Truncated { .. }
            | Malformed { .. }
            | NameMismatch { .. }
            | DigestMismatch { .. }
            | Unsigned { .. }
            | UnsignableDataFusionPython { .. }
            | BadTag { .. }
            | TooLarge { .. }
            | Strict { .. } => ErrorKind::PayloadRefused,
            PythonVersion { .. } | CloudpickleVersion { .. } => ErrorKind::VersionMismatch,
            ModuleNotFound { .. } | Unpickle { .. } | Pickle { .. } | MissingPickle { .. } => {
                ErrorKind::UdfLoadFailed
            }
        }
    }

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

/// The cause of an error, as users handle it (the Python package raises one
/// exception class per kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// An inline payload was refused before anything was unpickled: strict
    /// mode, a missing or wrong signature, a size limit, corrupted bytes.
    PayloadRefused,
    /// The payload was pickled by another Python minor or cloudpickle major version.
    VersionMismatch,
    /// The callable could not be pickled or unpickled (e.g. a module it
    /// imports is missing where it runs).
    UdfLoadFailed,
    /// The UDF raised an exception.
    UdfRaised,
    /// The UDF returned something other than what it declared: wrong
    /// length, type or nullability, or an invalid Arrow array.
    UdfBadResult,
    /// A worker stopped or became unreachable during the query.
    WorkerLost,
    /// A worker refused this client: it lacks the cluster key (or the key
    /// differs), or a replayed request.
    Unauthenticated,
    /// The query could not be planned: SQL, schema, configuration, or a
    /// by-name function no process provides.
    Planning,
    /// An object store (S3, GCS, Azure, HTTP) failed or is not set up:
    /// missing credentials, a missing bucket or object, an endpoint that
    /// does not answer, a URL scheme no store serves.
    Storage,
    /// The query ran past its timeout (`query_timeout`, `timeout=`) and was
    /// cancelled on every worker.
    QueryTimeout,
    /// Anything else (I/O, resources, internal errors).
    Other,
}

impl ErrorKind {
    const TAGGED: [ErrorKind; 10] = [
        ErrorKind::QueryTimeout,
        ErrorKind::PayloadRefused,
        ErrorKind::VersionMismatch,
        ErrorKind::UdfLoadFailed,
        ErrorKind::UdfRaised,
        ErrorKind::UdfBadResult,
        ErrorKind::WorkerLost,
        ErrorKind::Unauthenticated,
        ErrorKind::Planning,
        ErrorKind::Storage,
    ];

    /// The short name in the tag, e.g. `payload-refused`.
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::PayloadRefused => "payload-refused",
            ErrorKind::VersionMismatch => "version-mismatch",
            ErrorKind::UdfLoadFailed => "udf-load-failed",
            ErrorKind::UdfRaised => "udf-raised",
            ErrorKind::UdfBadResult => "udf-bad-result",
            ErrorKind::WorkerLost => "worker-lost",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::Planning => "planning",
            ErrorKind::Storage => "storage",
            ErrorKind::QueryTimeout => "query-timeout",
            ErrorKind::Other => "other",
        }
    }

    /// `[code]`, the prefix of a message of this kind.
    pub fn tag(self) -> String {
        format!("[{}]", self.code())
    }

    /// The kind of `error`: the first tag in its text (the outermost
    /// dfship message), else `Storage` for `object_store`'s errors (also
    /// as text, from a worker), else `Planning` for DataFusion's planning
    /// variants, else `Other`.
    pub fn of(error: &DataFusionError) -> ErrorKind {
        let text = error.to_string();
        let tagged = Self::TAGGED
            .iter()
            .filter_map(|kind| text.find(&kind.tag()).map(|at| (at, *kind)))
            .min_by_key(|(at, _)| *at);
        if let Some((_, kind)) = tagged {
            return kind;
        }
        // DataFusion's display of an `object_store` error, also in the text
        // of an error that came back from a worker.
        if text.contains("Object Store error: ") {
            return ErrorKind::Storage;
        }
        match root(error) {
            DataFusionError::ObjectStore(_) => ErrorKind::Storage,
            DataFusionError::Plan(_)
            | DataFusionError::SQL(..)
            | DataFusionError::SchemaError(..)
            | DataFusionError::Configuration(_)
            | DataFusionError::NotImplemented(_) => ErrorKind::Planning,
            _ => ErrorKind::Other,
        }
    }
}

/// The innermost error under contexts, diagnostics and shared wrappers.
fn root(error: &DataFusionError) -> &DataFusionError {
    match error {
        DataFusionError::Context(_, inner) | DataFusionError::Diagnostic(_, inner) => root(inner),
        DataFusionError::Shared(inner) => root(inner),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_variant() -> Vec<UdfPayloadError> {
        use UdfPayloadError::*;
        let name = || "f".to_string();
        vec![
            NotInline { name: name() },
            UnknownFamily {
                name: name(),
                prefix: "x".into(),
            },
            UnsupportedVersion {
                name: name(),
                family: "DFSHIPU",
                found: 9,
                supported: 1,
            },
            Truncated {
                name: name(),
                what: "the magic",
                offset: 0,
                needed: 7,
                available: 1,
            },
            Malformed {
                name: name(),
                detail: "d".into(),
            },
            NameMismatch {
                expected: name(),
                found: "g".into(),
            },
            DigestMismatch { name: name() },
            Unsigned { name: name() },
            UnsignableDataFusionPython { name: name() },
            BadTag { name: name() },
            TooLarge {
                name: name(),
                size: 2,
                limit: 1,
            },
            Strict { name: name() },
            PythonVersion {
                name: name(),
                payload_major: 3,
                payload_minor: 11,
                local_major: 3,
                local_minor: 13,
            },
            CloudpickleVersion {
                name: name(),
                payload: 3,
                local: 2,
            },
            ModuleNotFound {
                name: name(),
                module: "m".into(),
            },
            Unpickle {
                name: name(),
                detail: "d".into(),
            },
            Pickle {
                name: name(),
                detail: "d".into(),
            },
        ]
    }

    #[test]
    fn every_payload_error_starts_with_the_tag_of_its_kind() {
        for error in every_variant() {
            let kind = error.kind();
            assert!(error.to_string().starts_with(&kind.tag()), "{error}");
            // ...and reads back as that kind, typed or as text from a worker.
            let typed = DataFusionError::from(error.clone());
            assert_eq!(ErrorKind::of(&typed), kind, "{error}");
            let remote = DataFusionError::Context(
                "on worker http://10.0.0.5:50051".into(),
                Box::new(DataFusionError::External(error.to_string().into())),
            );
            assert_eq!(ErrorKind::of(&remote), kind, "{error}");
        }
    }

    #[test]
    fn untagged_errors_fall_back_to_their_variant() {
        let plan = DataFusionError::Context(
            "c".into(),
            Box::new(DataFusionError::Plan("table 'x' not found".into())),
        );
        assert_eq!(ErrorKind::of(&plan), ErrorKind::Planning);
        let io = DataFusionError::IoError(std::io::Error::other("disk"));
        assert_eq!(ErrorKind::of(&io), ErrorKind::Other);
    }
}
