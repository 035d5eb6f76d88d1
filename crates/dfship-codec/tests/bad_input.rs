//! Every malformed or refused payload is an actionable error, never a panic.

mod common;

use std::sync::Arc;

use arrow::datatypes::DataType;
use common::*;
use datafusion::logical_expr::Volatility;
use datafusion_proto::physical_plan::PhysicalExtensionCodec;
use dfship_codec::{ClusterKey, CodecOptions, PythonUdfCodec, UdfPayloadError, WireFormat};
use pyo3::prelude::*;

const PA: &str = "import pyarrow as pa\nimport pyarrow.compute as pc\n";

fn key(byte: u8) -> ClusterKey {
    ClusterKey::new(vec![byte; 32]).unwrap()
}

/// The inline payload of a one-argument UDF named `name`, as `codec` writes it.
fn payload_with(codec: &PythonUdfCodec, name: &str, body: &str) -> Vec<u8> {
    let udf = python_udf(
        name,
        vec![DataType::Int64],
        DataType::Int64,
        Volatility::Immutable,
        PA,
        body,
    );
    codec
        .encode_udf(&udf)
        .unwrap()
        .expect("a Python UDF is encoded inline")
        .to_vec()
}

fn payload(name: &str) -> Vec<u8> {
    payload_with(&PythonUdfCodec::default(), name, "lambda a: pc.add(a, 1)")
}

fn decode_err(codec: &PythonUdfCodec, name: &str, bytes: &[u8]) -> UdfPayloadError {
    let error = codec
        .try_decode_udf(name, bytes)
        .expect_err("the payload is refused");
    UdfPayloadError::find(&error)
        .cloned()
        .unwrap_or_else(|| panic!("not a payload error: {error}"))
}

/// Calls the decoded UDF on [1, 2, 3], returning the error message if any.
fn call(udf: &datafusion::logical_expr::ScalarUDF) -> Result<(), String> {
    use arrow::array::Int64Array;
    use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs};
    let field = Arc::new(arrow::datatypes::Field::new("a", DataType::Int64, true));
    udf.invoke_with_args(ScalarFunctionArgs {
        args: vec![ColumnarValue::Array(Arc::new(Int64Array::from(vec![
            1, 2, 3,
        ])))],
        arg_fields: vec![field],
        number_rows: 3,
        return_field: Arc::new(arrow::datatypes::Field::new("r", DataType::Int64, true)),
        config_options: Arc::new(Default::default()),
    })
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// Rewrites the pickle section of an unsigned inline frame and fixes its digest.
fn with_pickle(frame: &[u8], pickle: &[u8]) -> Vec<u8> {
    let digest_at = frame.len() - pickle_len(frame) - 4 - 32;
    let mut out = frame[..digest_at].to_vec();
    out.extend_from_slice(&sha256(pickle));
    out.extend_from_slice(&(pickle.len() as u32).to_le_bytes());
    out.extend_from_slice(pickle);
    out
}

