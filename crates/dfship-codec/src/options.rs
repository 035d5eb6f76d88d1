//! What a [`PythonUdfCodec`](crate::PythonUdfCodec) writes, accepts and refuses.

use std::sync::Arc;

use crate::auth::ClusterKey;
use crate::cache::CallableCache;
use crate::store::PayloadStore;
use crate::wire::WireFormat;

/// Payloads above this many bytes are refused by default (Ray's hard limit).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 100 * 1024 * 1024;
/// Payloads above this many bytes are logged as a warning by default.
pub const DEFAULT_WARN_PAYLOAD_BYTES: usize = 10 * 1024 * 1024;

/// Options of a [`PythonUdfCodec`](crate::PythonUdfCodec).
///
/// ```
/// use dfship_codec::{ClusterKey, CodecOptions, WireFormat};
///
/// let options = CodecOptions::default()
///     .with_cluster_key(ClusterKey::new(*b"0123456789abcdef0123456789abcdef").unwrap())
///     .with_max_payload_bytes(16 << 20)
///     .with_write_format(WireFormat::Inline);
/// assert!(!options.strict());
/// ```
#[derive(Debug, Clone)]
pub struct CodecOptions {
    write_format: WireFormat,
    strict: bool,
    cluster_key: Option<ClusterKey>,
    max_payload_bytes: usize,
    warn_payload_bytes: usize,
    cache: Arc<CallableCache>,
    store: Arc<PayloadStore>,
}

impl Default for CodecOptions {
    fn default() -> Self {
        Self {
            write_format: WireFormat::default(),
            strict: false,
            cluster_key: None,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            warn_payload_bytes: DEFAULT_WARN_PAYLOAD_BYTES,
            cache: CallableCache::global(),
            store: PayloadStore::global(),
        }
    }
}

impl CodecOptions {
    /// The format inline payloads are written in (default: [`WireFormat::Inline`]).
    pub fn with_write_format(mut self, format: WireFormat) -> Self {
        self.write_format = format;
        self
    }

    /// Strict mode refuses every inline payload without unpickling it; Python
    /// UDFs must then be registered by name on the receiver.
    pub fn with_strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// Signs written payloads and refuses received payloads not signed with this key.
    pub fn with_cluster_key(mut self, key: ClusterKey) -> Self {
        self.cluster_key = Some(key);
        self
    }

    /// Like [`Self::with_cluster_key`], leaving the options unchanged on `None`.
    pub fn with_optional_cluster_key(mut self, key: Option<ClusterKey>) -> Self {
        self.cluster_key = key.or(self.cluster_key);
        self
    }

    /// Payloads larger than this are refused, both ways.
    pub fn with_max_payload_bytes(mut self, bytes: usize) -> Self {
        self.max_payload_bytes = bytes;
        self
    }

    /// Payloads larger than this are logged as a warning.
    pub fn with_warn_payload_bytes(mut self, bytes: usize) -> Self {
        self.warn_payload_bytes = bytes;
        self
    }

    /// The cache of unpickled callables (default: the process-wide one).
    pub fn with_cache(mut self, cache: Arc<CallableCache>) -> Self {
        self.cache = cache;
        self
    }

    /// Where pickles received in full are kept for frames that name them
    /// by digest (default: the process-wide store).
    pub fn with_store(mut self, store: Arc<PayloadStore>) -> Self {
        self.store = store;
        self
    }

    pub fn store(&self) -> &Arc<PayloadStore> {
        &self.store
    }

    pub fn write_format(&self) -> WireFormat {
        self.write_format
    }

    pub fn strict(&self) -> bool {
        self.strict
    }

    pub fn cluster_key(&self) -> Option<&ClusterKey> {
        self.cluster_key.as_ref()
    }

    pub fn max_payload_bytes(&self) -> usize {
        self.max_payload_bytes
    }

    pub fn warn_payload_bytes(&self) -> usize {
        self.warn_payload_bytes
    }

    pub fn cache(&self) -> &Arc<CallableCache> {
        &self.cache
    }
}
