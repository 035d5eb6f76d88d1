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

use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::ScalarUDF;
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString, PyTuple};

use crate::callable::{self, sha256, PickledCallable, PicklerVersions};
use crate::error::UdfPayloadError;
use crate::options::CodecOptions;
use crate::python;
use crate::python_udf::PythonScalarUdf;
use crate::signature::{volatility_from_str, volatility_str, UdfSignature};
use crate::wire::{dfpy, family_of, inline, Family, WireFormat};

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
    pub fn encode_udf(&self, udf: &ScalarUDF) -> Result<Option<Vec<u8>>> {
        let Some(python_udf) = udf.inner().downcast_ref::<PythonScalarUdf>() else {
            return Ok(None);
        };
        let format = self.options.write_format();
        let payload = match python_udf.received(format) {
            Some(received) => received.to_vec(),
            None => match format {
                WireFormat::Inline => {
                    let pickled = python_udf.callable().pickled(udf.name())?;
                    inline::write_frame(
                        python_udf.udf_signature(),
                        pickled,
                        self.options.cluster_key(),
                    )?
                }
                WireFormat::DataFusionPython => encode_dfpy(python_udf)?,
            },
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
        let udf = if family == Family::Inline {
            self.decode_inline(name, payload)?
        } else {
            self.decode_dfpy(name, payload)?
        };
        Ok(Arc::new(udf.into_scalar_udf()))
    }

    fn decode_inline(&self, name: &str, payload: &[u8]) -> Result<PythonScalarUdf> {
        let frame = inline::read_frame(name, payload, self.options.cluster_key())?;
        let pickled = PickledCallable::new(frame.pickle.into(), frame.digest, frame.versions);
        Ok(PythonScalarUdf::from_pickle(
            frame.signature,
            pickled,
            Arc::clone(self.options.cache()),
            (WireFormat::Inline, payload.into()),
        ))
    }

    fn decode_dfpy(&self, name: &str, payload: &[u8]) -> Result<PythonScalarUdf> {
        if self.options.cluster_key().is_some() {
            // DFPYUDF has no tag: with a key, it can never be trusted.
            return Err(UdfPayloadError::Unsigned {
                name: name.to_string(),
            }
            .into());
        }
        let frame = dfpy::read_header(name, payload)?;
        python::ensure_python()?;
        Python::attach(|py| {
            let local = python::local_versions(py).map_err(|e| UdfPayloadError::Unpickle {
                name: name.to_string(),
                detail: python::describe_exception(py, &e),
            })?;
            // DFPYUDF does not record the cloudpickle version: trust ours.
            let payload_versions = PicklerVersions {
                python_major: frame.python_major,
                python_minor: frame.python_minor,
                cloudpickle_major: local.cloudpickle_major,
            };
            callable::check_versions(name, payload_versions, local)?;
            let pickled =
                PickledCallable::new(frame.pickle.into(), sha256(frame.pickle), payload_versions);
            let tuple = callable::load_pickle(py, self.options.cache(), &pickled, name)?;
            let (signature, func) = dfpy_tuple(name, &tuple)?;
            Ok(PythonScalarUdf::from_unpickled(
                signature,
                func,
                (WireFormat::DataFusionPython, payload.into()),
            ))
        })
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

/// `(name, func, input_schema, return_schema, volatility)`, each checked.
fn dfpy_tuple<'py>(
    name: &str,
    tuple: &Bound<'py, PyAny>,
) -> Result<(UdfSignature, Bound<'py, PyAny>), UdfPayloadError> {
    let malformed = |detail: String| UdfPayloadError::Malformed {
        name: name.to_string(),
        detail,
    };
    let tuple = tuple.cast::<PyTuple>().map_err(|_| {
        malformed(format!(
            "the DFPYUDF pickle holds a {} instead of a 5-tuple",
            type_name(tuple)
        ))
    })?;
    if tuple.len() != 5 {
        return Err(malformed(format!(
            "the DFPYUDF tuple has {} elements instead of 5 (name, func, input_schema, \
             return_schema, volatility)",
            tuple.len()
        )));
    }
    let item = |index: usize| {
        tuple.get_item(index).map_err(|e| {
            malformed(format!(
                "cannot read element {index} of the DFPYUDF tuple: {e}"
            ))
        })
    };
    let wrong_type = |index: usize, expected: &str, found: &Bound<'py, PyAny>| {
        malformed(format!(
            "element {index} of the DFPYUDF tuple must be {expected}, found {}",
            type_name(found)
        ))
    };
    let found_name = item(0)?;
    let found_name = found_name
        .cast::<PyString>()
        .map_err(|_| wrong_type(0, "the name (str)", &found_name))?
        .to_string();
    if found_name != name {
        return Err(UdfPayloadError::NameMismatch {
            expected: name.to_string(),
            found: found_name,
        });
    }
    let func = item(1)?;
    if !func.is_callable() {
        return Err(wrong_type(1, "a callable", &func));
    }
    let input_schema = item(2)?;
    let input_schema = input_schema
        .cast::<PyBytes>()
        .map_err(|_| wrong_type(2, "the input schema (bytes)", &input_schema))?;
    let return_schema = item(3)?;
    let return_schema = return_schema
        .cast::<PyBytes>()
        .map_err(|_| wrong_type(3, "the return schema (bytes)", &return_schema))?;
    let volatility = item(4)?;
    let volatility = volatility
        .cast::<PyString>()
        .map_err(|_| wrong_type(4, "the volatility (str)", &volatility))?
        .to_string();
    let volatility = volatility_from_str(name, &volatility)?;
    let signature = UdfSignature::from_wire(
        name,
        input_schema.as_bytes(),
        return_schema.as_bytes(),
        volatility,
    )?;
    Ok((signature, func))
}

fn type_name(object: &Bound<'_, PyAny>) -> String {
    object
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "object".to_string())
}

fn encode_dfpy(udf: &PythonScalarUdf) -> Result<Vec<u8>> {
    let signature = udf.udf_signature();
    let input_schema = signature.input_schema_ipc()?;
    let return_schema = signature.return_schema_ipc()?;
    python::ensure_python()?;
    Python::attach(|py| {
        let func = udf.callable().get(py, &signature.name)?;
        let pickle_error = |e: PyErr| UdfPayloadError::Pickle {
            name: signature.name.clone(),
            detail: python::describe_exception(py, &e),
        };
        let tuple = PyTuple::new(
            py,
            [
                PyString::new(py, &signature.name).into_any(),
                func,
                PyBytes::new(py, &input_schema).into_any(),
                PyBytes::new(py, &return_schema).into_any(),
                PyString::new(py, volatility_str(signature.volatility)).into_any(),
            ],
        )
        .map_err(pickle_error)?;
        let pickle = python::dumps(py, tuple.as_any()).map_err(pickle_error)?;
        let local = python::local_versions(py).map_err(pickle_error)?;
        Ok(dfpy::write_frame(
            local.python_major,
            local.python_minor,
            &pickle,
        ))
    })
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
