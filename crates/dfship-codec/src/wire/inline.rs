//! `DFSHIPU` v2: this project's own frame for an inline Python scalar UDF;
//! `DFSHIPA` and `DFSHIPW` are the same frame for aggregate and window UDFs.
//!
//! Everything a receiver must check comes before the pickle, so it can refuse
//! a payload (wrong key, wrong Python, corrupted bytes) without unpickling, and
//! a coordinator that only plans can rebuild the UDF without a Python
//! interpreter at all. All integers are little-endian.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 7 | magic `DFSHIPU` |
//! | 7 | 1 | frame version, `2` (version `1` frames, without call options, are read too) |
//! | 8 | 1 | Python major version of the pickler |
//! | 9 | 1 | Python minor version of the pickler |
//! | 10 | 1 | cloudpickle major version of the pickler |
//! | 11 | 1 | flags: bit 0 = an HMAC tag is present; bit 1 = the pickle is sent by digest (below); bit 2 = an environment follows the call options; other bits must be 0 |
//! | 12 | 2 | `N`, length of the name |
//! | 14 | N | UDF name, UTF-8 |
//! | +0 | 1 | volatility: 0 immutable, 1 stable, 2 volatile |
//! | +1 | 8 | call options (v2 only): `batch_size u32`, `concurrency u16`, `max_in_flight u16`, 0 = unset |
//! | +9 | 32 | the SHA-256 naming the UDF's environment (only when flag bit 2 is set; see `CallOptions::environment`) |
//! | +1 | 4 | `I`, length of the argument schema |
//! | +5 | I | Arrow IPC schema stream, fields `arg_0`…`arg_n` (exact input types) |
//! | … | 4 | `R`, length of the return schema |
//! | … | R | Arrow IPC schema stream with one field: the return field |
//! | … | 4 | `S`, length of the state schema (`DFSHIPA` only) |
//! | … | S | Arrow IPC schema stream, fields `state_0`…`state_n` (`DFSHIPA` only) |
//! | … | 32 | SHA-256 of the pickled callable (the cache key) |
//! | … | 32 | HMAC-SHA256 tag, only when flag bit 0 is set |
//! | … | 4 | `P`, length of the pickle (absent when flag bit 1 is set) |
//! | … | P | `cloudpickle.dumps(callable)` (absent when flag bit 1 is set) |
//!
//! The callable of a `DFSHIPA` frame is an accumulator factory (a class or a
//! function returning an object with `update`, `merge`, `state`, `evaluate`),
//! that of a `DFSHIPW` frame a window evaluator factory, as in datafusion-python.
//!
//! The tag is computed with the shared cluster key over every byte of the
//! frame except the 32 tag bytes themselves (so it covers the flags, the
//! signature, the digest and the pickle). A frame must end exactly after the
//! pickle (or, by digest, after the digest or tag).
//!
//! **By digest.** A coordinator sends the pickle of a large closure to each
//! worker once per query: the first of that query's stage plans for a worker
//! carries the whole frame, the others a frame with flag bit 1 set and no
//! pickle, which names the pickle by its digest. The receiver keeps pickles
//! it received in full (`crate::PayloadStore`) and looks the digest up when
//! it needs the callable. Such a frame is signed like any other, and the
//! pickle it names was checked (digest, tag) when its own frame arrived.

use bytes::Bytes;
use datafusion::error::Result;

use crate::auth::ClusterKey;
use crate::call_options::CallOptions;
use crate::error::UdfPayloadError;
use crate::pickled::{sha256, PickleContent, PickledCallable, PicklerVersions};
use crate::signature::{volatility_code, volatility_from_code, UdfSignature};
use crate::wire::reader::FrameReader;
use crate::wire::FunctionKind;

/// The first seven bytes of every scalar UDF frame of ours.
pub const INLINE_MAGIC: &[u8; 7] = b"DFSHIPU";
/// The first seven bytes of an aggregate UDF frame.
pub const AGGREGATE_MAGIC: &[u8; 7] = b"DFSHIPA";
/// The first seven bytes of a window UDF frame.
pub const WINDOW_MAGIC: &[u8; 7] = b"DFSHIPW";

