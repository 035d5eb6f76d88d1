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

use std::sync::Arc;

use bytes::Bytes;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::ScalarUDF;
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};

use crate::error::UdfPayloadError;
use crate::options::CodecOptions;
use crate::payload;
use crate::python_udf::PythonScalarUdf;
use crate::wire::{family_of, Family, WireFormat};

/// Ships Python scalar UDFs inline and leaves every other UDF to travel by name.
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
}

impl PythonUdfCodec {
    pub fn new(options: CodecOptions) -> Self {
        Self { options }
    }

    pub fn options(&self) -> &CodecOptions {
        &self.options
    }

    /// The inline payload for `udf`, or `None` when it travels by name.
    pub fn encode_udf(&self, udf: &ScalarUDF) -> Result<Option<Bytes>> {
        let Some(python_udf) = udf.inner().downcast_ref::<PythonScalarUdf>() else {
            return Ok(None);
        };
        let format = self.options.write_format();
        let payload = match python_udf.received(format) {
            Some(received) => received.clone(),
            None => Bytes::from(match format {
                WireFormat::Inline => payload::inline::encode(python_udf, &self.options)?,
                WireFormat::DataFusionPython => payload::dfpy::encode(python_udf, &self.options)?,
            }),
        };
        self.check_size(udf.name(), payload.len())?;
        Ok(Some(payload))
    }

    /// Rebuilds the Python UDF `name` from its inline payload.
    pub fn decode_udf(&self, name: &str, payload: &[u8]) -> Result<Arc<ScalarUDF>> {
        self.check_size(name, payload.len())?;
        let family = family_of(payload);
        match family {
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
            Family::Inline | Family::DataFusionPython if self.options.strict() => {
                return Err(UdfPayloadError::Strict {
                    name: name.to_string(),
                }
                .into())
            }
            Family::Inline | Family::DataFusionPython => {}
        }
        // The one copy of the payload a decoded UDF keeps; the pickle is a view into it.
        let payload = Bytes::copy_from_slice(payload);
        let udf = match family {
            Family::Inline => payload::inline::decode(name, payload, &self.options)?,
            _ if self.options.cluster_key().is_some() => {
                // DFPYUDF has no tag: with a key, it can never be trusted.
                return Err(UdfPayloadError::Unsigned {
                    name: name.to_string(),
                }
                .into());
            }
            _ => payload::dfpy::decode(name, payload, &self.options)?,
        };
        Ok(Arc::new(udf.into_scalar_udf()))
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
        _buf: &[u8],
        _inputs: &[Arc<dyn ExecutionPlan>],
        _ctx: &TaskContext,
        _proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Err(DataFusionError::NotImplemented(
            "PythonUdfCodec decodes only Python scalar UDFs, not execution plan nodes; compose \
             it with the codec that wrote this node"
                .to_string(),
        ))
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        _buf: &mut Vec<u8>,
        _proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        Err(DataFusionError::NotImplemented(format!(
            "PythonUdfCodec encodes only Python scalar UDFs, not execution plan nodes such as {}; \
             compose it with a codec for that node",
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
}
