//! [`InlineUdfEncoder`]: the codec list the workers decode with, but with
//! Python UDFs asked first when encoding.
//!
//! # Why this exists (the codec-ordering trap)
//!
//! datafusion-distributed 4.0 (de)serializes plans with
//! `ComposedPhysicalExtensionCodec([DistributedCodec, user codecs…])`. When
//! encoding a `ScalarUDF`, the composed codec asks each codec in order and
//! keeps the first that returns `Ok`. `DistributedCodec` comes first and
//! inherits the default `try_encode_udf`, which returns `Ok(())` having
//! written nothing, so every UDF is recorded as "codec 0, empty blob", travels
//! by name, and a user codec's `try_encode_udf` is never called
//! (apache/datafusion#24830).
//!
//! Decoding has no such problem: a `ScalarUdf` node whose `fun_definition`
//! is set goes to `try_decode_udf` of the composed codec, which reads the
//! envelope `{encoder_position, blob}` and hands `blob` to the codec at that
//! position. So this encoder keeps the workers' positions but, for a UDF,
//! asks [`PythonUdfCodec`] first and wraps its payload with *its* position.
//! Aggregate UDFs go the same way (the composed codec forwards
//! `try_decode_udaf` too). Window UDFs cannot: the composed codec does not
//! forward `try_decode_udwf` at all, so window nodes that call a Python
//! window UDF are wrapped first (`dfship_codec::wrap_python_windows`) and
//! travel as plan nodes of our codec. Plan nodes go through the codecs in
//! the usual order, exactly as the composed codec does.
//!
//! The encoder owns all encoding the shim does — stage plans
//! ([`InlineUdfEncoder::encode_plan`]) and shuffle partitionings
//! ([`InlineUdfEncoder::encode_partitioning`]) — and counts what it wrote.
//! The transport ([`crate::InlineUdfChannelResolver`]) only calls it. Once
//! upstream asks user codecs for UDFs, the shim can go:
//! `tests/upstream_ordering.rs` fails when that happens.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{AggregateUDF, ScalarUDF, WindowUDF};
use datafusion::physical_plan::{ExecutionPlan, Partitioning};
use datafusion_distributed::DistributedCodec;
use datafusion_proto::bytes::physical_plan_to_bytes_with_proto_converter;
use datafusion_proto::physical_plan::to_proto::serialize_partitioning;
use datafusion_proto::physical_plan::{
    ComposedPhysicalExtensionCodec, DeduplicatingProtoConverter, PhysicalExtensionCodec,
    PhysicalProtoConverterExtension,
};
use dfship_codec::{wrap_python_windows, KeptPayloads, PythonUdfCodec, PythonWindowUdf};
use prost::Message;

use crate::payloads::KeptPayload;

/// The envelope `ComposedPhysicalExtensionCodec` reads: which codec of the
/// list wrote `blob`. Same field numbers and types as datafusion-proto's
/// (private) `DataEncoderTuple`.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct CodecEnvelope {
    #[prost(uint32, tag = "1")]
    pub encoder_position: u32,
    #[prost(bytes = "bytes", tag = "2")]
    pub blob: Bytes,
}

/// Encodes plans the way `[DistributedCodec, user codecs…]` decodes them,
/// with Python UDFs inline.
#[derive(Debug)]
pub struct InlineUdfEncoder {
    codecs: Vec<Arc<dyn PhysicalExtensionCodec>>,
    udf_codec: Arc<PythonUdfCodec>,
    udf_codec_position: u32,
    stats: EncoderCounters,
}

#[derive(Debug, Default)]
struct EncoderCounters {
    plans: AtomicU64,
    inline_udfs: AtomicU64,
    inline_bytes: AtomicU64,
}

/// What an [`InlineUdfEncoder`] has written so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EncoderStats {
    /// Stage plans and shuffle partitionings encoded for the transport.
    pub plans: u64,
    /// Python UDF calls written inline (a window node carrying Python window
    /// UDFs counts once).
    pub inline_udfs: u64,
    /// Bytes of inline payloads written.
    pub inline_bytes: u64,
}

