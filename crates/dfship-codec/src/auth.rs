//! The shared cluster key that signs inline payloads (HMAC-SHA256).
//!
//! Unpickling runs arbitrary code, so a worker that holds a key refuses any
//! payload whose tag it cannot verify, before `cloudpickle.loads` is reached.
//! Verification is constant-time (`hmac`'s `verify_slice`), and so is
//! comparing two keys. The same secret also authenticates every RPC to a
//! worker (a key derived from it, see `dfship_distributed`'s `rpc_auth`).
//!
//! Hygiene: a key file is read once and may hold at most
//! [`MAX_KEY_FILE_BYTES`]; a warning names a key file that group or others
//! can read; the bytes are zeroed when the key is dropped; and
//! [`ClusterKey::take_from_env`] removes the variable from the environment,
//! so a UDF (or any child process) never sees it.

use std::fmt;
use std::path::Path;

use datafusion::error::{DataFusionError, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The environment variable [`ClusterKey::from_env`] reads by default.
pub const CLUSTER_KEY_ENV: &str = "DFSHIP_CLUSTER_KEY";

/// The shortest key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 16;

/// The largest key file accepted, in bytes.
pub const MAX_KEY_FILE_BYTES: u64 = 4096;

/// A secret shared by the coordinator and every worker.
#[derive(Clone)]
pub struct ClusterKey(zeroize::Zeroizing<Vec<u8>>);

impl PartialEq for ClusterKey {
    /// Constant-time in the contents (the length is not secret).
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        self.0.len() == other.0.len() && bool::from(self.0.as_slice().ct_eq(other.0.as_slice()))
    }
}

impl Eq for ClusterKey {}

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
        Ok(Self(zeroize::Zeroizing::new(bytes)))
    }

    /// Reads a key file; surrounding whitespace (a trailing newline) is ignored.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let unreadable = |e: std::io::Error| {
            DataFusionError::Configuration(format!(
                "cannot read the cluster key file {}: {e}; check the path and its permissions",
                path.display()
            ))
        };
        let metadata = std::fs::metadata(path).map_err(unreadable)?;
        if metadata.len() > MAX_KEY_FILE_BYTES {
            return Err(DataFusionError::Configuration(format!(
                "the cluster key file {} is {} bytes; a key file holds at most {MAX_KEY_FILE_BYTES} \
                 bytes (e.g. `head -c 32 /dev/urandom | base64 > cluster.key`); is it the right file?",
                path.display(),
                metadata.len()
            )));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = metadata.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{:o}", mode & 0o777),
                    "the cluster key file can be read by other users; restrict it with \
                     `chmod 600 {}`",
                    path.display()
                );
            }
        }
        let bytes = zeroize::Zeroizing::new(std::fs::read(path).map_err(unreadable)?);
        Self::new(bytes.trim_ascii().to_vec())
    }

    /// Reads the key from an environment variable, `None` when it is unset.
    pub fn from_env(var: &str) -> Result<Option<Self>> {
        match std::env::var_os(var) {
            None => Ok(None),
            Some(value) => Self::new(value.as_encoded_bytes().trim_ascii().to_vec()).map(Some),
        }
    }

    /// Reads the key from an environment variable and removes the variable
    /// from this process's environment, so neither UDFs nor child processes
    /// can read it. Call it early, before other threads start (changing the
    /// environment is not thread-safe) and before Python starts.
    pub fn take_from_env(var: &str) -> Result<Option<Self>> {
        let key = Self::from_env(var);
        erase_env_var(var);
        key
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

    /// The HMAC-SHA256 tag over the concatenation of `parts`.
    pub fn sign(&self, parts: &[&[u8]]) -> [u8; 32] {
        self.mac(parts).finalize().into_bytes().into()
    }

    /// Constant-time check of `tag` over the concatenation of `parts`.
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        self.mac(parts).verify_slice(tag).is_ok()
    }

    /// A key for one purpose, derived from this one (HMAC of the purpose),
    /// so each use of the shared secret has a key of its own.
    pub fn derive(&self, purpose: &[u8]) -> [u8; 32] {
        self.sign(&[purpose])
    }
}

/// Removes `var` from this process's environment after overwriting its
/// value where it lies. Removing a variable only unlinks it from `environ`:
/// the string itself stays, and for a variable the process was started
/// with it sits in the block the kernel shows as `/proc/<pid>/environ`.
/// Call it before other threads start (the environment is not thread-safe).
pub fn erase_env_var(var: &str) {
    #[cfg(target_os = "linux")]
    // SAFETY: `environ` is a null-terminated array of pointers to
    // null-terminated strings that this process owns and may write; nothing
    // else touches the environment while this runs (see above).
    unsafe {
        let mut entry = libc::environ;
        while !entry.is_null() && !(*entry).is_null() {
            let text = std::ffi::CStr::from_ptr(*entry).to_bytes();
            if text.len() > var.len() && text.starts_with(var.as_bytes()) && text[var.len()] == b'='
            {
                let value = (*entry).add(var.len() + 1);
                std::ptr::write_bytes(value, 0, text.len() - var.len() - 1);
            }
            entry = entry.add(1);
        }
    }
    if std::env::var_os(var).is_some() {
        std::env::remove_var(var);
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_are_bounded_and_keys_compare_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.key");
        std::fs::write(&big, vec![b'k'; MAX_KEY_FILE_BYTES as usize + 1]).unwrap();
        let error = ClusterKey::from_file(&big).unwrap_err().to_string();
        assert!(error.contains("holds at most"), "{error}");
        let good = dir.path().join("cluster.key");
        std::fs::write(&good, "a long enough shared secret\n").unwrap();
        let key = ClusterKey::from_file(&good).unwrap();
        assert_eq!(
            key,
            ClusterKey::new(*b"a long enough shared secret").unwrap()
        );
        assert_ne!(
            key,
            ClusterKey::new(*b"a long enough shared secreT").unwrap()
        );
        assert_ne!(
            key,
            ClusterKey::new(*b"a long enough shared secret!").unwrap()
        );
        assert!(format!("{key:?}").contains("redacted"));
    }

    #[test]
    fn taking_the_key_from_the_environment_removes_it() {
        const VAR: &str = "DFSHIP_TEST_TAKEN_KEY";
        std::env::set_var(VAR, "a key read once and then gone");
        let key = ClusterKey::take_from_env(VAR).unwrap();
        assert!(key.is_some());
        assert!(std::env::var_os(VAR).is_none());
        assert!(ClusterKey::take_from_env(VAR).unwrap().is_none());
    }

    #[test]
    fn derived_keys_differ_by_purpose() {
        let key = ClusterKey::new(vec![1u8; 32]).unwrap();
        assert_ne!(key.derive(b"a"), key.derive(b"b"));
        assert_eq!(key.derive(b"a"), key.derive(b"a"));
    }
}
