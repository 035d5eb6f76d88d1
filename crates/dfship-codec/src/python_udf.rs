//! [`PythonScalarUdf`]: a DataFusion scalar UDF backed by a Python callable.
//!
//! The calling convention is datafusion-python's `udf()`: the callable
//! receives one `pyarrow.Array` per argument (scalar arguments expanded to the
//! batch length, each with its field, so extension types arrive as such) and
//! returns one `pyarrow.Array` of the declared type and the batch length.
//!
//! The callable may also be a class whose instances are callable: each
//! runner that serves the UDF makes one instance, on its first call, and
//! reuses it (load a model once per process). It may be `async`
//! (an `async def` function, or `async def __call__`): its calls then run
//! concurrently on the runner's event loop, up to `max_in_flight` per runner.
//! See [`crate::CallOptions`] for batch size and concurrency.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::error::Result;
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
};
use pyo3::prelude::*;

use crate::execution::{self, TaskOptions};
use crate::function::{python_function_type, PythonFunction};
use crate::signature::UdfSignature;
use crate::wire::FunctionKind;

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
    function: Arc<PythonFunction>,
    signature: Signature,
}

impl PythonScalarUdf {
    pub fn new(udf_signature: UdfSignature, callable: Bound<'_, PyAny>) -> Result<Self> {
        PythonFunction::live(FunctionKind::Scalar, udf_signature, callable).map(Self::from_function)
    }

    pub(crate) fn from_function(function: PythonFunction) -> Self {
        let signature = engine_signature(&function.signature);
        Self {
            function: Arc::new(function),
            signature,
        }
    }

    pub fn into_scalar_udf(self) -> ScalarUDF {
        ScalarUDF::new_from_impl(self)
    }

    fn name_str(&self) -> &str {
        &self.function.signature.name
    }
}

/// DataFusion's signature for a Python UDF: exactly the declared input types.
pub(crate) fn engine_signature(udf_signature: &UdfSignature) -> Signature {
    if udf_signature.input_types.is_empty() {
        Signature::nullary(udf_signature.volatility)
    } else {
        Signature::exact(udf_signature.input_types.clone(), udf_signature.volatility)
    }
}

python_function_type!(PythonScalarUdf);

impl ScalarUDFImpl for PythonScalarUdf {
    fn name(&self) -> &str {
        self.name_str()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(self.function.signature.return_field.data_type().clone())
    }

    fn return_field_from_args(&self, _args: ReturnFieldArgs) -> Result<FieldRef> {
        let declared = &self.function.signature.return_field;
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
        let array =
            execution::call_scalar(&self.function, &arrays, &args.arg_fields, number_rows, task)?;
        Ok(ColumnarValue::Array(array))
    }
}