/// The magic of our frame for functions of `kind`.
pub fn magic(kind: FunctionKind) -> &'static [u8; 7] {
    match kind {
        FunctionKind::Scalar => INLINE_MAGIC,
        FunctionKind::Aggregate => AGGREGATE_MAGIC,
        FunctionKind::Window => WINDOW_MAGIC,
    }
}

fn family_name(kind: FunctionKind) -> &'static str {
    match kind {
        FunctionKind::Scalar => "DFSHIPU",
        FunctionKind::Aggregate => "DFSHIPA",
        FunctionKind::Window => "DFSHIPW",
    }
}
/// The frame version this build writes (it reads this one and version 1).
pub const INLINE_VERSION: u8 = 2;

const FLAG_SIGNED: u8 = 0b0000_0001;
const FLAG_BY_DIGEST: u8 = 0b0000_0010;
const FLAG_ENVIRONMENT: u8 = 0b0000_0100;
const DIGEST_LEN: usize = 32;
const TAG_LEN: usize = 32;

/// A frame whose framing, authentication and integrity have been checked.
/// The pickle has not been touched.
#[derive(Debug)]
pub struct InlineFrame {
    pub kind: FunctionKind,
    pub signature: UdfSignature,
    pub options: CallOptions,
    pub pickle: FramePickle,
}

/// The pickle a frame carries, or the digest it names it by.
#[derive(Debug)]
pub enum FramePickle {
    /// Carried in the frame (a view into the frame's bytes, digest verified).
    Inline(PickledCallable),
    /// Sent earlier in a frame of its own; look it up by digest.
    ByDigest {
        digest: [u8; 32],
        versions: PicklerVersions,
    },
}

/// Whether `frame` (one of ours) names its pickle by digest instead of carrying it.
pub fn is_by_digest(frame: &[u8]) -> bool {
    matches!(super::family_of(frame), super::Family::Inline(_))
        && frame
            .get(11)
            .is_some_and(|flags| flags & FLAG_BY_DIGEST != 0)
}

/// Writes a frame carrying the pickle; signs it when a key is given.
pub fn write_frame(
    kind: FunctionKind,
    signature: &UdfSignature,
    options: CallOptions,
    pickled: &PickledCallable,
    key: Option<&ClusterKey>,
) -> Result<Vec<u8>> {
    write(kind, signature, options, pickled, key, false)
}

/// Writes a frame that names the pickle by its digest (see the module docs);
/// signs it when a key is given.
pub fn write_reference_frame(
    kind: FunctionKind,
    signature: &UdfSignature,
    options: CallOptions,
    pickled: &PickledCallable,
    key: Option<&ClusterKey>,
) -> Result<Vec<u8>> {
    write(kind, signature, options, pickled, key, true)
}

fn write(
    kind: FunctionKind,
    signature: &UdfSignature,
    options: CallOptions,
    pickled: &PickledCallable,
    key: Option<&ClusterKey>,
    by_digest: bool,
) -> Result<Vec<u8>> {
    let input_schema = signature.input_schema_ipc()?;
    let return_schema = signature.return_schema_ipc()?;
    let name = signature.name.as_bytes();
    let name_len = u16::try_from(name.len()).map_err(|_| {
        datafusion::error::DataFusionError::Plan(format!(
            "Python UDF name is {} bytes long; names longer than {} bytes cannot be shipped",
            name.len(),
            u16::MAX
        ))
    })?;
    let pickle = pickled.bytes();

    let mut head = Vec::with_capacity(64 + name.len() + input_schema.len() + return_schema.len());
    head.extend_from_slice(magic(kind));
    head.push(INLINE_VERSION);
    head.push(pickled.versions().python_major);
    head.push(pickled.versions().python_minor);
    head.push(pickled.versions().cloudpickle_major);
    let mut flags = if key.is_some() { FLAG_SIGNED } else { 0 };
    if by_digest {
        flags |= FLAG_BY_DIGEST;
    }
    if options.environment.is_some() {
        flags |= FLAG_ENVIRONMENT;
    }
    head.push(flags);
    head.extend_from_slice(&name_len.to_le_bytes());
    head.extend_from_slice(name);
    head.push(volatility_code(signature.volatility));
    head.extend_from_slice(&options.to_wire());
    if let Some(environment) = &options.environment {
        head.extend_from_slice(environment);
    }
    push_length_prefixed(&mut head, &input_schema)?;
    push_length_prefixed(&mut head, &return_schema)?;
    if kind == FunctionKind::Aggregate {
        push_length_prefixed(&mut head, &signature.state_schema_ipc()?)?;
    }
    head.extend_from_slice(pickled.digest());

    let mut tail = Vec::with_capacity(if by_digest { 0 } else { 4 + pickle.len() });
    if !by_digest {
        push_length_prefixed(&mut tail, pickle)?;
    }

    let mut frame = head;
    if let Some(key) = key {
        let tag = key.sign(&[&frame, &tail]);
        frame.extend_from_slice(&tag);
    }
    frame.extend_from_slice(&tail);
    Ok(frame)
}

