//! [`PythonUdfCodec`]: the `PhysicalExtensionCodec` that ships Python UDFs inline.
//!
//! - Encoding a [`PythonScalarUdf`] writes an inline payload (our `DFSHIPU`
//!   frame by default, or datafusion-python's `DFPYUDF` on request). Every
//!   other UDF, FFI UDFs included, writes nothing and so travels by name, to
//!   be resolved from the receiver's function registry.
//! - Decoding rebuilds a Python UDF from either format and refuses anything
//!   else with a "not ours" error.
//! - Plan nodes are declined, so the codec composes with others (e.g. in a
//!   `ComposedPhysicalExtensionCodec` after datafusion-distributed's own).

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{AggregateUDF, ScalarUDF, WindowUDF};
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};

use crate::error::UdfPayloadError;
use crate::function::PythonFunction;
use crate::options::CodecOptions;
use crate::payload;
use crate::python_udaf::PythonAggregateUdf;
use crate::python_udf::PythonScalarUdf;
use crate::python_udwf::PythonWindowUdf;
use crate::signature::UdfSignature;
use crate::window_node::{self, PythonWindowNode};
use crate::wire::{self, family_of, Family, FunctionKind, WireFormat};

/// Ships Python UDFs (scalar, aggregate, window) inline and leaves every other UDF to travel by name.
///
/// ```
/// use std::sync::Arc;
/// use datafusion_proto::physical_plan::PhysicalExtensionCodec;
/// use dfship_codec::{CodecOptions, PythonUdfCodec};
///
/// let codec: Arc<dyn PhysicalExtensionCodec> =
///     Arc::new(PythonUdfCodec::new(CodecOptions::default().with_strict(false)));
/// ```
#[derive(Debug, Clone, Default)]
pub struct PythonUdfCodec {
    options: CodecOptions,
    frames: Arc<Mutex<FrameCache>>,
    /// Load unsigned `DFPYUDF` payloads even when a cluster key is set; see
    /// [`PythonUdfCodec::trusting_datafusion_python`].
    trusts_datafusion_python: bool,
}

/// Pickles at least this large may travel by digest to destinations that keep them.
pub const BY_DIGEST_MIN_BYTES: usize = 64 * 1024;

/// Told `(name, digest, full frame)` of a large pickle, says whether the
/// destination holds it (or will be handed the frame before the plan).
pub type KeptPayloads<'a> = dyn FnMut(&str, &[u8; 32], &Bytes) -> bool + 'a;

/// How many frames a codec keeps built.
const FRAMES_KEPT: usize = 32;

type FrameKey = (FunctionKind, UdfSignature, [u8; 32], bool);

/// Frames already built, by signature, digest and kind.
#[derive(Debug)]
struct FrameCache(lru::LruCache<FrameKey, Bytes>);

impl Default for FrameCache {
    fn default() -> Self {
        Self(lru::LruCache::new(
            std::num::NonZeroUsize::new(FRAMES_KEPT).unwrap_or(std::num::NonZeroUsize::MIN),
        ))
    }
}