/// The pickle length of an unsigned frame: the last length prefix in it.
fn pickle_len(frame: &[u8]) -> usize {
    // Walk the frame: magic(7) version(1) py(2) cp(1) flags(1) name_len(2)
    // name volatility(1) call options(8)
    let name_len = u16::from_le_bytes([frame[12], frame[13]]) as usize;
    let mut at = 14 + name_len + 1 + 8;
    for _ in 0..2 {
        let len = u32::from_le_bytes(frame[at..at + 4].try_into().unwrap()) as usize;
        at += 4 + len;
    }
    at += 32;
    u32::from_le_bytes(frame[at..at + 4].try_into().unwrap()) as usize
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

fn pickle_of(setup: &str, expression: &str) -> Vec<u8> {
    let object = py_object(&format!("import cloudpickle, pickle\n{setup}"), expression);
    Python::attach(|py| object.bind(py).extract::<Vec<u8>>().unwrap())
}

#[test]
fn truncation_at_every_offset_is_an_error() {
    let codec = PythonUdfCodec::default();
    for full in [
        payload("trunc"),
        payload_with(
            &PythonUdfCodec::new(CodecOptions::default().with_cluster_key(key(1))),
            "trunc",
            "lambda a: a",
        ),
    ] {
        for cut in 0..full.len() {
            let error = decode_err(&codec, "trunc", &full[..cut]);
            match cut {
                0 => assert!(
                    matches!(error, UdfPayloadError::NotInline { .. }),
                    "{cut}: {error}"
                ),
                1..=6 => assert!(
                    matches!(error, UdfPayloadError::UnknownFamily { .. }),
                    "{cut}: {error}"
                ),
                _ => assert!(
                    matches!(error, UdfPayloadError::Truncated { .. }),
                    "{cut}: {error}"
                ),
            }
        }
        assert!(codec.try_decode_udf("trunc", &full).is_ok());
    }
    let dfpy = PythonUdfCodec::new(
        CodecOptions::default().with_write_format(WireFormat::DataFusionPython),
    );
    let full = payload_with(&dfpy, "trunc", "lambda a: a");
    for cut in 7..full.len() {
        let error = decode_err(&codec, "trunc", &full[..cut]);
        assert!(
            matches!(
                error,
                UdfPayloadError::Truncated { .. } | UdfPayloadError::Unpickle { .. }
            ),
            "{cut}: {error}"
        );
    }
}

#[test]
fn trailing_bytes_are_refused() {
    let mut bytes = payload("trailing");
    bytes.push(0);
    let error = decode_err(&PythonUdfCodec::default(), "trailing", &bytes);
    assert!(
        matches!(error, UdfPayloadError::Malformed { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("trailing"), "{error}");
}

#[test]
fn unknown_family_and_versions() {
    let codec = PythonUdfCodec::default();
    let error = decode_err(&codec, "f", b"PK\x03\x04not a payload");
    assert!(
        matches!(error, UdfPayloadError::UnknownFamily { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("DFSHIPU"), "{error}");

    let mut bytes = payload("ver");
    bytes[7] = 9;
    let error = decode_err(&codec, "ver", &bytes);
    assert_eq!(
        error,
        UdfPayloadError::UnsupportedVersion {
            name: "ver".into(),
            family: "DFSHIPU",
            found: 9,
            supported: 2
        }
    );

    let error = decode_err(&codec, "ver", b"DFPYUDF\x02\x03\x0bxxxx");
    assert!(
        matches!(
            error,
            UdfPayloadError::UnsupportedVersion {
                family: "DFPYUDF",
                found: 2,
                ..
            }
        ),
        "{error}"
    );

    let mut bytes = payload("flags");
    bytes[11] = 0x80;
    let error = decode_err(&codec, "flags", &bytes);
    assert!(
        matches!(error, UdfPayloadError::Malformed { .. }) && error.to_string().contains("flag"),
        "{error}"
    );
}

#[test]
fn bad_schema_bytes() {
    let codec = PythonUdfCodec::default();
    let bytes = payload("schema");
    // The argument schema starts after magic, header, name, volatility,
    // call options and its length.
    let schema_at = 14 + "schema".len() + 1 + 8 + 4;
    let mut corrupted = bytes.clone();
    for b in &mut corrupted[schema_at..schema_at + 16] {
        *b = 0x5a;
    }
    let error = decode_err(&codec, "schema", &corrupted);
    assert!(
        matches!(error, UdfPayloadError::Malformed { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("argument schema"), "{error}");

    let mut bad_volatility = bytes.clone();
    bad_volatility[14 + "schema".len()] = 7;
    let error = decode_err(&codec, "schema", &bad_volatility);
    assert!(error.to_string().contains("volatility code 7"), "{error}");
}

#[test]
fn name_mismatch_is_refused() {
    let error = decode_err(
        &PythonUdfCodec::default(),
        "expected_name",
        &payload("other_name"),
    );
    assert_eq!(
        error,
        UdfPayloadError::NameMismatch {
            expected: "expected_name".into(),
            found: "other_name".into()
        }
    );
}

#[test]
fn digest_mismatch() {
    let mut bytes = payload("digest");
    let last = bytes.len() - 3;
    bytes[last] ^= 0xff;
    let error = decode_err(&PythonUdfCodec::default(), "digest", &bytes);
    assert_eq!(
        error,
        UdfPayloadError::DigestMismatch {
            name: "digest".into()
        }
    );
}

#[test]
fn hmac_missing_or_wrong() {
    let signer = PythonUdfCodec::new(CodecOptions::default().with_cluster_key(key(1)));
    let verifier = PythonUdfCodec::new(CodecOptions::default().with_cluster_key(key(1)));
    let other = PythonUdfCodec::new(CodecOptions::default().with_cluster_key(key(2)));

    let signed = payload_with(&signer, "signed", "lambda a: a");
    assert!(verifier.try_decode_udf("signed", &signed).is_ok());
    assert_eq!(
        decode_err(&other, "signed", &signed),
        UdfPayloadError::BadTag {
            name: "signed".into()
        }
    );

    let unsigned = payload("signed");
    assert_eq!(
        decode_err(&verifier, "signed", &unsigned),
        UdfPayloadError::Unsigned {
            name: "signed".into()
        }
    );

    // Flipping any byte of a signed frame breaks the tag before anything else is checked.
    for at in [8, 12, 20, signed.len() / 2, signed.len() - 1] {
        let mut tampered = signed.clone();
        tampered[at] ^= 0x01;
        let error = decode_err(&verifier, "signed", &tampered);
        assert!(
            matches!(
                error,
                UdfPayloadError::BadTag { .. }
                    | UdfPayloadError::Truncated { .. }
                    | UdfPayloadError::Malformed { .. }
            ),
            "byte {at}: {error}"
        );
    }

    // DFPYUDF cannot carry a tag: refused, with what to do instead.
    let dfpy = payload_with(
        &PythonUdfCodec::new(
            CodecOptions::default().with_write_format(WireFormat::DataFusionPython),
        ),
        "signed",
        "lambda a: a",
    );
    let error = decode_err(&verifier, "signed", &dfpy);
    assert_eq!(
        error,
        UdfPayloadError::UnsignableDataFusionPython {
            name: "signed".into()
        }
    );
    assert!(
        error.to_string().contains("execute_datafusion_plan"),
        "{error}"
    );
}

/// A keyed coordinator loads the datafusion-python plans its own user hands
/// it, and what it sends on is signed; our frames are still verified.
#[test]
fn a_trusting_codec_loads_datafusion_python_payloads_and_signs_them_on() {
    let keyed = PythonUdfCodec::new(CodecOptions::default().with_cluster_key(key(1)));
    let trusting = keyed.trusting_datafusion_python();
    let dfpy = payload_with(
        &PythonUdfCodec::new(
            CodecOptions::default().with_write_format(WireFormat::DataFusionPython),
        ),
        "local",
        "lambda a: pc.add(a, 1)",
    );
    let udf = trusting
        .try_decode_udf("local", &dfpy)
        .expect("the caller's own datafusion-python payload loads");
    let mut sent = Vec::new();
    keyed.try_encode_udf(&udf, &mut sent).unwrap();
    assert!(sent.starts_with(b"DFSHIPU"), "re-encoded as our frame");
    assert!(
        keyed.try_decode_udf("local", &sent).is_ok(),
        "signed with the key: a keyed worker accepts it"
    );
    let unkeyed_frame = payload("local");
    assert_eq!(
        decode_err(&trusting, "local", &unkeyed_frame),
        UdfPayloadError::Unsigned {
            name: "local".into()
        },
        "DFSHIPU frames are still verified"
    );
}

#[test]
fn hmac_refuses_before_unpickling() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("unpickled.marker");
    let evil_pickle = pickle_of(
        &format!(
            "class Evil:\n    def __reduce__(self):\n        return (open, ({:?}, 'w'))\n",
            marker.to_str().unwrap()
        ),
        "pickle.dumps(Evil())",
    );
    let honest = payload("evil");
    let unsigned_evil = with_pickle(&honest, &evil_pickle);

    let keyed = PythonUdfCodec::new(CodecOptions::default().with_cluster_key(key(1)));
    assert_eq!(
        decode_err(&keyed, "evil", &unsigned_evil),
        UdfPayloadError::Unsigned {
            name: "evil".into()
        }
    );

    // Signed with another key: the tag check fails first.
    let foreign = payload_with(
        &PythonUdfCodec::new(CodecOptions::default().with_cluster_key(key(2))),
        "evil",
        "lambda a: a",
    );
    let mut forged = foreign.clone();
    let tail_len = pickle_len_signed(&foreign) + 4;
    forged.truncate(foreign.len() - tail_len);
    forged.extend_from_slice(&(evil_pickle.len() as u32).to_le_bytes());
    forged.extend_from_slice(&evil_pickle);
    let digest_at = forged.len() - evil_pickle.len() - 4 - 32 - 32;
    forged[digest_at..digest_at + 32].copy_from_slice(&sha256(&evil_pickle));
    assert_eq!(
        decode_err(&keyed, "evil", &forged),
        UdfPayloadError::BadTag {
            name: "evil".into()
        }
    );
    assert!(!marker.exists(), "nothing was unpickled");

    // Control: without a key the same payload decodes, and the first call unpickles it.
    let open = PythonUdfCodec::default();
    let udf = open.try_decode_udf("evil", &unsigned_evil).unwrap();
    assert!(!marker.exists(), "decoding alone does not unpickle");
    let _ = call(&udf);
    assert!(
        marker.exists(),
        "the control shows this payload really runs code when unpickled"
    );
}

fn pickle_len_signed(frame: &[u8]) -> usize {
    let name_len = u16::from_le_bytes([frame[12], frame[13]]) as usize;
    let mut at = 14 + name_len + 1 + 8;
    for _ in 0..2 {
        let len = u32::from_le_bytes(frame[at..at + 4].try_into().unwrap()) as usize;
        at += 4 + len;
    }
    at += 64;
    u32::from_le_bytes(frame[at..at + 4].try_into().unwrap()) as usize
}

#[test]
fn oversize_is_refused_both_ways() {
    let small_limit = PythonUdfCodec::new(CodecOptions::default().with_max_payload_bytes(64));
    let bytes = payload("big");
    let error = decode_err(&small_limit, "big", &bytes);
    assert_eq!(
        error,
        UdfPayloadError::TooLarge {
            name: "big".into(),
            size: bytes.len(),
            limit: 64
        }
    );
    assert!(
        error.to_string().contains("raise the payload size limit"),
        "{error}"
    );

    let udf = python_udf(
        "big",
        vec![DataType::Int64],
        DataType::Int64,
        Volatility::Immutable,
        PA,
        "lambda a: a",
    );
    let error = small_limit.encode_udf(&udf).unwrap_err();
    assert!(
        matches!(
            UdfPayloadError::find(&error),
            Some(UdfPayloadError::TooLarge { .. })
        ),
        "{error}"
    );
}

#[test]
fn strict_mode_refuses_without_unpickling() {
    let strict = PythonUdfCodec::new(CodecOptions::default().with_strict(true));
    for format in [WireFormat::Inline, WireFormat::DataFusionPython] {
        let writer = PythonUdfCodec::new(CodecOptions::default().with_write_format(format));
        let bytes = payload_with(&writer, "strict_udf", "lambda a: a");
        let error = decode_err(&strict, "strict_udf", &bytes);
        assert_eq!(
            error,
            UdfPayloadError::Strict {
                name: "strict_udf".into()
            }
        );
        assert!(
            error.to_string().contains("register 'strict_udf'"),
            "{error}"
        );
    }
}

#[test]
fn unpickling_failures_name_the_cause() {
    let codec = PythonUdfCodec::default();
    let honest = payload("broken");

    let garbage = with_pickle(&honest, b"\x80\x05this is not a pickle");
    let udf = codec.try_decode_udf("broken", &garbage).unwrap();
    let error = call(&udf).unwrap_err();
    assert!(
        error.contains("could not be unpickled") && error.contains("broken"),
        "{error}"
    );

    let missing_module = with_pickle(&honest, b"cno_such_module_for_dfship\nfunc\n.");
    let udf = codec.try_decode_udf("broken", &missing_module).unwrap();
    let error = call(&udf).unwrap_err();
    assert!(
        error.contains("module 'no_such_module_for_dfship' is not installed"),
        "{error}"
    );
    assert!(
        error.contains("cloudpickle.register_pickle_by_value"),
        "{error}"
    );
}

#[test]
fn version_mismatches_name_both_versions() {
    let codec = PythonUdfCodec::default();
    let mut bytes = payload("skew");
    bytes[9] = bytes[9].wrapping_add(1);
    let udf = codec
        .try_decode_udf("skew", &bytes)
        .expect("decoding needs no Python");
    let error = call(&udf).unwrap_err();
    let local = Python::attach(|py| py.version_info().minor);
    assert!(
        error.contains(&format!("pickled by Python 3.{}", local + 1)),
        "{error}"
    );
    assert!(error.contains(&format!("runs Python 3.{local}")), "{error}");

    let mut bytes = payload("skew");
    bytes[10] = 2;
    let udf = codec.try_decode_udf("skew", &bytes).unwrap();
    let error = call(&udf).unwrap_err();
    assert!(
        error.contains("cloudpickle 2") && error.contains("cloudpickle 3"),
        "{error}"
    );

    let mut dfpy = payload_with(
        &PythonUdfCodec::new(
            CodecOptions::default().with_write_format(WireFormat::DataFusionPython),
        ),
        "skew",
        "lambda a: a",
    );
    dfpy[9] = 99;
    let error = decode_err(&codec, "skew", &dfpy);
    assert!(
        matches!(
            error,
            UdfPayloadError::PythonVersion {
                payload_minor: 99,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn dfpy_tuple_shapes_and_element_types() {
    let codec = PythonUdfCodec::default();
    let header = |pickle: Vec<u8>| {
        let (major, minor) =
            Python::attach(|py| (py.version_info().major, py.version_info().minor));
        let mut out = b"DFPYUDF\x01".to_vec();
        out.extend_from_slice(&[major, minor]);
        out.extend_from_slice(&pickle);
        out
    };
    let schemas = "import pyarrow as pa\ns_in = pa.schema([pa.field('arg_0', pa.int64())]).serialize().to_pybytes()\ns_out = pa.schema([pa.field('r', pa.int64())]).serialize().to_pybytes()\n";
    let cases = [
        ("cloudpickle.dumps([1, 2])", "instead of a 5-tuple"),
        (
            "cloudpickle.dumps(('shape', len))",
            "2 elements instead of 5",
        ),
        (
            "cloudpickle.dumps((1, len, s_in, s_out, 'immutable'))",
            "element 0",
        ),
        (
            "cloudpickle.dumps(('shape', 42, s_in, s_out, 'immutable'))",
            "element 1 of the DFPYUDF tuple must be a callable",
        ),
        (
            "cloudpickle.dumps(('shape', len, 'text', s_out, 'immutable'))",
            "element 2",
        ),
        (
            "cloudpickle.dumps(('shape', len, s_in, None, 'immutable'))",
            "element 3",
        ),
        (
            "cloudpickle.dumps(('shape', len, s_in, s_out, 3))",
            "element 4",
        ),
        (
            "cloudpickle.dumps(('shape', len, s_in, s_out, 'sometimes'))",
            "unknown volatility 'sometimes'",
        ),
        (
            "cloudpickle.dumps(('shape', len, b'nope', s_out, 'immutable'))",
            "argument schema",
        ),
        (
            "cloudpickle.dumps(('other', len, s_in, s_out, 'immutable'))",
            "names function 'other'",
        ),
    ];
    for (expression, expected) in cases {
        let bytes = header(pickle_of(schemas, expression));
        let error = decode_err(&codec, "shape", &bytes);
        assert!(
            error.to_string().contains(expected),
            "{expression}: {error}"
        );
    }
    let good = header(pickle_of(
        schemas,
        "cloudpickle.dumps(('shape', len, s_in, s_out, 'immutable'))",
    ));
    assert!(codec.try_decode_udf("shape", &good).is_ok());
}

#[test]
fn empty_payload_is_not_ours() {
    let error = decode_err(&PythonUdfCodec::default(), "by_name", b"");
    assert!(error.to_string().contains("register 'by_name'"), "{error}");
}

#[test]
fn cluster_key_sources() {
    assert!(ClusterKey::new(b"short".to_vec())
        .unwrap_err()
        .to_string()
        .contains("at least 16"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.key");
    std::fs::write(&path, b"0123456789abcdef0123\n").unwrap();
    assert_eq!(
        ClusterKey::from_file(&path).unwrap(),
        ClusterKey::new(b"0123456789abcdef0123".to_vec()).unwrap()
    );
    let missing = ClusterKey::from_file(dir.path().join("absent"))
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains("cannot read the cluster key file"),
        "{missing}"
    );
    assert_eq!(
        ClusterKey::from_env("DFSHIP_TEST_UNSET_KEY_VAR").unwrap(),
        None
    );
    assert!(
        !format!("{:?}", key(1)).contains("1, 1"),
        "Debug redacts the key"
    );
}

/// Found by `cargo fuzz run decode_payload`: a frame whose input schema is a
/// valid flatbuffer without its fields vector made arrow-ipc panic.
#[test]
fn schema_bytes_that_panic_arrow_ipc_are_an_error() {
    let frame = include_bytes!("data/fuzz-arrow-ipc-panic.bin");
    let error = decode_err(&PythonUdfCodec::default(), "fuzz", frame);
    assert!(
        error
            .to_string()
            .contains("is not a valid Arrow IPC schema stream"),
        "{error}"
    );
}

/// Found by `cargo fuzz run decode_payload`: a schema message declaring a
/// huge length made arrow-ipc's `StreamReader` allocate it (about 2 GB)
/// before reading; the push decoder dfship uses now keeps only the bytes
/// that came, and the stream ends short of what it declared.
#[test]
fn schema_bytes_declaring_a_huge_message_are_refused_before_allocating() {
    let frame = include_bytes!("data/fuzz-ipc-huge-length.bin");
    let error = decode_err(&PythonUdfCodec::default(), "fuzz", frame);
    assert!(
        error
            .to_string()
            .contains("is not a valid Arrow IPC schema stream")
            && error.to_string().contains("End of Stream"),
        "refused for the bytes that are missing: {error}"
    );
}
