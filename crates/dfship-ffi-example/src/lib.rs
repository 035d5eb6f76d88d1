//! `fnv1a_hash(utf8) -> int64`: a native scalar UDF exported through
//! datafusion-ffi from a shared library.
//!
//! Workers and coordinators load it with `--ffi-udf
//! /path/to/libdfship_ffi_example.so:dfship_ffi_scalar_udf`; plans then carry
//! only its name. The symbol returns an `FFI_ScalarUDF` by value; the loader
//! owns it from then on.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, Int64Array, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion_ffi::udf::FFI_ScalarUDF;

/// 64-bit FNV-1a of each string, as a signed integer; NULL stays NULL.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Fnv1aHash {
    signature: Signature,
}

impl Default for Fnv1aHash {
    fn default() -> Self {
        Self {
            signature: Signature::exact(vec![DataType::Utf8], Volatility::Immutable),
        }
    }
}

/// The hash itself, for tests that check results.
pub fn fnv1a(bytes: &[u8]) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash as i64
}

impl ScalarUDFImpl for Fnv1aHash {
    fn name(&self) -> &str {
        "fnv1a_hash"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [input] = args.args.as_slice() else {
            return Err(DataFusionError::Execution(
                "fnv1a_hash takes one argument".to_string(),
            ));
        };
        let array = cast(&input.to_array(args.number_rows)?, &DataType::Utf8)?;
        let strings = array
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| DataFusionError::Execution("fnv1a_hash expects strings".to_string()))?;
        let hashes: Int64Array = strings
            .iter()
            .map(|s| s.map(|s| fnv1a(s.as_bytes())))
            .collect();
        Ok(ColumnarValue::Array(Arc::new(hashes) as ArrayRef))
    }
}

/// The exported symbol: a fresh `FFI_ScalarUDF` owned by the caller.
#[no_mangle]
pub extern "C" fn dfship_ffi_scalar_udf() -> FFI_ScalarUDF {
    FFI_ScalarUDF::from(Arc::new(ScalarUDF::from(Fnv1aHash::default())))
}
