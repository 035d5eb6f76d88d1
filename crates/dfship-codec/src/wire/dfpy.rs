//! datafusion-python 55's `DFPYUDF` v1 scalar UDF payload (and `DFPYUDA`/`DFPYUDW`, the same layout for aggregates and windows).
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 7 | magic `DFPYUDF` |
//! | 7 | 1 | version, `1` |
//! | 8 | 1 | Python major version of the pickler |
//! | 9 | 1 | Python minor version of the pickler |
//! | 10 | … | `cloudpickle.dumps((name, func, input_schema, return_schema, volatility))` |
//!
//! `input_schema` and `return_schema` are Arrow IPC schema streams as in our
//! own frame; `volatility` is `"immutable" | "stable" | "volatile"`.
//! datafusion-python writes these bytes straight into `fun_definition`, with
//! no envelope. The signature lives inside the pickle, so reading this format
//! always needs a Python interpreter, and there is neither a digest nor a tag:
//! a process configured with a cluster key refuses it.

use crate::error::UdfPayloadError;
use crate::wire::reader::FrameReader;
use crate::wire::FunctionKind;

/// The first seven bytes of a datafusion-python scalar UDF payload.
pub const DFPY_MAGIC: &[u8; 7] = b"DFPYUDF";
/// datafusion-python's aggregate UDF payload: the tuple is
/// `(name, accumulator_factory, input_schema, return_schema, state_schema, volatility)`.
pub const DFPY_AGGREGATE_MAGIC: &[u8; 7] = b"DFPYUDA";
/// datafusion-python's window UDF payload: the tuple is
/// `(name, evaluator_factory, input_schema, return_schema, volatility)`.
pub const DFPY_WINDOW_MAGIC: &[u8; 7] = b"DFPYUDW";

/// datafusion-python's magic for functions of `kind`.
pub fn magic(kind: FunctionKind) -> &'static [u8; 7] {
    match kind {
        FunctionKind::Scalar => DFPY_MAGIC,
        FunctionKind::Aggregate => DFPY_AGGREGATE_MAGIC,
        FunctionKind::Window => DFPY_WINDOW_MAGIC,
    }
}

/// "DFPYUDF", "DFPYUDA", "DFPYUDW".
pub fn family_name(kind: FunctionKind) -> &'static str {
    match kind {
        FunctionKind::Scalar => "DFPYUDF",
        FunctionKind::Aggregate => "DFPYUDA",
        FunctionKind::Window => "DFPYUDW",
    }
}
/// The only version datafusion-python 55 writes.
pub const DFPY_VERSION: u8 = 1;

/// The header of a `DFPYUDF` payload; the pickle follows it.
#[derive(Debug)]
pub struct DfpyFrame<'a> {
    pub kind: FunctionKind,
    pub python_major: u8,
    pub python_minor: u8,
    pub pickle: &'a [u8],
}

/// Splits a `DFPYUDF` payload into its header fields and the pickle, without
/// touching the pickle.
pub fn read_header<'a>(
    expected_name: &str,
    bytes: &'a [u8],
) -> Result<DfpyFrame<'a>, UdfPayloadError> {
    let mut reader = FrameReader::new(expected_name, bytes);
    reader.take("the magic", DFPY_MAGIC.len())?;
    let super::Family::DataFusionPython(kind) = super::family_of(bytes) else {
        return Err(UdfPayloadError::UnknownFamily {
            name: expected_name.to_string(),
            prefix: super::describe_prefix(bytes),
        });
    };
    let version = reader.u8("the DFPYUDF version")?;
    if version != DFPY_VERSION {
        return Err(UdfPayloadError::UnsupportedVersion {
            name: expected_name.to_string(),
            family: family_name(kind),
            found: version,
            supported: DFPY_VERSION,
        });
    }
    let python_major = reader.u8("the Python major version")?;
    let python_minor = reader.u8("the Python minor version")?;
    let pickle = reader.rest();
    if pickle.is_empty() {
        return Err(UdfPayloadError::Truncated {
            name: expected_name.to_string(),
            what: "the pickled tuple",
            offset: reader.offset(),
            needed: 1,
            available: 0,
        });
    }
    Ok(DfpyFrame {
        kind,
        python_major,
        python_minor,
        pickle,
    })
}

/// Prefixes a pickled `(name, func, input_schema, return_schema, volatility)`
/// tuple with the `DFPYUDF` header.
pub fn write_frame(
    kind: FunctionKind,
    python_major: u8,
    python_minor: u8,
    pickle: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + pickle.len());
    out.extend_from_slice(magic(kind));
    out.push(DFPY_VERSION);
    out.push(python_major);
    out.push(python_minor);
    out.extend_from_slice(pickle);
    out
}
