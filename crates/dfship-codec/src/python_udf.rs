//! [`PythonScalarUdf`]: a DataFusion scalar UDF backed by a Python callable.
//!
//! The calling convention is datafusion-python's `udf()`: the callable
//! receives one `pyarrow.Array` per argument (scalar arguments expanded to the
//! batch length) and returns one `pyarrow.Array` of the declared type and the
//! batch length. Arrays cross the boundary zero-copy through the Arrow C Data
//! Interface. The GIL is held only around the conversion and the call.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
};
use pyo3::prelude::*;

use bytes::Bytes;

use crate::cache::CallableCache;
use crate::callable::PythonCallable;
use crate::execution::{self, TaskOptions};
use crate::pickled::PickledCallable;
use crate::result_check::checked_result;
use crate::signature::UdfSignature;
use crate::store::PayloadStore;
use crate::wire::WireFormat;

/// A scalar UDF whose body is a Python callable; it travels inline.
///
/// ```no_run
/// use arrow::datatypes::DataType;
/// use datafusion::logical_expr::Volatility;
/// use dfship_codec::{PythonScalarUdf, UdfSignature};
/// use pyo3::prelude::*;
///
/// dfship_codec::ensure_python().unwrap();
/// let udf = Python::attach(|py| {
///     let func = py.eval(c"lambda a: __import__('pyarrow.compute').compute.add(a, 1)", None, None)?;
///     let signature = UdfSignature::new("plus_one", vec![DataType::Int64], DataType::Int64, Volatility::Immutable);
///     PyResult::Ok(PythonScalarUdf::new(signature, func))
/// }).unwrap().unwrap();
/// let ctx = datafusion::prelude::SessionContext::new();
/// ctx.register_udf(udf.into_scalar_udf());
/// ```
#[derive(Debug)]
pub struct PythonScalarUdf {
    udf_signature: UdfSignature,
    signature: Signature,
    callable: Arc<PythonCallable>,
    /// The payload this UDF was decoded from; encoding in the same format
    /// re-emits it byte for byte.
    received: Option<(WireFormat, Bytes)>,
}

impl PythonScalarUdf {
    /// A UDF calling `callable`, which must be callable.
    pub fn new(udf_signature: UdfSignature, callable: Bound<'_, PyAny>) -> Result<Self> {
        if !callable.is_callable() {
            return Err(DataFusionError::Plan(format!(
                "the Python UDF '{}' must be given a callable, got an object of type {}",
                udf_signature.name,
                callable
                    .get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            )));
        }
        Ok(Self::with_callable(
            udf_signature,
            PythonCallable::from_live(callable),
            None,
        ))
    }

    pub(crate) fn from_pickle(
        udf_signature: UdfSignature,
        pickled: PickledCallable,
        cache: Arc<CallableCache>,
        received: (WireFormat, Bytes),
    ) -> Self {
        Self::with_callable(
            udf_signature,
            PythonCallable::from_pickle(pickled, cache),
            Some(received),
        )
    }

    pub(crate) fn from_reference(
        udf_signature: UdfSignature,
        digest: [u8; 32],
        store: Arc<PayloadStore>,
        cache: Arc<CallableCache>,
        received: (WireFormat, Bytes),
    ) -> Self {
        Self::with_callable(
            udf_signature,
            PythonCallable::from_reference(digest, store, cache),
            Some(received),
        )
    }

    pub(crate) fn from_unpickled(
        udf_signature: UdfSignature,
        callable: Bound<'_, PyAny>,
        received: (WireFormat, Bytes),
    ) -> Self {
        Self::with_callable(
            udf_signature,
            PythonCallable::from_live(callable),
            Some(received),
        )
    }

    fn with_callable(
        udf_signature: UdfSignature,
        callable: PythonCallable,
        received: Option<(WireFormat, Bytes)>,
    ) -> Self {
        let signature = if udf_signature.input_types.is_empty() {
            Signature::nullary(udf_signature.volatility)
        } else {
            Signature::exact(udf_signature.input_types.clone(), udf_signature.volatility)
        };
        Self {
            udf_signature,
            signature,
            callable: Arc::new(callable),
            received,
        }
    }

    /// Wraps this UDF for registration with a `SessionContext`.
    pub fn into_scalar_udf(self) -> ScalarUDF {
        ScalarUDF::new_from_impl(self)
    }

    /// Name, argument types, return field and volatility.
    pub fn udf_signature(&self) -> &UdfSignature {
        &self.udf_signature
    }

    /// The SHA-256 of the pickled callable, once it has been pickled.
    pub fn digest(&self) -> Option<[u8; 32]> {
        self.callable.digest().copied()
    }

    pub(crate) fn callable(&self) -> &PythonCallable {
        &self.callable
    }

    pub(crate) fn received(&self, format: WireFormat) -> Option<&Bytes> {
        self.received
            .as_ref()
            .filter(|(received_format, _)| *received_format == format)
            .map(|(_, bytes)| bytes)
    }

    fn name_str(&self) -> &str {
        &self.udf_signature.name
    }
}

impl PartialEq for PythonScalarUdf {
    fn eq(&self, other: &Self) -> bool {
        self.udf_signature == other.udf_signature && self.callable.same_as(&other.callable)
    }
}

impl Eq for PythonScalarUdf {}

impl Hash for PythonScalarUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.udf_signature.hash(state);
    }
}

impl ScalarUDFImpl for PythonScalarUdf {
    fn name(&self) -> &str {
        self.name_str()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(self.udf_signature.return_field.data_type().clone())
    }

    fn return_field_from_args(&self, _args: ReturnFieldArgs) -> Result<FieldRef> {
        let declared = &self.udf_signature.return_field;
        Ok(Arc::new(
            Field::new(
                self.name_str(),
                declared.data_type().clone(),
                declared.is_nullable(),
            )
            .with_metadata(declared.metadata().clone()),
        ))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let number_rows = args.number_rows;
        let arrays = args
            .args
            .iter()
            .map(|arg| arg.to_array(number_rows))
            .collect::<Result<Vec<_>>>()?;
        let task = args
            .config_options
            .extensions
            .get::<TaskOptions>()
            .map(|options| options.task_id.as_str())
            .filter(|id| !id.is_empty());
        let data = execution::evaluate(
            self.name_str(),
            self.udf_signature.return_field.data_type(),
            &self.callable,
            &arrays,
            number_rows,
            task,
        )?;
        let array = checked_result(&self.udf_signature, data, number_rows)?;
        Ok(ColumnarValue::Array(array))
    }
}
