//! Our own frames (`DFSHIPU`, `DFSHIPA`, `DFSHIPW`): the signature travels
//! outside the pickle, so decoding needs no interpreter and the callable is
//! unpickled on first call.

use std::sync::Arc;

use bytes::Bytes;
use datafusion::error::Result;

use crate::callable::PythonCallable;
use crate::function::PythonFunction;
use crate::options::CodecOptions;
use crate::wire::inline::FramePickle;
use crate::wire::{self, WireFormat};

/// Pickles the callable (once per function) and frames it, signed when the
/// options carry a key; with `by_digest`, the frame names the pickle by its
/// digest instead of carrying it.
pub(crate) fn encode(
    function: &PythonFunction,
    options: &CodecOptions,
    by_digest: bool,
) -> Result<Vec<u8>> {
    let pickled = function.callable.pickled(&function.signature.name)?;
    let write = if by_digest {
        wire::inline::write_reference_frame
    } else {
        wire::inline::write_frame
    };
    write(
        function.kind,
        &function.signature,
        function.options,
        pickled,
        options.cluster_key(),
    )
}

/// Checks the frame (tag first, then integrity and signature) without
/// touching the pickle; the function unpickles it on first call.
pub(crate) fn decode(name: &str, payload: Bytes, options: &CodecOptions) -> Result<PythonFunction> {
    let store = options.store();
    let frame =
        wire::inline::read_frame_with(name, &payload, options.cluster_key(), &|digest, pickle| {
            store.holds(digest, pickle)
        })?;
    let callable = match frame.pickle {
        FramePickle::Inline(pickled) => {
            // Kept for the query's other plans, which may name it by digest.
            options.store().insert(&pickled);
            PythonCallable::from_pickle(pickled, options.cache().clone())
        }
        FramePickle::ByDigest { digest, .. } => {
            PythonCallable::from_reference(digest, options.store().clone(), options.cache().clone())
        }
    };
    Ok(PythonFunction {
        kind: frame.kind,
        signature: frame.signature,
        callable: Arc::new(callable),
        options: frame.options,
        received: Some((WireFormat::Inline, payload)),
        spec: Default::default(),
        task: Default::default(),
        task_id: Default::default(),
    })
}