impl InlineUdfEncoder {
    /// `user_codecs` must be the list every worker registers with
    /// `with_distributed_user_codec`, in the same order, and contain `udf_codec`.
    pub fn new(
        user_codecs: Vec<Arc<dyn PhysicalExtensionCodec>>,
        udf_codec: Arc<PythonUdfCodec>,
    ) -> Result<Self> {
        let mut codecs: Vec<Arc<dyn PhysicalExtensionCodec>> = vec![Arc::new(DistributedCodec)];
        codecs.extend(user_codecs);
        let position = codecs
            .iter()
            .position(|codec| {
                let codec: &dyn PhysicalExtensionCodec = codec.as_ref();
                (codec as &dyn std::any::Any)
                    .downcast_ref::<PythonUdfCodec>()
                    .is_some_and(|found| std::ptr::eq(found, udf_codec.as_ref()))
            })
            .ok_or_else(|| {
                DataFusionError::Configuration(
                    "the Python UDF codec must be one of the user codecs registered on workers"
                        .to_string(),
                )
            })?;
        Ok(Self {
            codecs,
            udf_codec,
            udf_codec_position: u32::try_from(position)
                .map_err(|_| DataFusionError::Configuration("too many user codecs".to_string()))?,
            stats: EncoderCounters::default(),
        })
    }

    pub fn stats(&self) -> EncoderStats {
        EncoderStats {
            plans: self.stats.plans.load(Ordering::Relaxed),
            inline_udfs: self.stats.inline_udfs.load(Ordering::Relaxed),
            inline_bytes: self.stats.inline_bytes.load(Ordering::Relaxed),
        }
    }

    /// A stage plan as the workers decode it, with Python UDFs inline.
    pub fn encode_plan(&self, plan: Arc<dyn ExecutionPlan>) -> Result<Vec<u8>> {
        self.stats.plans.fetch_add(1, Ordering::Relaxed);
        let plan = wrap_python_windows(plan)?;
        let converter = DeduplicatingProtoConverter::default();
        physical_plan_to_bytes_with_proto_converter(plan, self, &converter)
            .map(|bytes| bytes.to_vec())
    }

    /// A stage plan for a worker that keeps large pickles (see
    /// `crate::payloads`): each pickle of at least
    /// `dfship_codec::BY_DIGEST_MIN_BYTES` is named by its digest, and
    /// returned with its full frame, for the transport to make sure the
    /// worker holds it before the plan is sent.
    pub fn encode_plan_for_worker(
        self: &Arc<Self>,
        plan: Arc<dyn ExecutionPlan>,
    ) -> Result<(Vec<u8>, Vec<KeptPayload>)> {
        self.stats.plans.fetch_add(1, Ordering::Relaxed);
        let destination = ForDestination {
            encoder: Arc::clone(self),
            kept: Mutex::default(),
        };
        let plan = wrap_python_windows(plan)?;
        let converter = DeduplicatingProtoConverter::default();
        let bytes = physical_plan_to_bytes_with_proto_converter(plan, &destination, &converter)?;
        let kept = destination
            .kept
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        Ok((bytes.to_vec(), kept))
    }

    /// Writes `node` inline (or by digest, when `kept` says the destination
    /// will hold its pickle), wrapped for the workers' codec list.
    fn encode_udf_with(
        &self,
        node: &ScalarUDF,
        buf: &mut Vec<u8>,
        kept: &mut KeptPayloads<'_>,
    ) -> Result<()> {
        let payload = self.udf_codec.encode_udf_to(node, kept)?;
        self.write_payload(payload, buf)
    }

    /// [`Self::encode_udf_with`] for an aggregate UDF.
    fn encode_udaf_with(
        &self,
        node: &AggregateUDF,
        buf: &mut Vec<u8>,
        kept: &mut KeptPayloads<'_>,
    ) -> Result<()> {
        let payload = self.udf_codec.encode_udaf_to(node, kept)?;
        self.write_payload(payload, buf)
    }

    fn write_payload(&self, payload: Option<Bytes>, buf: &mut Vec<u8>) -> Result<()> {
        match payload {
            Some(payload) => {
                self.stats.inline_udfs.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .inline_bytes
                    .fetch_add(payload.len() as u64, Ordering::Relaxed);
                Self::envelope(self.udf_codec_position as usize, payload, buf)
            }
            // Not a Python UDF: write nothing, so it travels by name.
            None => Ok(()),
        }
    }

    /// A shuffle producer's partitioning (`ProducerHead::RepartitionExec`),
    /// encoded with the same codec list as stage plans.
    pub fn encode_partitioning(&self, partitioning: &Partitioning) -> Result<Vec<u8>> {
        self.stats.plans.fetch_add(1, Ordering::Relaxed);
        let converter = DeduplicatingProtoConverter::default();
        serialize_partitioning(partitioning, self, &converter).map(|proto| proto.encode_to_vec())
    }

    /// The codec the workers decode with, for reading what this encoder wrote.
    pub fn decoder(&self) -> ComposedPhysicalExtensionCodec {
        ComposedPhysicalExtensionCodec::new(self.codecs.clone())
    }

