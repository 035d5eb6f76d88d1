//! Facts about a pickled callable that need no interpreter: its bytes, their
//! SHA-256 digest, and which Python and cloudpickle wrote them.
//!
//! This module is pure (no pyo3), so the byte layouts in [`crate::wire`] can
//! depend on it while the Python layer sits above both.

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::error::UdfPayloadError;

/// The SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The Python and cloudpickle versions that produced a pickle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PicklerVersions {
    pub python_major: u8,
    pub python_minor: u8,
    pub cloudpickle_major: u8,
}

impl PicklerVersions {
    /// Whether a process with `local` versions can load what `self` wrote:
    /// cloudpickle bytecode is not portable across Python minor versions, and
    /// payloads do not load across cloudpickle major versions.
    pub fn check_loadable_by(
        self,
        udf_name: &str,
        local: PicklerVersions,
    ) -> Result<(), UdfPayloadError> {
        if (self.python_major, self.python_minor) != (local.python_major, local.python_minor) {
            return Err(UdfPayloadError::PythonVersion {
                name: udf_name.to_string(),
                payload_major: self.python_major,
                payload_minor: self.python_minor,
                local_major: local.python_major,
                local_minor: local.python_minor,
            });
        }
        if self.cloudpickle_major != local.cloudpickle_major {
            return Err(UdfPayloadError::CloudpickleVersion {
                name: udf_name.to_string(),
                payload: self.cloudpickle_major,
                local: local.cloudpickle_major,
            });
        }
        Ok(())
    }
}

/// What a pickle holds: a bare callable (our frame) or datafusion-python's
/// `(name, func, input_schema, return_schema, volatility)` tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PickleContent {
    Callable,
    DataFusionPythonTuple,
}

/// A cloudpickled callable, its digest, and who pickled it.
///
/// `bytes` is usually a slice of the received payload (a [`Bytes`] view, not
/// a copy), so a decoded UDF holds one copy of what came over the wire.
#[derive(Debug, Clone)]
pub struct PickledCallable {
    bytes: Bytes,
    digest: [u8; 32],
    versions: PicklerVersions,
    content: PickleContent,
}

impl PickledCallable {
    /// Wraps pickle bytes whose digest the caller has already computed or verified.
    pub fn new(
        bytes: Bytes,
        digest: [u8; 32],
        versions: PicklerVersions,
        content: PickleContent,
    ) -> Self {
        Self {
            bytes,
            digest,
            versions,
            content,
        }
    }

    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }

    pub fn versions(&self) -> PicklerVersions {
        self.versions
    }

    pub fn content(&self) -> PickleContent {
        self.content
    }

    /// The first bytes of the digest in hex, for logs and errors.
    pub fn short_digest(&self) -> String {
        short_hex(&self.digest)
    }
}

/// The first four bytes of a digest in hex, followed by an ellipsis.
pub fn short_hex(digest: &[u8; 32]) -> String {
    format!(
        "{:02x}{:02x}{:02x}{:02x}…",
        digest[0], digest[1], digest[2], digest[3]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const V311: PicklerVersions = PicklerVersions {
        python_major: 3,
        python_minor: 11,
        cloudpickle_major: 3,
    };

    #[test]
    fn versions_must_match_on_python_minor_and_cloudpickle_major() {
        assert!(V311.check_loadable_by("f", V311).is_ok());
        let py313 = PicklerVersions {
            python_minor: 13,
            ..V311
        };
        assert!(matches!(
            V311.check_loadable_by("f", py313),
            Err(UdfPayloadError::PythonVersion {
                payload_minor: 11,
                local_minor: 13,
                ..
            })
        ));
        let cloudpickle2 = PicklerVersions {
            cloudpickle_major: 2,
            ..V311
        };
        assert!(matches!(
            V311.check_loadable_by("f", cloudpickle2),
            Err(UdfPayloadError::CloudpickleVersion {
                payload: 3,
                local: 2,
                ..
            })
        ));
    }
}
