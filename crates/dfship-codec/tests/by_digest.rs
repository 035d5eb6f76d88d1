//! A large pickle goes to a destination once; the destination's other plans
//! name it by digest. Frames by digest keep every guarantee of a full frame
//! (signature outside the pickle, digest, HMAC tag), and a receiver that
//! never got the pickle says so instead of guessing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::DataType;
use common::*;
use datafusion::logical_expr::Volatility;
use dfship_codec::{
    ClusterKey, CodecOptions, ErrorKind, PayloadStore, PythonUdfCodec, UdfPayloadError,
    BY_DIGEST_MIN_BYTES,
};

const BLOB: usize = 256 * 1024;

/// A UDF closing over 256 KiB, and the full and by-digest frames for it.
fn frames(codec: &PythonUdfCodec) -> (Vec<u8>, Vec<u8>) {
    let udf = python_udf(
        "big_closure",
        vec![DataType::Int64],
        DataType::Int64,
        Volatility::Immutable,
        &format!("import pyarrow.compute as pc\nblob = b'x' * {BLOB}\n"),
        "lambda a, _blob=blob: pc.add(a, len(_blob))",
    );
    let full = codec.encode_udf_to(&udf, &mut |_| true).unwrap().unwrap();
    let by_digest = codec.encode_udf_to(&udf, &mut |_| false).unwrap().unwrap();
    (full.to_vec(), by_digest.to_vec())
}

fn receiver(store: Arc<PayloadStore>, key: Option<ClusterKey>) -> PythonUdfCodec {
    PythonUdfCodec::new(
        CodecOptions::default()
            .with_store(store)
            .with_optional_cluster_key(key),
    )
}

#[tokio::test]
async fn the_second_plan_names_the_pickle_and_runs_from_the_first() {
    let (full, by_digest) = frames(&PythonUdfCodec::default());
    assert!(full.len() > BLOB, "the full frame carries the pickle");
    assert!(
        by_digest.len() < 2048,
        "the frame by digest carries the signature and digest only: {} bytes",
        by_digest.len()
    );
    const { assert!(BY_DIGEST_MIN_BYTES < BLOB) };
    let store = Arc::new(PayloadStore::new(64 << 20, Duration::from_millis(200)));
    let worker = receiver(Arc::clone(&store), None);
    let first = worker.decode_udf("big_closure", &full).unwrap();
    let second = worker.decode_udf("big_closure", &by_digest).unwrap();
    for udf in [first, second] {
        let ctx = session_with_data().await;
        ctx.register_udf(udf.as_ref().clone());
        let rows = pretty(
            &ctx.sql("SELECT big_closure(a) AS b FROM v WHERE a = 1")
                .await
                .unwrap()
                .collect()
                .await
                .unwrap(),
        );
        assert!(rows.contains(&format!("| {} |", BLOB + 1)), "{rows}");
    }
    // Re-encoding a plan decoded from a frame by digest emits it unchanged.
    let again = worker.decode_udf("big_closure", &by_digest).unwrap();
    assert_eq!(
        worker.encode_udf(&again).unwrap().unwrap().to_vec(),
        by_digest
    );
}

#[tokio::test]
async fn a_plan_naming_a_pickle_that_never_came_fails_clearly() {
    let (_, by_digest) = frames(&PythonUdfCodec::default());
    let store = Arc::new(PayloadStore::new(64 << 20, Duration::from_millis(200)));
    let worker = receiver(store, None);
    // Decoding needs no pickle (the signature is in the frame); the call does.
    let udf = worker.decode_udf("big_closure", &by_digest).unwrap();
    let ctx = session_with_data().await;
    ctx.register_udf(udf.as_ref().clone());
    let error = ctx
        .sql("SELECT big_closure(a) FROM v")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap_err();
    assert_eq!(ErrorKind::of(&error), ErrorKind::UdfLoadFailed, "{error}");
    assert!(
        error.to_string().contains("did not receive that pickle")
            && error.to_string().contains("run the query again"),
        "{error}"
    );
}

#[test]
fn frames_by_digest_are_signed_and_checked_like_full_ones() {
    init_python();
    let key = ClusterKey::new(vec![7u8; 32]).unwrap();
    let (full, by_digest) = frames(&PythonUdfCodec::new(
        CodecOptions::default().with_cluster_key(key.clone()),
    ));
    let store = Arc::new(PayloadStore::new(64 << 20, Duration::from_millis(100)));
    let keyed = receiver(Arc::clone(&store), Some(key));
    keyed.decode_udf("big_closure", &full).unwrap();
    keyed.decode_udf("big_closure", &by_digest).unwrap();

    // One flipped byte anywhere (here: in the signature) fails the tag.
    let mut tampered = by_digest.clone();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0x20;
    let error = keyed.decode_udf("big_closure", &tampered).unwrap_err();
    assert!(
        matches!(
            UdfPayloadError::find(&error),
            Some(UdfPayloadError::BadTag { .. })
        ),
        "{error}"
    );
    // An unsigned frame by digest is refused by a keyed receiver.
    let (_, unsigned) = frames(&PythonUdfCodec::default());
    let error = keyed.decode_udf("big_closure", &unsigned).unwrap_err();
    assert!(
        matches!(
            UdfPayloadError::find(&error),
            Some(UdfPayloadError::Unsigned { .. })
        ),
        "{error}"
    );
    // A truncated frame by digest is a precise error, not a panic.
    for cut in [8, 20, unsigned.len() - 1] {
        assert!(keyed.decode_udf("big_closure", &unsigned[..cut]).is_err());
    }
}

#[test]
fn small_pickles_always_travel_in_full() {
    init_python();
    let udf = python_udf(
        "small",
        vec![DataType::Int64],
        DataType::Int64,
        Volatility::Immutable,
        "import pyarrow.compute as pc\n",
        "lambda a: pc.add(a, 1)",
    );
    let codec = PythonUdfCodec::default();
    let first = codec.encode_udf_to(&udf, &mut |_| true).unwrap().unwrap();
    let again = codec.encode_udf_to(&udf, &mut |_| false).unwrap().unwrap();
    assert_eq!(first, again);
}