impl std::ops::Deref for FrameCache {
    type Target = lru::LruCache<FrameKey, Bytes>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for FrameCache {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl PythonUdfCodec {
    pub fn new(options: CodecOptions) -> Self {
        Self {
            options,
            frames: Arc::default(),
            trusts_datafusion_python: false,
        }
    }

    /// This codec, for plans the caller's own process made with
    /// datafusion-python: their `DFPYUDF` payloads are loaded even when a
    /// cluster key is set, as datafusion-python itself would load them.
    /// `DFPYUDF` has no tag, so a keyed codec otherwise refuses it; the UDFs
    /// read this way leave this process as frames signed with the key, and
    /// workers still refuse unsigned payloads. `DFSHIPU` frames are still
    /// verified. Never use it for bytes that came over the network.
    ///
    /// ```
    /// use dfship_codec::{ClusterKey, CodecOptions, PythonUdfCodec};
    ///
    /// let key = ClusterKey::new(b"a shared secret of enough length".to_vec()).unwrap();
    /// let keyed = PythonUdfCodec::new(CodecOptions::default().with_cluster_key(key));
    /// let for_local_plans = keyed.trusting_datafusion_python();
    /// ```
    pub fn trusting_datafusion_python(&self) -> Self {
        Self {
            trusts_datafusion_python: true,
            ..self.clone()
        }
    }

    pub fn options(&self) -> &CodecOptions {
        &self.options
    }

    /// The inline payload for `udf`, or `None` when it travels by name.
    pub fn encode_udf(&self, udf: &ScalarUDF) -> Result<Option<Bytes>> {
        self.encode_udf_to(udf, &mut |_, _, _| false)
    }

    /// The inline payload for `udf` for a destination that keeps pickles (a
    /// worker, across queries): for a pickle of at least
    /// [`BY_DIGEST_MIN_BYTES`], `kept(name, digest, full_frame)` says whether
    /// the destination holds it, or will be handed `full_frame` before the
    /// plan arrives; the plan then names it by digest (see
    /// [`crate::wire::inline`] and [`Self::keep_payload`]).
    pub fn encode_udf_to(
        &self,
        udf: &ScalarUDF,
        kept: &mut KeptPayloads<'_>,
    ) -> Result<Option<Bytes>> {
        match udf.inner().downcast_ref::<PythonScalarUdf>() {
            Some(python) => self.encode_function_to(python.function(), kept).map(Some),
            None => Ok(None),
        }
    }

    /// The inline payload for the aggregate `udaf`, or `None` when it travels by name.
    pub fn encode_udaf(&self, udaf: &AggregateUDF) -> Result<Option<Bytes>> {
        self.encode_udaf_to(udaf, &mut |_, _, _| false)
    }

    /// [`Self::encode_udf_to`] for an aggregate UDF.
    pub fn encode_udaf_to(
        &self,
        udaf: &AggregateUDF,
        kept: &mut KeptPayloads<'_>,
    ) -> Result<Option<Bytes>> {
        match udaf.inner().downcast_ref::<PythonAggregateUdf>() {
            Some(python) => self.encode_function_to(python.function(), kept).map(Some),
            None => Ok(None),
        }
    }

    /// The inline payload for the window UDF `udwf`, or `None` when it travels by name.
    pub fn encode_udwf(&self, udwf: &WindowUDF) -> Result<Option<Bytes>> {
        match udwf.inner().downcast_ref::<PythonWindowUdf>() {
            Some(python) => self
                .encode_function_to(python.function(), &mut |_, _, _| false)
                .map(Some),
            None => Ok(None),
        }
    }

    fn encode_function_to(
        &self,
        function: &PythonFunction,
        kept: &mut KeptPayloads<'_>,
    ) -> Result<Bytes> {
        let name = &function.signature.name;
        let format = self.options.write_format();
        let payload = match (format, function.received(format)) {
            (WireFormat::DataFusionPython, Some(received)) => received.clone(),
            (WireFormat::DataFusionPython, None) => {
                Bytes::from(payload::dfpy::encode(function, &self.options)?)
            }
            (WireFormat::Inline, received) => {
                let pickled = function.callable.pickled(name)?;
                let digest = pickled.digest();
                // Re-encoding a frame received in full emits the same bytes.
                let full = match received {
                    Some(received) if !wire::inline::is_by_digest(received) => received.clone(),
                    _ => self.frame(function, digest, false)?,
                };
                let large = pickled.bytes().len() >= BY_DIGEST_MIN_BYTES;
                if large && kept(name, digest, &full) {
                    match received {
                        Some(received) if wire::inline::is_by_digest(received) => received.clone(),
                        _ => self.frame(function, digest, true)?,
                    }
                } else {
                    full
                }
            }
        };
        self.check_size(name, payload.len())?;
        Ok(payload)
    }

    /// Our frame for `function`, built once per kind, signature, digest and
    /// kind of frame (a stage plan goes to every task: the frame is shared,
    /// not rebuilt).
    fn frame(
        &self,
        function: &PythonFunction,
        digest: &[u8; 32],
        by_digest: bool,
    ) -> Result<Bytes> {
        let key = (
            function.kind,
            function.signature.clone(),
            *digest,
            by_digest,
        );
        if let Some(frame) = self.frames().get(&key) {
            return Ok(frame.clone());
        }
        let frame = Bytes::from(payload::inline::encode(function, &self.options, by_digest)?);
        self.frames().put(key, frame.clone());
        Ok(frame)
    }

    fn frames(&self) -> std::sync::MutexGuard<'_, FrameCache> {
        self.frames.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the pickle of `frame` (one of our frames, carrying its pickle)
    /// in this process's payload store, after every check a plan's frame
    /// gets (strict mode, size, key, integrity); returns its digest. Plans
    /// may then name it by digest. Nothing is unpickled.
    pub fn keep_payload(&self, name: &str, frame: &[u8]) -> Result<[u8; 32]> {
        let kind = match family_of(frame) {
            Family::Inline(kind) if !wire::inline::is_by_digest(frame) => kind,
            _ => {
                return Err(UdfPayloadError::Malformed {
                    name: name.to_string(),
                    detail: "only a dfship frame that carries its pickle can be kept".to_string(),
                }
                .into())
            }
        };
        let function = self.decode_function(kind, name, frame)?;
        function.digest().ok_or_else(|| {
            DataFusionError::Internal(format!("the kept payload of '{name}' has no digest"))
        })
    }

    /// Whether this process's payload store holds the pickle `digest`.
    pub fn holds_payload(&self, digest: &[u8; 32]) -> bool {
        self.options.store().contains(digest)
    }

    /// Rebuilds the Python UDF `name` from its inline payload.
    pub fn decode_udf(&self, name: &str, payload: &[u8]) -> Result<Arc<ScalarUDF>> {
        let function = self.decode_function(FunctionKind::Scalar, name, payload)?;
        Ok(Arc::new(
            PythonScalarUdf::from_function(function).into_scalar_udf(),
        ))
    }

    /// Rebuilds the Python aggregate UDF `name` from its inline payload.
    pub fn decode_udaf(&self, name: &str, payload: &[u8]) -> Result<Arc<AggregateUDF>> {
        let function = self.decode_function(FunctionKind::Aggregate, name, payload)?;
        Ok(Arc::new(
            PythonAggregateUdf::from_function(function).into_aggregate_udf(),
        ))
    }

    /// Rebuilds the Python window UDF `name` from its inline payload.
    pub fn decode_udwf(&self, name: &str, payload: &[u8]) -> Result<Arc<WindowUDF>> {
        let function = self.decode_function(FunctionKind::Window, name, payload)?;
        Ok(Arc::new(
            PythonWindowUdf::from_function(function).into_window_udf(),
        ))
    }

    fn decode_function(
        &self,
        expected: FunctionKind,
        name: &str,
        payload: &[u8],
    ) -> Result<PythonFunction> {
        self.check_size(name, payload.len())?;
        let family = family_of(payload);
        let kind = match family {
            Family::Unknown if payload.is_empty() => {
                return Err(UdfPayloadError::NotInline {
                    name: name.to_string(),
                }
                .into())
            }
            Family::Unknown => {
                return Err(UdfPayloadError::UnknownFamily {
                    name: name.to_string(),
                    prefix: crate::wire::describe_prefix(payload),
                }
                .into())
            }
            Family::Inline(_) | Family::DataFusionPython(_) if self.options.strict() => {
                return Err(UdfPayloadError::Strict {
                    name: name.to_string(),
                }
                .into())
            }
            Family::Inline(kind) | Family::DataFusionPython(kind) => kind,
        };
        if kind != expected {
            return Err(UdfPayloadError::Malformed {
                name: name.to_string(),
                detail: format!(
                    "the plan calls it as {} but its payload holds {}; the plan is corrupt or \
                     was written by a different program",
                    expected.a_function(),
                    kind.a_function()
                ),
            }
            .into());
        }
        // The one copy of the payload a decoded UDF keeps; the pickle is a view into it.
        let payload = Bytes::copy_from_slice(payload);
        match family {
            Family::Inline(_) => payload::inline::decode(name, payload, &self.options),
            _ if self.options.cluster_key().is_some() && !self.trusts_datafusion_python => {
                // DFPY* has no tag: with a key, only the caller's own plans are trusted.
                Err(UdfPayloadError::UnsignableDataFusionPython {
                    name: name.to_string(),
                }
                .into())
            }
            _ => payload::dfpy::decode(name, payload, &self.options),
        }
    }

    fn check_size(&self, name: &str, size: usize) -> Result<(), UdfPayloadError> {
        let limit = self.options.max_payload_bytes();
        if size > limit {
            return Err(UdfPayloadError::TooLarge {
                name: name.to_string(),
                size,
                limit,
            });
        }
        if size > self.options.warn_payload_bytes() {
            tracing::warn!(
                udf = name,
                bytes = size,
                warn_threshold = self.options.warn_payload_bytes(),
                "large inline Python UDF payload; it travels with every stage plan, consider \
                 loading large data inside the function instead of capturing it"
            );
        }
        Ok(())
    }
}

impl PhysicalExtensionCodec for PythonUdfCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        _proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if buf.starts_with(window_node::WINDOW_NODE_MAGIC) {
            return window_node::decode(buf, inputs, ctx, self);
        }
        Err(DataFusionError::NotImplemented(
            "PythonUdfCodec decodes only Python UDFs and the window nodes that call them, not \
             other execution plan nodes; compose it with the codec that wrote this node"
                .to_string(),
        ))
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        _proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        if let Some(window) = node.downcast_ref::<PythonWindowNode>() {
            buf.extend_from_slice(&window_node::encode(window, self)?);
            return Ok(());
        }
        Err(DataFusionError::NotImplemented(format!(
            "PythonUdfCodec encodes only Python UDFs and the window nodes that call them, not \
             execution plan nodes such as {}; compose it with a codec for that node",
            node.name()
        )))
    }

    fn try_decode_udf(&self, name: &str, buf: &[u8]) -> Result<Arc<ScalarUDF>> {
        self.decode_udf(name, buf)
    }

    fn try_encode_udf(&self, node: &ScalarUDF, buf: &mut Vec<u8>) -> Result<()> {
        if let Some(payload) = self.encode_udf(node)? {
            buf.extend_from_slice(&payload);
        }
        Ok(())
    }

    fn try_decode_udaf(&self, name: &str, buf: &[u8]) -> Result<Arc<AggregateUDF>> {
        self.decode_udaf(name, buf)
    }

    fn try_encode_udaf(&self, node: &AggregateUDF, buf: &mut Vec<u8>) -> Result<()> {
        if let Some(payload) = self.encode_udaf(node)? {
            buf.extend_from_slice(&payload);
        }
        Ok(())
    }

    fn try_decode_udwf(&self, name: &str, buf: &[u8]) -> Result<Arc<WindowUDF>> {
        self.decode_udwf(name, buf)
    }

    fn try_encode_udwf(&self, node: &WindowUDF, buf: &mut Vec<u8>) -> Result<()> {
        if let Some(payload) = self.encode_udwf(node)? {
            buf.extend_from_slice(&payload);
        }
        Ok(())
    }
}