fn push_length_prefixed(out: &mut Vec<u8>, bytes: &[u8]) -> Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| {
        datafusion::error::DataFusionError::Plan(format!(
            "a section of {} bytes does not fit a Python UDF frame (4 GiB at most)",
            bytes.len()
        ))
    })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

/// Reads and checks a frame. `expected_name` is the name the plan calls the
/// function by. With a key, the tag is verified before anything else is
/// interpreted; the pickle is never touched.
pub fn read_frame(
    expected_name: &str,
    frame: &Bytes,
    key: Option<&ClusterKey>,
) -> Result<InlineFrame, UdfPayloadError> {
    read_frame_with(expected_name, frame, key, &|_, _| false)
}

/// [`read_frame`], told by `verified(digest, pickle)` which pickles are
/// already known to have that digest (the same bytes arrived and were hashed
/// before), so a large pickle sent again is compared, not hashed again.
pub fn read_frame_with(
    expected_name: &str,
    frame: &Bytes,
    key: Option<&ClusterKey>,
    verified: &dyn Fn(&[u8; 32], &[u8]) -> bool,
) -> Result<InlineFrame, UdfPayloadError> {
    let bytes: &[u8] = frame;
    let mut reader = FrameReader::new(expected_name, bytes);
    reader.take("the magic", INLINE_MAGIC.len())?;
    let super::Family::Inline(kind) = super::family_of(bytes) else {
        return Err(UdfPayloadError::UnknownFamily {
            name: expected_name.to_string(),
            prefix: super::describe_prefix(bytes),
        });
    };
    let version = reader.u8("the frame version")?;
    if version != INLINE_VERSION && version != 1 {
        return Err(UdfPayloadError::UnsupportedVersion {
            name: expected_name.to_string(),
            family: family_name(kind),
            found: version,
            supported: INLINE_VERSION,
        });
    }
    let versions = PicklerVersions {
        python_major: reader.u8("the Python major version")?,
        python_minor: reader.u8("the Python minor version")?,
        cloudpickle_major: reader.u8("the cloudpickle major version")?,
    };
    let flags = reader.u8("the flags")?;
    if flags & !(FLAG_SIGNED | FLAG_BY_DIGEST | FLAG_ENVIRONMENT) != 0
        || (version < 2 && flags & FLAG_ENVIRONMENT != 0)
    {
        return Err(UdfPayloadError::Malformed {
            name: expected_name.to_string(),
            detail: format!("unknown flag bits {flags:#010b}"),
        });
    }
    let name_len = reader.u16_le("the name length")? as usize;
    let name = reader.take("the name", name_len)?;
    let volatility = reader.u8("the volatility")?;
    let mut options = if version >= 2 {
        CallOptions::from_wire(reader.array("the call options")?)
    } else {
        CallOptions::default()
    };
    if flags & FLAG_ENVIRONMENT != 0 {
        options.environment = Some(reader.array("the environment digest")?);
    }
    let input_schema = reader.length_prefixed("the argument schema")?;
    let return_schema = reader.length_prefixed("the return schema")?;
    let state_schema = match kind {
        FunctionKind::Aggregate => Some(reader.length_prefixed("the state schema")?),
        _ => None,
    };
    let digest: [u8; DIGEST_LEN] = reader.array("the SHA-256 digest")?;
    let tag_start = reader.offset();
    let tag = if flags & FLAG_SIGNED != 0 {
        Some(reader.take("the HMAC tag", TAG_LEN)?)
    } else {
        None
    };
    let tag_end = reader.offset();
    let by_digest = flags & FLAG_BY_DIGEST != 0;
    let pickle = if by_digest {
        None
    } else {
        Some(reader.length_prefixed("the pickled callable")?)
    };
    let pickle_start = reader.offset() - pickle.map_or(0, <[u8]>::len);
    reader.expect_end()?;

    if let Some(key) = key {
        let Some(tag) = tag else {
            return Err(UdfPayloadError::Unsigned {
                name: expected_name.to_string(),
            });
        };
        if !key.verify(&[&bytes[..tag_start], &bytes[tag_end..]], tag) {
            return Err(UdfPayloadError::BadTag {
                name: expected_name.to_string(),
            });
        }
    }

    let name = std::str::from_utf8(name).map_err(|_| UdfPayloadError::Malformed {
        name: expected_name.to_string(),
        detail: "the name is not valid UTF-8".to_string(),
    })?;
    if name != expected_name {
        return Err(UdfPayloadError::NameMismatch {
            expected: expected_name.to_string(),
            found: name.to_string(),
        });
    }
    if let Some(pickle) = pickle {
        if !verified(&digest, pickle) && sha256(pickle) != digest {
            return Err(UdfPayloadError::DigestMismatch {
                name: expected_name.to_string(),
            });
        }
    }
    let volatility = volatility_from_code(expected_name, volatility)?;
    let mut signature =
        UdfSignature::from_wire(expected_name, input_schema, return_schema, volatility)?;
    if let Some(state_schema) = state_schema {
        signature = signature.with_state_schema_ipc(state_schema)?;
    }
    let pickle = match pickle {
        Some(_) => FramePickle::Inline(PickledCallable::new(
            frame.slice(pickle_start..),
            digest,
            versions,
            PickleContent::Callable,
        )),
        None => FramePickle::ByDigest { digest, versions },
    };
    Ok(InlineFrame {
        kind,
        signature,
        options,
        pickle,
    })
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::datatypes::DataType;
    use datafusion::logical_expr::Volatility;

    use super::*;

    fn pickled() -> PickledCallable {
        let bytes = Bytes::from_static(b"not really a pickle");
        let versions = PicklerVersions {
            python_major: 3,
            python_minor: 11,
            cloudpickle_major: 3,
        };
        PickledCallable::new(
            bytes.clone(),
            sha256(&bytes),
            versions,
            PickleContent::Callable,
        )
    }

    #[test]
    fn an_environment_travels_signed_beside_the_call_options() {
        let key = ClusterKey::new(b"0123456789abcdef0123456789abcdef".to_vec()).unwrap();
        let signature = UdfSignature::new(
            "f",
            vec![DataType::Int64],
            DataType::Int64,
            Volatility::Immutable,
        );
        let options = CallOptions::default().with_environment(Some([7u8; 32]));
        let frame = write_frame(
            FunctionKind::Scalar,
            &signature,
            options,
            &pickled(),
            Some(&key),
        )
        .unwrap();
        let read = read_frame("f", &Bytes::from(frame.clone()), Some(&key)).unwrap();
        assert_eq!(read.options.environment, Some([7u8; 32]));
        // Without one, nothing is added and nothing is read.
        let plain = write_frame(
            FunctionKind::Scalar,
            &signature,
            CallOptions::default(),
            &pickled(),
            Some(&key),
        )
        .unwrap();
        assert_eq!(plain.len() + 32, frame.len());
        assert_eq!(
            read_frame("f", &Bytes::from(plain), Some(&key))
                .unwrap()
                .options
                .environment,
            None
        );
        // The digest is signed: a peer that swaps it is refused.
        let at = frame.windows(32).position(|w| w == [7u8; 32]).unwrap();
        let mut swapped = frame;
        swapped[at] = 8;
        assert!(matches!(
            read_frame("f", &Bytes::from(swapped), Some(&key)),
            Err(UdfPayloadError::BadTag { .. })
        ));
    }
}
