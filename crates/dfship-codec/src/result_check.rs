//! What a Python UDF returns is untrusted: it is checked against the UDF's
//! declared signature, and fully validated as Arrow data, before the engine
//! touches it.
//!
//! arrow's C Data Interface import (`from_ffi`) builds arrays without
//! validating them, so a string array whose bytes are not UTF-8 or whose
//! offsets point past its buffer would be undefined behaviour in the first
//! kernel that reads it. `ArrayData::validate_full` checks buffers, offsets,
//! UTF-8, dictionary keys and, for nested types, that children declared
//! non-nullable hold no nulls where their parent is valid.

use arrow::array::{make_array, ArrayData, ArrayRef};
use arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::error::{DataFusionError, Result};

use crate::error::ErrorKind;
use crate::signature::UdfSignature;

/// The metadata key of an Arrow extension type's name.
const EXTENSION_NAME: &str = "ARROW:extension:name";

/// The extension type a field declares, if any.
fn extension_of(field: &Field) -> Option<&str> {
    field.metadata().get(EXTENSION_NAME).map(String::as_str)
}

/// `data` (with `field`, the field it arrived with, when known) as an
/// array, once it has the batch's length, the declared type, extension type
/// and nullability, and passes full Arrow validation.
pub(crate) fn checked_result(
    signature: &UdfSignature,
    field: Option<&FieldRef>,
    data: ArrayData,
    number_rows: usize,
) -> Result<ArrayRef> {
    let bad = |detail: String| {
        DataFusionError::Execution(format!(
            "{} Python UDF '{}' {detail}",
            ErrorKind::UdfBadResult.tag(),
            signature.name
        ))
    };
    if data.len() != number_rows {
        return Err(bad(format!(
            "returned {} rows for a batch of {number_rows}; it must return exactly one value per \
             input row",
            data.len()
        )));
    }
    let expected_type = signature.return_field.data_type();
    if data.data_type() != expected_type {
        return Err(bad(format!(
            "is declared to return {expected_type} but returned {}; cast the result (e.g. \
             `result.cast(...)`) or declare the return type it produces",
            data.data_type()
        )));
    }
    if let Some(declared) = extension_of(&signature.return_field) {
        let returned = field.and_then(|f| extension_of(f));
        if field.is_some() && returned != Some(declared) {
            return Err(bad(format!(
                "is declared to return the extension type {declared} but returned {}; build the \
                 result with that type (e.g. `pa.array(values, type=pa.uuid())` or \
                 `pa.ExtensionArray.from_storage(...)`)",
                returned.map_or_else(
                    || expected_type.to_string(),
                    |name| format!("the extension type {name}")
                )
            )));
        }
    }
    data.validate_full()
        .map_err(|e| invalid_array(&signature.name, &e.to_string()))?;
    if !signature.return_field.is_nullable() && data.null_count() > 0 {
        return Err(bad(format!(
            "is declared non-nullable but returned {} nulls; declare the return field nullable \
             or return no nulls",
            data.null_count()
        )));
    }
    Ok(make_array(data))
}

/// A UDF returned an array whose buffers, offsets or values are not valid Arrow.
pub(crate) fn invalid_array(udf_name: &str, detail: &str) -> DataFusionError {
    DataFusionError::Execution(format!(
        "{} Python UDF '{udf_name}' returned an invalid Arrow array ({detail}); build the result \
         with pyarrow functions that validate their input (e.g. `pa.array(...)`), or call \
         `result.validate(full=True)` in the UDF to find the problem",
        ErrorKind::UdfBadResult.tag()
    ))
}

/// A UDF returned something that is not an Arrow array; `what` says what.
pub(crate) fn not_an_array(udf_name: &str, declared: &DataType, what: &str) -> DataFusionError {
    DataFusionError::Execution(format!(
        "{} Python UDF '{udf_name}' must return a pyarrow.Array of type {declared}, but {what}",
        ErrorKind::UdfBadResult.tag()
    ))
}
