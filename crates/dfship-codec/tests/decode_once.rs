//! Decoding is lazy (no unpickling until the first call), unpickles each
//! callable once per process however many tasks decode it, and re-encoding
//! emits the bytes that were received.

mod common;

use std::sync::Arc;

use arrow::datatypes::DataType;
use common::*;
use datafusion::logical_expr::Volatility;
use dfship_codec::{CallableCache, CodecOptions, PythonUdfCodec, WireFormat};

#[tokio::test]
async fn a_stage_decoded_for_100_tasks_unpickles_once() {
    let ctx = session_with_data().await;
    ctx.register_udf(python_udf(
        "tasks_udf",
        vec![DataType::Int64],
        DataType::Int64,
        Volatility::Immutable,
        "import pyarrow.compute as pc\n",
        "lambda a: pc.multiply(a, 3)",
    ));
    let plan = physical_plan(&ctx, "SELECT tasks_udf(a) AS t FROM v").await;
    let bytes = encode(Arc::clone(&plan), &PythonUdfCodec::default()).unwrap();
    let expected = pretty(&run(plan).await.unwrap());

    let cache = Arc::new(CallableCache::new(16));
    let worker = PythonUdfCodec::new(CodecOptions::default().with_cache(Arc::clone(&cache)));
    let tasks: Vec<_> = (0..100).map(|_| decode(&bytes, &worker).unwrap()).collect();
    assert_eq!(cache.stats().loads, 0, "decoding alone unpickles nothing");

    for task in tasks {
        assert_eq!(pretty(&run(task).await.unwrap()), expected);
    }
    let stats = cache.stats();
    assert_eq!(stats.loads, 1, "one unpickle for 100 tasks: {stats:?}");
    assert_eq!(stats.hits, 99, "{stats:?}");
    assert_eq!(stats.entries, 1);
}

#[tokio::test]
async fn concurrent_first_calls_unpickle_once() {
    let ctx = session_with_data().await;
    ctx.register_udf(python_udf(
        "racing_udf",
        vec![DataType::Int64],
        DataType::Int64,
        Volatility::Immutable,
        "import pyarrow.compute as pc\n",
        "lambda a: pc.add(a, 11)",
    ));
    let plan = physical_plan(&ctx, "SELECT racing_udf(a) FROM v").await;
    let bytes = encode(plan, &PythonUdfCodec::default()).unwrap();
    let cache = Arc::new(CallableCache::new(16));
    let worker = PythonUdfCodec::new(CodecOptions::default().with_cache(Arc::clone(&cache)));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let task = decode(&bytes, &worker).unwrap();
            tokio::spawn(run(task))
        })
        .collect();
    for handle in handles {
        handle.await.unwrap().unwrap();
    }
    assert_eq!(cache.stats().loads, 1);
}

#[tokio::test]
async fn re_encoding_emits_the_received_bytes() {
    let ctx = session_with_data().await;
    ctx.register_udf(python_udf(
        "echo_udf",
        vec![DataType::Int64],
        DataType::Int64,
        Volatility::Immutable,
        "",
        "lambda a: a",
    ));
    let plan = physical_plan(&ctx, "SELECT echo_udf(a) FROM v").await;
    for format in [WireFormat::Inline, WireFormat::DataFusionPython] {
        let codec = PythonUdfCodec::new(CodecOptions::default().with_write_format(format));
        let first = encode(Arc::clone(&plan), &codec).unwrap();
        let second = encode(decode(&first, &codec).unwrap(), &codec).unwrap();
        assert_eq!(first, second, "{format:?}");
    }
}

#[test]
fn the_cache_is_bounded() {
    init_python();
    let cache = Arc::new(CallableCache::new(2));
    let codec = PythonUdfCodec::new(CodecOptions::default().with_cache(Arc::clone(&cache)));
    for i in 0..5 {
        let name = format!("bounded_{i}");
        let udf = python_udf(
            &name,
            vec![],
            DataType::Int64,
            Volatility::Volatile,
            "import pyarrow as pa\n",
            &format!("lambda: pa.array([{i}])"),
        );
        let payload = codec.encode_udf(&udf).unwrap().unwrap();
        let decoded = datafusion_proto::physical_plan::PhysicalExtensionCodec::try_decode_udf(
            &codec, &name, &payload,
        )
        .unwrap();
        let out = decoded
            .invoke_with_args(datafusion::logical_expr::ScalarFunctionArgs {
                args: vec![],
                arg_fields: vec![],
                number_rows: 1,
                return_field: Arc::new(arrow::datatypes::Field::new("r", DataType::Int64, true)),
                config_options: Arc::new(Default::default()),
            })
            .unwrap();
        assert!(matches!(out, datafusion::logical_expr::ColumnarValue::Array(a) if a.len() == 1));
    }
    let stats = cache.stats();
    assert_eq!((stats.loads, stats.entries), (5, 2), "{stats:?}");
}
