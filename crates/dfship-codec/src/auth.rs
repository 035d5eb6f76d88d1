//! The shared cluster key that signs inline payloads (HMAC-SHA256).
//!
//! Unpickling runs arbitrary code, so a worker that holds a key refuses any
//! payload whose tag it cannot verify, before `cloudpickle.loads` is reached.
//! Verification is constant-time (`hmac`'s `verify_slice`).

use std::fmt;
use std::path::Path;

use datafusion::error::{DataFusionError, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The environment variable [`ClusterKey::from_env`] reads by default.
pub const CLUSTER_KEY_ENV: &str = "DFSHIP_CLUSTER_KEY";

/// The shortest key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 16;

/// A secret shared by the coordinator and every worker.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey(Vec<u8>);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey(<{} bytes redacted>)", self.0.len())
    }
}

impl ClusterKey {
    /// A key from raw bytes; at least [`MIN_KEY_BYTES`] long.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self> {
        let bytes = bytes.into();
        if bytes.len() < MIN_KEY_BYTES {
            return Err(DataFusionError::Configuration(format!(
                "the cluster key is {} bytes long but must be at least {MIN_KEY_BYTES}; generate \
                 one with e.g. `head -c 32 /dev/urandom | base64 > cluster.key`",
                bytes.len()
            )));
        }
        Ok(Self(bytes))
    }

    /// Reads a key file; surrounding whitespace (a trailing newline) is ignored.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| {
            DataFusionError::Configuration(format!(
                "cannot read the cluster key file {}: {e}; check the path and its permissions",
                path.display()
            ))
        })?;
        Self::new(bytes.trim_ascii().to_vec())
    }

    /// Reads the key from an environment variable, `None` when it is unset.
    pub fn from_env(var: &str) -> Result<Option<Self>> {
        match std::env::var_os(var) {
            None => Ok(None),
            Some(value) => Self::new(value.as_encoded_bytes().trim_ascii().to_vec()).map(Some),
        }
    }

    /// The key a process is configured with: the file when one is given,
    /// else the [`CLUSTER_KEY_ENV`] environment variable, else none. Every
    /// entry point (worker, CLI, Python package) looks the key up this way.
    pub fn from_file_or_env(file: Option<&Path>) -> Result<Option<Self>> {
        match file {
            Some(path) => Self::from_file(path).map(Some),
            None => Self::from_env(CLUSTER_KEY_ENV),
        }
    }

    fn mac(&self, parts: &[&[u8]]) -> Hmac<Sha256> {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        for part in parts {
            mac.update(part);
        }
        mac
    }

    /// The tag over the concatenation of `parts`.
    pub(crate) fn sign(&self, parts: &[&[u8]]) -> [u8; 32] {
        self.mac(parts).finalize().into_bytes().into()
    }

    /// Constant-time check of `tag` over the concatenation of `parts`.
    pub(crate) fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        self.mac(parts).verify_slice(tag).is_ok()
    }
}
