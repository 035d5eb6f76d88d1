//! The typed signature of a Python UDF, and its Arrow IPC encoding.
//!
//! Both wire formats carry the argument types as an Arrow IPC *stream* holding
//! only a schema message (one field per argument, named `arg_0`, `arg_1`, …)
//! and the return field as a one-field IPC schema stream. This keeps nested
//! types, nullability and field metadata (extension types) exact.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, FieldRef, Schema};
use arrow::ipc::writer::StreamWriter;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::Volatility;

use crate::error::UdfPayloadError;

/// Name, exact argument types, return field and volatility of a Python UDF.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UdfSignature {
    pub name: String,
    pub input_types: Vec<DataType>,
    pub return_field: FieldRef,
    pub volatility: Volatility,
    /// An aggregate's intermediate state, one field per value its
    /// accumulator's `state()` returns (`state_0`, `state_1`, …); empty for
    /// scalar and window UDFs.
    pub state_fields: Vec<FieldRef>,
}

impl UdfSignature {
    /// A signature whose return field is nullable and named after the function.
    pub fn new(
        name: impl Into<String>,
        input_types: Vec<DataType>,
        return_type: DataType,
        volatility: Volatility,
    ) -> Self {
        let name = name.into();
        let return_field = Arc::new(Field::new(name.clone(), return_type, true));
        Self {
            name,
            input_types,
            return_field,
            volatility,
            state_fields: Vec::new(),
        }
    }

    /// This signature with an aggregate's state types.
    pub fn with_state_types(mut self, state_types: Vec<DataType>) -> Self {
        self.state_fields = state_types
            .into_iter()
            .enumerate()
            .map(|(i, data_type)| Arc::new(Field::new(format!("state_{i}"), data_type, true)))
            .collect();
        self
    }

    pub(crate) fn state_schema_ipc(&self) -> Result<Vec<u8>> {
        schema_to_ipc(&Schema::new(self.state_fields.clone()))
    }

    /// The state schema read from the wire (`state_schema` IPC bytes).
    pub(crate) fn with_state_schema_ipc(
        mut self,
        state_schema: &[u8],
    ) -> Result<Self, UdfPayloadError> {
        let schema = schema_from_ipc(&self.name, "state schema", state_schema)?;
        if schema.fields().is_empty() {
            return Err(UdfPayloadError::Malformed {
                name: self.name.clone(),
                detail: "an aggregate's state schema must hold at least one field".to_string(),
            });
        }
        self.state_fields = schema.fields().iter().cloned().collect();
        Ok(self)
    }

    /// Replaces the return field (to declare it non-nullable, or attach metadata).
    pub fn with_return_field(mut self, return_field: impl Into<FieldRef>) -> Self {
        self.return_field = return_field.into();
        self
    }

    pub(crate) fn input_schema_ipc(&self) -> Result<Vec<u8>> {
        let fields: Vec<Field> = self
            .input_types
            .iter()
            .enumerate()
            .map(|(i, data_type)| Field::new(format!("arg_{i}"), data_type.clone(), true))
            .collect();
        schema_to_ipc(&Schema::new(fields))
    }

    pub(crate) fn return_schema_ipc(&self) -> Result<Vec<u8>> {
        schema_to_ipc(&Schema::new(vec![self.return_field.as_ref().clone()]))
    }

    /// Rebuilds a signature from its wire parts, checking every one.
    pub(crate) fn from_wire(
        name: &str,
        input_schema: &[u8],
        return_schema: &[u8],
        volatility: Volatility,
    ) -> Result<Self, UdfPayloadError> {
        let inputs = schema_from_ipc(name, "argument schema", input_schema)?;
        let returns = schema_from_ipc(name, "return schema", return_schema)?;
        if returns.fields().len() != 1 {
            return Err(UdfPayloadError::Malformed {
                name: name.to_string(),
                detail: format!(
                    "the return schema must hold exactly one field, found {}",
                    returns.fields().len()
                ),
            });
        }
        Ok(Self {
            name: name.to_string(),
            input_types: inputs
                .fields()
                .iter()
                .map(|f| f.data_type().clone())
                .collect(),
            return_field: Arc::clone(&returns.fields()[0]),
            volatility,
            state_fields: Vec::new(),
        })
    }
}

fn schema_to_ipc(schema: &Schema) -> Result<Vec<u8>> {
    let mut writer = StreamWriter::try_new(Vec::new(), schema)?;
    writer.finish()?;
    writer.into_inner().map_err(DataFusionError::from)
}

fn schema_from_ipc(name: &str, what: &str, bytes: &[u8]) -> Result<Schema, UdfPayloadError> {
    // Bytes from the wire: decoded without panics and without allocating
    // what they declare before it is there (see `decode_stream`; both were
    // found by the `decode_payload` fuzz target).
    dfship_runtime::protocol::decode_stream(bytes.to_vec())
        .map(|(schema, _)| schema.as_ref().clone())
        .map_err(|detail| UdfPayloadError::Malformed {
            name: name.to_string(),
            detail: format!("the {what} is not a valid Arrow IPC schema stream ({detail})"),
        })
}

/// The one-byte volatility code of our frame.
pub(crate) fn volatility_code(volatility: Volatility) -> u8 {
    match volatility {
        Volatility::Immutable => 0,
        Volatility::Stable => 1,
        Volatility::Volatile => 2,
    }
}

pub(crate) fn volatility_from_code(name: &str, code: u8) -> Result<Volatility, UdfPayloadError> {
    match code {
        0 => Ok(Volatility::Immutable),
        1 => Ok(Volatility::Stable),
        2 => Ok(Volatility::Volatile),
        other => Err(UdfPayloadError::Malformed {
            name: name.to_string(),
            detail: format!("unknown volatility code {other} (expected 0, 1 or 2)"),
        }),
    }
}

/// datafusion-python's spelling of a volatility.
pub(crate) fn volatility_str(volatility: Volatility) -> &'static str {
    match volatility {
        Volatility::Immutable => "immutable",
        Volatility::Stable => "stable",
        Volatility::Volatile => "volatile",
    }
}

pub(crate) fn volatility_from_str(name: &str, text: &str) -> Result<Volatility, UdfPayloadError> {
    match text.to_ascii_lowercase().as_str() {
        "immutable" => Ok(Volatility::Immutable),
        "stable" => Ok(Volatility::Stable),
        "volatile" => Ok(Volatility::Volatile),
        other => Err(UdfPayloadError::Malformed {
            name: name.to_string(),
            detail: format!(
                "unknown volatility '{other}' (expected immutable, stable or volatile)"
            ),
        }),
    }
}
