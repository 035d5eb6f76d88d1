//! `DFSHIPU`, our own format: the signature travels outside the pickle, so
//! decoding needs no interpreter and the callable is unpickled on first call.

use bytes::Bytes;
use datafusion::error::Result;

use crate::options::CodecOptions;
use crate::python_udf::PythonScalarUdf;
use crate::wire::inline::FramePickle;
use crate::wire::{self, WireFormat};

/// Pickles the callable (once per UDF) and frames it, signed when the
/// options carry a key; with `by_digest`, the frame names the pickle by its
/// digest instead of carrying it.
pub(crate) fn encode(
    udf: &PythonScalarUdf,
    options: &CodecOptions,
    by_digest: bool,
) -> Result<Vec<u8>> {
    let pickled = udf.callable().pickled(&udf.udf_signature().name)?;
    if by_digest {
        wire::inline::write_reference_frame(udf.udf_signature(), pickled, options.cluster_key())
    } else {
        wire::inline::write_frame(udf.udf_signature(), pickled, options.cluster_key())
    }
}

/// Checks the frame (tag first, then integrity and signature) without
/// touching the pickle; the UDF unpickles it on first call.
pub(crate) fn decode(
    name: &str,
    payload: Bytes,
    options: &CodecOptions,
) -> Result<PythonScalarUdf> {
    let store = options.store();
    let frame =
        wire::inline::read_frame_with(name, &payload, options.cluster_key(), &|digest, pickle| {
            store.holds(digest, pickle)
        })?;
    let received = (WireFormat::Inline, payload);
    Ok(match frame.pickle {
        FramePickle::Inline(pickled) => {
            // Kept for the query's other plans, which may name it by digest.
            options.store().insert(&pickled);
            PythonScalarUdf::from_pickle(
                frame.signature,
                pickled,
                options.cache().clone(),
                received,
            )
        }
        FramePickle::ByDigest { digest, .. } => PythonScalarUdf::from_reference(
            frame.signature,
            digest,
            options.store().clone(),
            options.cache().clone(),
            received,
        ),
    })
}
