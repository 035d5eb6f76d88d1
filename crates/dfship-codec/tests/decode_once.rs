//! Decoding is lazy (no unpickling until the first call), each runner
//! loads a callable once however many tasks decode and call it, the
//! codec's own cache (datafusion-python payloads, unpickled at decode) is
//! bounded, and re-encoding emits the bytes that were received.

mod common;

use std::sync::{Arc, Barrier};

use arrow::array::{AsArray, Int64Array};
use arrow::datatypes::{DataType, Field, Int64Type};
use common::*;
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDF, Volatility};
use dfship_codec::{CallableCache, CodecOptions, PythonUdfCodec, WireFormat};

#[tokio::test]
async fn a_stage_decoded_for_100_tasks_loads_once_in_process() {
    dfship_codec::configure_python_execution(
        dfship_codec::PythonExecution::default()
            .with_mode(dfship_codec::PythonMode::InProcess)
            .with_runners(1),
    )
    .unwrap();
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
    let loaded = dfship_codec::runner_pool_stats().unwrap().loads;

    let worker = PythonUdfCodec::default();
    let tasks: Vec<_> = (0..100).map(|_| decode(&bytes, &worker).unwrap()).collect();
    assert_eq!(
        dfship_codec::runner_pool_stats().unwrap().loads,
        loaded,
        "decoding alone loads nothing"
    );
    for task in tasks {
        assert_eq!(pretty(&run(task).await.unwrap()), expected);
    }
    let stats = dfship_codec::runner_pool_stats().unwrap();
    assert_eq!(
        stats.loads, 1,
        "one load for 101 tasks on one runner: {stats:?}"
    );
    assert_eq!(stats.calls, 101, "{stats:?}");
}

/// Calls a decoded one-argument Int64 UDF on `[1, 2, 3]`.
fn call(udf: &ScalarUDF) -> datafusion::error::Result<ColumnarValue> {
    udf.invoke_with_args(ScalarFunctionArgs {
        args: vec![ColumnarValue::Array(Arc::new(Int64Array::from(vec![
            1, 2, 3,
        ])))],
        arg_fields: vec![Arc::new(Field::new("a", DataType::Int64, true))],
        number_rows: 3,
        return_field: Arc::new(Field::new("r", DataType::Int64, true)),
        config_options: Arc::new(Default::default()),
    })
}