    fn envelope(position: usize, blob: Bytes, buf: &mut Vec<u8>) -> Result<()> {
        CodecEnvelope {
            encoder_position: position as u32,
            blob,
        }
        .encode(buf)
        .map_err(|e| DataFusionError::Internal(format!("encoding a codec envelope: {e}")))
    }
}

impl PhysicalExtensionCodec for InlineUdfEncoder {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.decoder().try_decode(buf, inputs, ctx, proto_converter)
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        // First codec that accepts the node wins, as in ComposedPhysicalExtensionCodec.
        let mut last_error = None;
        for (position, codec) in self.codecs.iter().enumerate() {
            let mut blob = Vec::new();
            match codec.try_encode(Arc::clone(&node), &mut blob, proto_converter) {
                Ok(()) => {
                    if position == self.udf_codec_position as usize {
                        // A window node carrying its Python window UDFs inline.
                        self.stats.inline_udfs.fetch_add(1, Ordering::Relaxed);
                        self.stats
                            .inline_bytes
                            .fetch_add(blob.len() as u64, Ordering::Relaxed);
                    }
                    return Self::envelope(position, blob.into(), buf);
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            DataFusionError::NotImplemented(format!("no codec encodes {}", node.name()))
        }))
    }

    fn try_decode_udf(&self, name: &str, buf: &[u8]) -> Result<Arc<ScalarUDF>> {
        self.decoder().try_decode_udf(name, buf)
    }

    fn try_encode_udf(&self, node: &ScalarUDF, buf: &mut Vec<u8>) -> Result<()> {
        self.encode_udf_with(node, buf, &mut |_, _, _| false)
    }

    fn try_decode_udaf(&self, name: &str, buf: &[u8]) -> Result<Arc<AggregateUDF>> {
        self.decoder().try_decode_udaf(name, buf)
    }

    fn try_encode_udaf(&self, node: &AggregateUDF, buf: &mut Vec<u8>) -> Result<()> {
        self.encode_udaf_with(node, buf, &mut |_, _, _| false)
    }

    /// Window UDFs travel by name here: the workers' composed codec cannot
    /// decode a window UDF payload, so Python window UDFs travel inside a
    /// `PythonWindowNode` instead (see `dfship_codec::wrap_python_windows`).
    fn try_encode_udwf(&self, node: &WindowUDF, _buf: &mut Vec<u8>) -> Result<()> {
        if node.inner().downcast_ref::<PythonWindowUdf>().is_some() {
            return Err(DataFusionError::Internal(format!(
                "Python window UDF '{}' is used outside a window node dfship knows \
                 (WindowAggExec, BoundedWindowAggExec), so it cannot reach the workers; please \
                 report the query",
                node.name()
            )));
        }
        Ok(())
    }
}

/// The encoder, for a plan to a worker that keeps pickles: names every large
/// pickle by digest and collects the frames the worker must hold.
struct ForDestination {
    encoder: Arc<InlineUdfEncoder>,
    kept: Mutex<Vec<KeptPayload>>,
}

impl std::fmt::Debug for ForDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForDestination").finish_non_exhaustive()
    }
}

impl ForDestination {
    /// Records that the worker must hold `frame`'s pickle; always true (the
    /// transport hands it over before the plan).
    fn keep(&self, name: &str, digest: &[u8; 32], frame: &Bytes) -> bool {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if !kept.iter().any(|k| &k.digest == digest) {
            kept.push(KeptPayload {
                name: name.to_string(),
                digest: *digest,
                frame: frame.clone(),
            });
        }
        true
    }
}

impl PhysicalExtensionCodec for ForDestination {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.encoder.try_decode(buf, inputs, ctx, proto_converter)
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        self.encoder.try_encode(node, buf, proto_converter)
    }

    fn try_decode_udf(&self, name: &str, buf: &[u8]) -> Result<Arc<ScalarUDF>> {
        self.encoder.try_decode_udf(name, buf)
    }

    fn try_encode_udf(&self, node: &ScalarUDF, buf: &mut Vec<u8>) -> Result<()> {
        self.encoder
            .encode_udf_with(node, buf, &mut |name, digest, frame| {
                self.keep(name, digest, frame)
            })
    }

    fn try_decode_udaf(&self, name: &str, buf: &[u8]) -> Result<Arc<AggregateUDF>> {
        self.encoder.try_decode_udaf(name, buf)
    }

    fn try_encode_udaf(&self, node: &AggregateUDF, buf: &mut Vec<u8>) -> Result<()> {
        self.encoder
            .encode_udaf_with(node, buf, &mut |name, digest, frame| {
                self.keep(name, digest, frame)
            })
    }

    fn try_encode_udwf(&self, node: &WindowUDF, buf: &mut Vec<u8>) -> Result<()> {
        self.encoder.try_encode_udwf(node, buf)
    }
}
