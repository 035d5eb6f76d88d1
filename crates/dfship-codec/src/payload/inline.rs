//! `DFSHIPU`, our own format: the signature travels outside the pickle, so
//! decoding needs no interpreter and the callable is unpickled on first call.

use bytes::Bytes;
use datafusion::error::Result;

use crate::options::CodecOptions;
use crate::python_udf::PythonScalarUdf;
use crate::wire::{self, WireFormat};

/// Pickles the callable (once per UDF) and frames it, signed when the options carry a key.
pub(crate) fn encode(udf: &PythonScalarUdf, options: &CodecOptions) -> Result<Vec<u8>> {
    let pickled = udf.callable().pickled(&udf.udf_signature().name)?;
    wire::inline::write_frame(udf.udf_signature(), pickled, options.cluster_key())
}

/// Checks the frame (tag first, then integrity and signature) without
/// touching the pickle; the UDF unpickles it on first call.
pub(crate) fn decode(
    name: &str,
    payload: Bytes,
    options: &CodecOptions,
) -> Result<PythonScalarUdf> {
    let frame = wire::inline::read_frame(name, &payload, options.cluster_key())?;
    Ok(PythonScalarUdf::from_pickle(
        frame.signature,
        frame.pickled,
        options.cache().clone(),
        (WireFormat::Inline, payload),
    ))
}
