//! A large pickle is handed to a destination that keeps it once; its plans
//! then name it by digest. Frames by digest keep every guarantee of a full
//! frame (signature outside the pickle, digest, HMAC tag), a kept payload is
//! checked like a plan's, and a receiver that does not hold the pickle says
//! so at once instead of guessing.

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
    let full = codec.encode_udf(&udf).unwrap().unwrap();
    let mut handed = None;
    let by_digest = codec
        .encode_udf_to(&udf, &mut |name, _, frame| {
            handed = Some((name.to_string(), frame.clone()));
            true
        })
        .unwrap()
        .unwrap();
    let (name, frame) = handed.expect("the destination is told which frame to keep");
    assert_eq!(
        (name.as_str(), frame.as_ref()),
        ("big_closure", full.as_ref())
    );
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
    let store = Arc::new(PayloadStore::new(64 << 20, Duration::ZERO));
    let worker = receiver(Arc::clone(&store), None);
    let digest = worker.keep_payload("big_closure", &full).unwrap();
    assert!(worker.holds_payload(&digest));
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
    // Re-encoding a plan decoded from a frame by digest emits it unchanged
    // for a destination that keeps pickles, and in full for any other.
    let again = worker.decode_udf("big_closure", &by_digest).unwrap();
    let kept = worker
        .encode_udf_to(&again, &mut |_, _, _| true)
        .unwrap()
        .unwrap();
    assert!(
        kept.to_vec() == by_digest,
        "the frame by digest is emitted unchanged"
    );
    let anywhere = worker.encode_udf(&again).unwrap().unwrap();
    assert!(
        anywhere.to_vec() == full,
        "a destination that keeps nothing gets the pickle"
    );
}

#[tokio::test]
async fn a_plan_naming_a_pickle_that_never_came_fails_clearly() {
    let (_, by_digest) = frames(&PythonUdfCodec::default());
    let store = Arc::new(PayloadStore::new(64 << 20, Duration::ZERO));
    let worker = receiver(store, None);
    // Decoding needs no pickle (the signature is in the frame); the call does,
    // and a miss answers at once.
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
        error.to_string().contains("does not hold that pickle")
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
    let store = Arc::new(PayloadStore::new(64 << 20, Duration::ZERO));
    let keyed = receiver(Arc::clone(&store), Some(key));
    // A kept payload is checked like a plan's: an unsigned one is refused.
    let (unsigned_full, _) = frames(&PythonUdfCodec::default());
    let error = keyed
        .keep_payload("big_closure", &unsigned_full)
        .unwrap_err();
    assert!(
        matches!(
            UdfPayloadError::find(&error),
            Some(UdfPayloadError::Unsigned { .. })
        ),
        "{error}"
    );
    assert!(
        keyed.keep_payload("big_closure", &by_digest).is_err(),
        "a frame by digest carries nothing to keep"
    );
    keyed.keep_payload("big_closure", &full).unwrap();
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
    let mut asked = false;
    let kept = codec
        .encode_udf_to(&udf, &mut |_, _, _| {
            asked = true;
            true
        })
        .unwrap()
        .unwrap();
    assert!(!asked, "a small pickle is never handed over on its own");
    assert_eq!(kept, codec.encode_udf(&udf).unwrap().unwrap());
}