#[test]
fn concurrent_first_calls_load_once_per_runner() {
    dfship_codec::configure_python_execution(
        dfship_codec::PythonExecution::default().with_runners(2),
    )
    .unwrap();
    // Unpickling this callable takes 0.5 s (its closure holds an object
    // restored by a sleeping function), so eight tasks that call it at once
    // really race for the first load.
    let udf = python_udf(
        "racing_udf",
        vec![DataType::Int64],
        DataType::Int64,
        Volatility::Immutable,
        "import time\nimport pyarrow.compute as pc\n\
         def restore(delay):\n    time.sleep(delay)\n    return delay\n\
         class SlowToLoad:\n    def __reduce__(self):\n        return (restore, (0.5,))\n\
         slow = SlowToLoad()\n",
        "lambda a, _slow=slow: pc.add(a, 11)",
    );
    let payload = PythonUdfCodec::default().encode_udf(&udf).unwrap().unwrap();
    let worker = PythonUdfCodec::default();
    const TASKS: usize = 8;
    let barrier = Arc::new(Barrier::new(TASKS));
    let threads: Vec<_> = (0..TASKS)
        .map(|_| {
            // Each task decodes the stage on its own, as a worker's tasks do.
            let task = worker.decode_udf("racing_udf", &payload).unwrap();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                call(&task)
            })
        })
        .collect();
    for thread in threads {
        let result = thread.join().unwrap();
        let ColumnarValue::Array(array) = result.unwrap() else {
            panic!("an array")
        };
        assert_eq!(array.as_primitive::<Int64Type>().values(), &[12, 13, 14]);
    }
    let stats = dfship_codec::runner_pool_stats().unwrap();
    assert!(
        stats.loads <= 2,
        "at most one load per runner for {TASKS} racing calls: {stats:?}"
    );
    assert_eq!(stats.calls, TASKS as u64, "{stats:?}");
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
fn the_cache_is_bounded_by_pickle_bytes() {
    init_python();
    // Five UDFs closing over ~100 kB each; the cache holds 250 kB of pickles.
    // datafusion-python payloads are unpickled (through the cache) when decoded.
    let cache = Arc::new(CallableCache::new(250_000));
    let codec = PythonUdfCodec::new(
        CodecOptions::default()
            .with_cache(Arc::clone(&cache))
            .with_write_format(WireFormat::DataFusionPython),
    );
    let payloads: Vec<_> = (0..5)
        .map(|i| {
            let udf = python_udf(
                &format!("bounded_{i}"),
                vec![DataType::Int64],
                DataType::Int64,
                Volatility::Immutable,
                &format!("import pyarrow.compute as pc\nblob = b'{i}' * 100_000\n"),
                "lambda a, _blob=blob: pc.add(a, len(_blob) // 100_000 - 1)",
            );
            codec.encode_udf(&udf).unwrap().unwrap()
        })
        .collect();
    let run = |i: usize| {
        codec
            .decode_udf(&format!("bounded_{i}"), &payloads[i])
            .unwrap();
    };
    for i in 0..5 {
        run(i);
    }
    let stats = cache.stats();
    assert_eq!((stats.loads, stats.entries), (5, 2), "{stats:?}");
    assert!(
        stats.bytes <= 250_000 && stats.bytes >= 200_000,
        "{stats:?}"
    );
    // The most recent entries stayed; the oldest is loaded again.
    run(4);
    assert_eq!(cache.stats().loads, 5);
    run(0);
    assert_eq!(cache.stats().loads, 6);

    // An entry larger than the whole budget is kept, alone.
    let huge = python_udf(
        "bounded_huge",
        vec![DataType::Int64],
        DataType::Int64,
        Volatility::Immutable,
        "import pyarrow.compute as pc\nblob = b'h' * 400_000\n",
        "lambda a, _blob=blob: a",
    );
    let payload = codec.encode_udf(&huge).unwrap().unwrap();
    codec.decode_udf("bounded_huge", &payload).unwrap();
    codec.decode_udf("bounded_huge", &payload).unwrap();
    let stats = cache.stats();
    assert_eq!((stats.loads, stats.entries), (7, 1), "{stats:?}");
    assert!(stats.bytes > 400_000, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_decoded_for_100_tasks_loads_once_per_runner() {
    dfship_codec::configure_python_execution(
        dfship_codec::PythonExecution::default().with_runners(2),
    )
    .unwrap();
    let ctx = session_with_data().await;
    ctx.register_udf(python_udf(
        "pooled_udf",
        vec![DataType::Int64],
        DataType::Int64,
        Volatility::Immutable,
        "import pyarrow.compute as pc\n",
        "lambda a: pc.multiply(a, 5)",
    ));
    let plan = physical_plan(&ctx, "SELECT pooled_udf(a) AS t FROM v").await;
    let bytes = encode(Arc::clone(&plan), &PythonUdfCodec::default()).unwrap();
    let expected = pretty(&run(plan).await.unwrap());
    let worker = PythonUdfCodec::default();
    let tasks: Vec<_> = (0..100).map(|_| decode(&bytes, &worker).unwrap()).collect();
    let runs: Vec<_> = tasks
        .into_iter()
        .map(|task| tokio::spawn(run(task)))
        .collect();
    for task in runs {
        assert_eq!(pretty(&task.await.unwrap().unwrap()), expected);
    }
    let stats = dfship_codec::runner_pool_stats().expect("the pool is the default");
    assert!(stats.started <= 2 && stats.started >= 1, "{stats:?}");
    assert_eq!(stats.lost, 0, "{stats:?}");
    assert!(
        stats.loads <= stats.started,
        "each runner received the callable once, whatever the number of tasks: {stats:?}"
    );
    assert_eq!(stats.calls, 101, "{stats:?}");
}
