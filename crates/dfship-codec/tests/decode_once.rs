//! Decoding is lazy (no unpickling until the first call), unpickles each
//! callable once per process (in-process mode) or once per runner (the
//! pool) however many tasks decode it, and re-encoding emits the bytes that
//! were received.

mod common;

use std::sync::{Arc, Barrier};
use std::time::Instant;

use arrow::array::{AsArray, Int64Array};
use arrow::datatypes::{DataType, Field, Int64Type};
use common::*;
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDF, Volatility};
use dfship_codec::{CallableCache, CodecOptions, PythonUdfCodec, WireFormat};

#[tokio::test]
async fn a_stage_decoded_for_100_tasks_unpickles_once() {
    in_process();
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

    let cache = Arc::new(CallableCache::new(64 << 20));
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
fn concurrent_first_calls_unpickle_once() {
    in_process();
    // Unpickling this callable takes 0.5 s with the GIL released (its
    // closure holds an object restored by a sleeping function), so eight
    // tasks that call it at once really do race for the same cache entry.
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
    let cache = Arc::new(CallableCache::new(64 << 20));
    let worker = PythonUdfCodec::new(CodecOptions::default().with_cache(Arc::clone(&cache)));
    const TASKS: usize = 8;
    let barrier = Arc::new(Barrier::new(TASKS));
    let threads: Vec<_> = (0..TASKS)
        .map(|_| {
            // Each task decodes the stage on its own, as a worker's tasks do.
            let task = worker.decode_udf("racing_udf", &payload).unwrap();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                let started = Instant::now();
                let result = call(&task);
                (started, Instant::now(), result)
            })
        })
        .collect();
    let calls: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (_, _, result) in &calls {
        let ColumnarValue::Array(array) = result.as_ref().unwrap() else {
            panic!("an array")
        };
        assert_eq!(array.as_primitive::<Int64Type>().values(), &[12, 13, 14]);
    }
    let last_start = calls.iter().map(|(start, _, _)| *start).max().unwrap();
    let first_end = calls.iter().map(|(_, end, _)| *end).min().unwrap();
    assert!(
        last_start < first_end,
        "every call started before the first one finished (they overlapped)"
    );
    let stats = cache.stats();
    assert_eq!(
        stats.loads, 1,
        "one unpickle for {TASKS} racing calls: {stats:?}"
    );
    assert_eq!(stats.hits, TASKS as u64 - 1, "{stats:?}");
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
    in_process();
    init_python();
    // Five UDFs closing over ~100 kB each; the cache holds 250 kB of pickles.
    let cache = Arc::new(CallableCache::new(250_000));
    let codec = PythonUdfCodec::new(CodecOptions::default().with_cache(Arc::clone(&cache)));
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
        let udf = codec
            .decode_udf(&format!("bounded_{i}"), &payloads[i])
            .unwrap();
        call(&udf).unwrap();
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
    let decoded = codec.decode_udf("bounded_huge", &payload).unwrap();
    call(&decoded).unwrap();
    call(&codec.decode_udf("bounded_huge", &payload).unwrap()).unwrap();
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
