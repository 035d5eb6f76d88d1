//! The runner pool against real runner processes: placement, affinity,
//! concurrency caps, async calls, cancellation, timeouts, and runners that
//! crash, forge replies or speak another protocol.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Float64Array, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use bytes::Bytes;
use common::{answer, call, function, ints, pool};
use dfship_runtime::protocol::{self, encode_streams};
use dfship_runtime::{CallError, CallSpec, CancelToken, ErrorClass, ObjectCall};

const PID: &str = "import os, pyarrow as pa";
const PID_OF: &str = "lambda xs: pa.array([os.getpid()] * len(xs), pa.int64())";

#[test]
fn every_call_gets_its_own_answer_from_any_runner() {
    let pool = pool(2, None);
    let double = Arc::new(function(
        "double",
        "import pyarrow.compute as pc",
        "lambda xs: pc.multiply(xs, 2)",
    ));
    let pending: Vec<_> = (0..40)
        .map(|i| pool.submit(call(&double, vec![i, i + 1])))
        .collect();
    for (i, pending) in pending.into_iter().enumerate() {
        let i = i as i64;
        assert_eq!(
            ints(pending.wait(&pool, None).unwrap()),
            vec![2 * i, 2 * i + 2]
        );
    }
    let stats = pool.stats();
    assert_eq!(stats.calls, 40);
    assert!(
        stats.loads <= 2,
        "a function is sent to a runner once: {stats:?}"
    );
}

#[test]
fn a_reply_to_no_call_kills_its_runner_and_no_other_call_sees_it() {
    let pool = pool(2, None);
    // Writes a well-formed RESULT for a request id no call has, then
    // answers normally: the pool must not hand that message to anyone.
    let forger = Arc::new(function(
        "forger",
        "import os, struct, pyarrow as pa\n\
         def forge(xs):\n\
         \x20   sink = pa.BufferOutputStream()\n\
         \x20   with pa.ipc.new_stream(sink, pa.schema([pa.field('result', pa.int64())])) as w:\n\
         \x20       w.write_batch(pa.record_batch([pa.array([666] * len(xs))], names=['result']))\n\
         \x20   body = sink.getvalue().to_pybytes()\n\
         \x20   os.write(3, struct.pack('<BQQ', 12, 12345, len(body)) + body)\n\
         \x20   return xs",
        "forge",
    ));
    let honest = Arc::new(function(
        "honest",
        "import pyarrow.compute as pc",
        "lambda xs: pc.add(xs, 1)",
    ));
    pool.warm_up().unwrap();
    let honest_calls: Vec<_> = (0..20)
        .map(|i| pool.submit(call(&honest, vec![i])))
        .collect();
    let forged = pool.submit(call(&forger, vec![1, 2, 3]));
    let error = forged.wait(&pool, None).unwrap_err();
    assert!(
        matches!(&error, CallError::Broken { detail } if detail.contains("no call in flight")),
        "{error:?}"
    );
    for (i, pending) in honest_calls.into_iter().enumerate() {
        assert_eq!(ints(pending.wait(&pool, None).unwrap()), vec![i as i64 + 1]);
    }
    // The pool serves on, with a replacement runner.
    assert_eq!(answer(&pool, &honest, vec![41]), vec![42]);
    let stats = pool.stats();
    assert_eq!((stats.broken, stats.lost), (1, 1), "{stats:?}");
}

#[test]
fn what_a_call_writes_reaches_its_sink_capped_and_a_forged_output_breaks_the_runner() {
    use dfship_runtime::protocol::{CallOutput, OutputStream};
    let pool = pool(1, None);
    // 10,005 lines, a log record and a warning: the runner keeps 10,000
    // lines of a call and counts the rest.
    let chatty = Arc::new(function(
        "chatty",
        "import logging, warnings\n\
         def chatty(xs):\n\
         \x20   warnings.warn('careful')\n\
         \x20   logging.getLogger('t').error('bad %d', 1)\n\
         \x20   for i in range(10_003):\n\
         \x20       print(i)\n\
         \x20   return xs",
        "chatty",
    ));
    let seen: Arc<std::sync::Mutex<Vec<CallOutput>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let mut spec = call(&chatty, vec![1]);
    spec.output = Some(dfship_runtime::OutputSink::new(move |output| {
        sink.lock().unwrap().push(output)
    }));
    assert_eq!(ints(pool.submit(spec).wait(&pool, None).unwrap()), vec![1]);
    let outputs = seen.lock().unwrap().clone();
    assert_eq!(outputs.len(), 1, "one OUTPUT per call");
    let output = &outputs[0];
    assert_eq!(output.lines.len(), 10_000);
    assert_eq!(output.dropped_lines, 5);
    assert!(
        output.lines[0].0 == OutputStream::Warning
            && output.lines[0].1.ends_with("UserWarning: careful")
    );
    assert_eq!(
        output.lines[1],
        (OutputStream::Logging, "ERROR t: bad 1".to_string())
    );
    assert_eq!(output.lines[2], (OutputStream::Stdout, "0".to_string()));
    // An OUTPUT naming the call but malformed (stream 9), from UDF code
    // writing on the runner's socket: the runner is broken, the pool serves on.
    let forger = Arc::new(function(
        "bad_output",
        "import sys, os, struct\n\
         def bad_output(xs):\n\
         \x20   request = sys._getframe(1).f_locals['request']\n\
         \x20   body = struct.pack('<QQ', 0, 0) + struct.pack('<BI', 9, 2) + b'hi'\n\
         \x20   os.write(3, struct.pack('<BQQ', 15, request, len(body)) + body)\n\
         \x20   return xs",
        "bad_output",
    ));
    let error = pool
        .submit(call(&forger, vec![1]))
        .wait(&pool, None)
        .unwrap_err();
    assert!(
        matches!(&error, CallError::Broken { detail } if detail.contains("malformed OUTPUT")),
        "{error:?}"
    );
    assert_eq!(answer(&pool, &chatty, vec![2]), vec![2]);
    assert_eq!(pool.stats().broken, 1);
}

#[test]
fn a_second_reply_to_a_call_kills_the_runner_that_sent_it() {
    let pool = pool(1, None);
    // Reads its own request id from the runner's frame and answers twice:
    // the second answer names a call no longer in flight.
    let twice = Arc::new(function(
        "twice",
        "import sys, os, struct, pyarrow as pa\n\
         def twice(xs):\n\
         \x20   request = sys._getframe(1).f_locals['request']\n\
         \x20   sink = pa.BufferOutputStream()\n\
         \x20   with pa.ipc.new_stream(sink, pa.schema([pa.field('result', pa.int64())])) as w:\n\
         \x20       w.write_batch(pa.record_batch([pa.array([7] * len(xs))], names=['result']))\n\
         \x20   body = sink.getvalue().to_pybytes()\n\
         \x20   os.write(3, struct.pack('<BQQ', 12, request, len(body)) + body)\n\
         \x20   return xs",
        "twice",
    ));
    let forged = pool.submit(call(&twice, vec![1])).wait(&pool, None);
    // The forged answer reached its own call (code in a runner can read its
    // memory; see the isolation levels), and the runner is gone.
    assert_eq!(ints(forged.unwrap()), vec![7]);
    let honest = Arc::new(function(
        "plus",
        "import pyarrow.compute as pc",
        "lambda xs: pc.add(xs, 1)",
    ));
    assert_eq!(answer(&pool, &honest, vec![1]), vec![2]);
    assert_eq!(pool.stats().broken, 1, "{:?}", pool.stats());
}

#[test]
fn a_runner_of_another_protocol_version_is_refused_with_a_clear_error() {
    let dir = tempfile_dir();
    let script = dir.join("fake-python");
    // A "Python" that runs an old runner: READY with protocol version 1.
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec {} -c 'import os, struct, socket\n\
             s = socket.socket(fileno=3)\n\
             body = struct.pack(\"<HBBBI\", 1, 3, 11, 3, os.getpid())\n\
             s.sendall(struct.pack(\"<BQQ\", 10, 0, len(body)) + body)\n\
             s.recv(1)'\n",
            common::python().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let pool = dfship_runtime::RunnerPool::new(dfship_runtime::PoolConfig::new(
        1,
        dfship_runtime::Launcher::Process(dfship_runtime::ProcessSettings {
            python: script,
            memory_limit: None,
            env_remove: Vec::new(),
            user: None,
        }),
    ));
    let error = pool.warm_up().unwrap_err();
    assert!(
        error.contains("runner protocol version 1")
            && error.contains(&format!("version {}", protocol::PROTOCOL_VERSION)),
        "{error}"
    );
    let f = Arc::new(function("f", "", "lambda xs: xs"));
    let error = pool
        .submit(call(&f, vec![1]))
        .wait(&pool, None)
        .unwrap_err();
    assert!(matches!(error, CallError::StartFailed { .. }), "{error:?}");
}

#[test]
fn concurrency_one_keeps_a_function_on_one_runner() {
    let pool = pool(2, None);
    pool.warm_up().unwrap();
    let mut capped = function("capped", PID, PID_OF);
    capped.concurrency = Some(1);
    let capped = Arc::new(capped);
    let free = Arc::new(function(
        "free",
        &format!("{PID}\nimport time"),
        "lambda xs: (time.sleep(0.05), pa.array([os.getpid()] * len(xs), pa.int64()))[1]",
    ));
    let calls: Vec<_> = (0..16)
        .map(|i| {
            let f = if i % 2 == 0 { &capped } else { &free };
            (i % 2 == 0, pool.submit(call(f, vec![i])))
        })
        .collect();
    let (mut capped_pids, mut free_pids) = (HashSet::new(), HashSet::new());
    for (is_capped, pending) in calls {
        let pid = ints(pending.wait(&pool, None).unwrap())[0];
        if is_capped {
            capped_pids.insert(pid);
        } else {
            free_pids.insert(pid);
        }
    }
    assert_eq!(
        capped_pids.len(),
        1,
        "one runner serves the capped function"
    );
    assert_eq!(free_pids.len(), 2, "the other function uses both runners");
}

#[test]
fn async_calls_share_a_runner_up_to_max_in_flight() {
    let pool = pool(1, None);
    let mut sleepy = function(
        "sleepy",
        "import asyncio\nasync def sleepy(xs):\n    await asyncio.sleep(0.3)\n    return xs",
        "sleepy",
    );
    sleepy.max_in_flight = 8;
    let sleepy = Arc::new(sleepy);
    // The first call teaches the pool that the function is async.
    assert_eq!(answer(&pool, &sleepy, vec![0]), vec![0]);
    let started = Instant::now();
    let pending: Vec<_> = (0..16)
        .map(|i| pool.submit(call(&sleepy, vec![i])))
        .collect();
    for (i, pending) in pending.into_iter().enumerate() {
        assert_eq!(ints(pending.wait(&pool, None).unwrap()), vec![i as i64]);
    }
    let elapsed = started.elapsed();
    // 16 calls of 0.3 s on one runner: two waves of 8, not 4.8 s in a row.
    assert!(
        elapsed < Duration::from_millis(1500) && elapsed >= Duration::from_millis(600),
        "{elapsed:?}"
    );
}

#[test]
fn a_cancelled_async_call_stops_without_killing_its_runner() {
    let pool = pool(1, None);
    let slow = Arc::new(function(
        "slow",
        "import asyncio\nasync def slow(xs):\n    await asyncio.sleep(30 if xs[0].as_py() else 0)\n    return xs",
        "slow",
    ));
    assert_eq!(answer(&pool, &slow, vec![0]), vec![0]);
    let token = CancelToken::default();
    let pending = pool.submit(call(&slow, vec![1]));
    let cancel = token.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        cancel.cancel();
    });
    let started = Instant::now();
    assert_eq!(pending.wait(&pool, Some(&token)), Err(CallError::Cancelled));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(answer(&pool, &slow, vec![0]), vec![0]);
    let stats = pool.stats();
    assert_eq!(
        (stats.started, stats.lost, stats.cancelled),
        (1, 0, 1),
        "{stats:?}"
    );
}

#[test]
fn the_first_call_of_an_async_function_sent_with_its_load_is_cancelled_as_a_coroutine() {
    // The call travels right behind its LOAD, before LOADED says the
    // function is async: cancelling it must still cancel the coroutine
    // (its `except CancelledError` runs), not kill the runner.
    let pool = pool(1, None);
    let mark = std::env::temp_dir().join(format!(
        "dfship-first-async-cancelled-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&mark);
    let source = format!(
        "import asyncio\nasync def slow(xs):\n    try:\n        await asyncio.sleep(30)\n    \
         except asyncio.CancelledError:\n        open({:?}, 'w').close()\n        raise\n    \
         return xs",
        mark.to_str().unwrap()
    );
    let slow = Arc::new(function("first_async", &source, "slow"));
    let token = CancelToken::default();
    let pending = pool.submit(call(&slow, vec![1]));
    let cancel = token.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        cancel.cancel();
    });
    assert_eq!(pending.wait(&pool, Some(&token)), Err(CallError::Cancelled));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !mark.exists() {
        assert!(
            Instant::now() < deadline,
            "the coroutine was never cancelled"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_file(&mark);
    let stats = pool.stats();
    assert_eq!((stats.started, stats.lost), (1, 0), "{stats:?}");
}

#[test]
fn a_call_past_the_timeout_kills_its_runner_and_the_pool_serves_on() {
    let pool = pool(1, Some(Duration::from_secs(1)));
    let hang = Arc::new(function("hang", "import time", "lambda xs: time.sleep(60)"));
    let started = Instant::now();
    let error = pool
        .submit(call(&hang, vec![1]))
        .wait(&pool, None)
        .unwrap_err();
    assert!(matches!(error, CallError::TimedOut { .. }), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let plus = Arc::new(function(
        "plus",
        "import pyarrow.compute as pc",
        "lambda xs: pc.add(xs, 1)",
    ));
    assert_eq!(answer(&pool, &plus, vec![1]), vec![2]);
    assert_eq!(pool.stats().timeouts, 1);
}

#[test]
fn a_call_whose_runner_crashes_is_replayed_once_then_fails_with_both_causes() {
    let pool = pool(1, None);
    let abort = Arc::new(function("abort", "import os", "lambda xs: os.abort()"));
    let error = pool
        .submit(call(&abort, vec![1]))
        .wait(&pool, None)
        .unwrap_err();
    assert!(
        matches!(&error, CallError::Lost { how }
            if how.matches("SIGABRT").count() == 2 && how.contains("replayed once")),
        "{error:?}"
    );
    let stats = pool.stats();
    assert_eq!((stats.crashes, stats.replays), (2, 1), "{stats:?}");
}

#[test]
fn a_runner_crash_on_the_first_attempt_only_is_invisible_to_the_caller() {
    let dir = tempfile_dir();
    let marker = dir.join("crashed-once");
    let pool = pool(1, None);
    let flaky = Arc::new(function(
        "flaky",
        &format!(
            "import os, pyarrow.compute as pc\n\
             def flaky(xs):\n\
             \x20   if not os.path.exists({marker:?}):\n\
             \x20       open({marker:?}, 'w').close()\n\
             \x20       os.abort()\n\
             \x20   return pc.add(xs, 1)",
            marker = marker.display().to_string()
        ),
        "flaky",
    ));
    assert_eq!(answer(&pool, &flaky, vec![1, 2]), vec![2, 3]);
    let stats = pool.stats();
    assert_eq!((stats.crashes, stats.replays), (1, 1), "{stats:?}");
}

#[test]
fn a_volatile_udfs_crash_and_a_timeout_are_not_replayed() {
    let pool = pool(1, Some(Duration::from_secs(1)));
    let mut abort = function("volatile_abort", "import os", "lambda xs: os.abort()");
    abort.replayable = false;
    let abort = Arc::new(abort);
    let error = pool
        .submit(call(&abort, vec![1]))
        .wait(&pool, None)
        .unwrap_err();
    assert!(
        matches!(&error, CallError::Lost { how } if how.matches("SIGABRT").count() == 1),
        "{error:?}"
    );
    let hang = Arc::new(function("hang", "import time", "lambda xs: time.sleep(60)"));
    let error = pool
        .submit(call(&hang, vec![1]))
        .wait(&pool, None)
        .unwrap_err();
    assert!(matches!(error, CallError::TimedOut { .. }), "{error:?}");
    assert_eq!(pool.stats().replays, 0);
}

#[test]
fn a_raising_class_init_is_reported_as_such_and_retried_on_the_next_call() {
    let pool = pool(1, None);
    let flaky = Arc::new(function(
        "flaky",
        "import os, pyarrow as pa\n\
         class Model:\n\
         \x20   tries = 0\n\
         \x20   def __init__(self):\n\
         \x20       type(self).tries += 1\n\
         \x20       if type(self).tries == 1:\n\
         \x20           raise RuntimeError('no model file yet')\n\
         \x20   def __call__(self, xs):\n\
         \x20       return pa.array([type(self).tries] * len(xs), pa.int64())",
        "Model",
    ));
    let error = pool
        .submit(call(&flaky, vec![1]))
        .wait(&pool, None)
        .unwrap_err();
    assert!(
        matches!(&error, CallError::Failed { class: Some(ErrorClass::InitFailed), text }
            if text.contains("Model() raised RuntimeError: no model file yet")),
        "{error:?}"
    );
    // The instance is made once it succeeds, then reused.
    for _ in 0..3 {
        assert_eq!(answer(&pool, &flaky, vec![1]), vec![2]);
    }
}

fn aggregate(
    function: &Arc<dfship_runtime::FunctionSpec>,
    object: ObjectCall,
    op: u8,
    count: u64,
    batches: &[RecordBatch],
) -> CallSpec {
    CallSpec {
        function: Arc::clone(function),
        kind: protocol::AGGREGATE,
        body: vec![
            protocol::aggregate_head(object.id, object.create, op, count, true),
            Bytes::from(encode_streams(batches).unwrap()),
        ],
        object: Some(object),
        tenant: None,
        output: None,
    }
}

#[test]
fn an_object_stays_on_its_runner_and_is_lost_with_it() {
    let pool = pool(2, None);
    let total = Arc::new(function(
        "total",
        "import os, pyarrow.compute as pc\n\
         class Total:\n\
         \x20   def __init__(self): self.total = 0.0\n\
         \x20   def update(self, xs):\n\
         \x20       if pc.max(xs).as_py() < 0: os._exit(3)\n\
         \x20       self.total += pc.sum(xs).as_py()\n\
         \x20   def merge(self, states): self.total += pc.sum(states[0]).as_py()\n\
         \x20   def state(self): return [self.total]\n\
         \x20   def evaluate(self): return self.total",
        "Total",
    ));
    let rows = |groups: Vec<i64>, values: Vec<f64>| {
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("group", DataType::Int64, false),
                Field::new("arg_0", DataType::Float64, true),
            ])),
            vec![
                Arc::new(Int64Array::from(groups)),
                Arc::new(Float64Array::from(values)),
            ],
        )
        .unwrap()
    };
    let returns = RecordBatch::new_empty(Arc::new(Schema::new(vec![Field::new(
        "result",
        DataType::Float64,
        true,
    )])));
    let id = pool.new_object_id();
    let create = ObjectCall { id, create: true };
    let same = ObjectCall { id, create: false };
    // Pipelined: three updates in flight before any answer is read.
    let updates = vec![
        pool.submit(aggregate(
            &total,
            create,
            protocol::AGG_UPDATE,
            2,
            &[rows(vec![0, 1], vec![1.0, 10.0])],
        )),
        pool.submit(aggregate(
            &total,
            same,
            protocol::AGG_UPDATE,
            2,
            &[rows(vec![1, 1], vec![5.0, 5.0])],
        )),
        pool.submit(aggregate(
            &total,
            same,
            protocol::AGG_UPDATE,
            3,
            &[rows(vec![0], vec![2.0])],
        )),
    ];
    for pending in updates {
        let reply = pending.wait(&pool, None).unwrap();
        assert_eq!(reply.kind, protocol::DONE);
        assert!(protocol::parse_done(&reply.body).unwrap() > 0);
    }
    let reply = pool
        .submit(aggregate(
            &total,
            same,
            protocol::AGG_EVALUATE,
            3,
            std::slice::from_ref(&returns),
        ))
        .wait(&pool, None)
        .unwrap();
    let (_, data) = protocol::decode_result(reply.body).unwrap();
    // Group 2 was never touched: a fresh accumulator's value.
    assert_eq!(
        Float64Array::from(data).values().to_vec(),
        vec![3.0, 20.0, 0.0]
    );
    // A second object, then the runner holding it dies mid-update.
    let other = pool.new_object_id();
    let error = pool
        .submit(aggregate(
            &total,
            ObjectCall {
                id: other,
                create: true,
            },
            protocol::AGG_UPDATE,
            1,
            &[rows(vec![0], vec![-1.0])],
        ))
        .wait(&pool, None)
        .unwrap_err();
    assert!(
        matches!(&error, CallError::Lost { how } if how.contains("code 3")),
        "{error:?}"
    );
    let error = pool
        .submit(aggregate(
            &total,
            ObjectCall {
                id: other,
                create: false,
            },
            protocol::AGG_EVALUATE,
            1,
            &[returns],
        ))
        .wait(&pool, None)
        .unwrap_err();
    assert!(
        matches!(&error, CallError::StateLost { how } if how.contains("died")),
        "{error:?}"
    );
    pool.close_object(id);
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "dfship-runtime-test-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_starving_call_reserves_a_runner_that_objects_keep_busy() {
    let pool = pool(1, None);
    let slow = Arc::new(function(
        "slow_total",
        "import time, pyarrow.compute as pc\n\
         class Slow:\n\
         \x20   def __init__(self): self.total = 0.0\n\
         \x20   def update(self, xs):\n\
         \x20       time.sleep(0.05)\n\
         \x20       self.total += pc.sum(xs).as_py()\n\
         \x20   def merge(self, states): pass\n\
         \x20   def state(self): return [self.total]\n\
         \x20   def evaluate(self): return self.total",
        "Slow",
    ));
    let plus = Arc::new(function(
        "plus",
        "import pyarrow.compute as pc",
        "lambda xs: pc.add(xs, 1)",
    ));
    pool.warm_up().unwrap();
    let rows = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("group", DataType::Int64, false),
            Field::new("arg_0", DataType::Float64, true),
        ])),
        vec![
            Arc::new(Int64Array::from(vec![0])),
            Arc::new(Float64Array::from(vec![1.0])),
        ],
    )
    .unwrap();
    // An object keeps three updates queued on the only runner at all times.
    let id = pool.new_object_id();
    let pool = Arc::new(pool);
    let pump = {
        let (pool, slow, rows) = (Arc::clone(&pool), Arc::clone(&slow), rows.clone());
        std::thread::spawn(move || {
            let mut in_flight = std::collections::VecDeque::new();
            let started = Instant::now();
            let mut create = true;
            while started.elapsed() < Duration::from_secs(3) {
                let object = ObjectCall { id, create };
                create = false;
                in_flight.push_back(pool.submit(aggregate(
                    &slow,
                    object,
                    protocol::AGG_UPDATE,
                    1,
                    std::slice::from_ref(&rows),
                )));
                if in_flight.len() >= 3 {
                    in_flight.pop_front().unwrap().wait(&pool, None).unwrap();
                }
            }
            for pending in in_flight {
                pending.wait(&pool, None).unwrap();
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    assert_eq!(answer(&pool, &plus, vec![1]), vec![2]);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(1),
        "the call reserved the runner and got it once its queue drained: {waited:?}"
    );
    pump.join().unwrap();
}

/// A UDF that answers its own call with `body` (hex) as a RESULT, through
/// the runner's socket, before the runner answers it again honestly.
fn forging(name: &str, body: &[u8]) -> Arc<dfship_runtime::FunctionSpec> {
    let hex: String = body.iter().map(|b| format!("{b:02x}")).collect();
    Arc::new(function(
        name,
        &format!(
            "import sys, os, struct\n\
             BODY = bytes.fromhex('{hex}')\n\
             def forge(xs):\n\
             \x20   request = sys._getframe(1).f_locals['request']\n\
             \x20   os.write(3, struct.pack('<BQQ', 12, request, len(BODY)) + BODY)\n\
             \x20   return xs"
        ),
        "forge",
    ))
}

#[test]
fn replies_that_panic_or_exhaust_arrow_ipc_are_errors_and_the_pool_serves_on() {
    let hostile = [
        ("no_fields", common::schema_without_fields(), "panic"),
        // 2^50 bytes: allocating it would abort the process.
        (
            "huge_body",
            common::batch_declaring_body(1 << 50),
            "End of Stream",
        ),
        ("negative_body", common::batch_declaring_body(-8), ""),
    ];
    let pool = pool(2, None);
    let honest = Arc::new(function(
        "plus",
        "import pyarrow.compute as pc",
        "lambda xs: pc.add(xs, 1)",
    ));
    let broken_before = pool.stats().broken;
    for (name, body, expected) in hostile.clone() {
        // Straight from the bytes…
        let error = protocol::decode_result(body.clone()).unwrap_err();
        assert!(
            error.contains("not a valid Arrow IPC stream") && error.contains(expected),
            "{name}: {error}"
        );
        // …and through a runner: the forged reply reaches its call, whose
        // decoding fails cleanly; the runner is killed for answering twice.
        let reply = pool
            .submit(call(&forging(name, &body), vec![1, 2]))
            .wait(&pool, None)
            .unwrap();
        assert_eq!(reply.kind, protocol::RESULT);
        let error = protocol::decode_result(reply.body).unwrap_err();
        assert!(error.contains(expected), "{name}: {error}");
        // (Its second, honest answer breaks the runner: wait for that, so
        // the next call does not go to it in between.)
        let broken = pool.stats().broken;
        let deadline = Instant::now() + Duration::from_secs(10);
        while pool.stats().broken == broken && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(answer(&pool, &honest, vec![1]), vec![2], "{name}");
    }
    assert_eq!(
        pool.stats().broken - broken_before,
        hostile.len() as u64,
        "{:?}",
        pool.stats()
    );
}

#[test]
fn a_reply_trickled_byte_by_byte_and_a_pickle_that_loads_forever_hit_the_call_timeout() {
    let pool = pool(1, Some(Duration::from_secs(2)));
    // Announces a 1 KiB reply for its own call, then sends a byte a second.
    let trickle = Arc::new(function(
        "trickle",
        "import sys, os, struct, time\n\
         def trickle(xs):\n\
         \x20   request = sys._getframe(1).f_locals['request']\n\
         \x20   os.write(3, struct.pack('<BQQ', 12, request, 1024))\n\
         \x20   for _ in range(1024):\n\
         \x20       os.write(3, b'x')\n\
         \x20       time.sleep(1)\n\
         \x20   return xs",
        "trickle",
    ));
    // Unpickling it sleeps (a class whose __reduce__ runs time.sleep).
    let slow_load = Arc::new(function(
        "slow_load",
        "import time\n\
         class Slow:\n\
         \x20   def __reduce__(self):\n\
         \x20       return (time.sleep, (600,))\n\
         SLOW = Slow()\n\
         def f(xs):\n\
         \x20   return xs if SLOW is None else xs",
        "f",
    ));
    for function in [trickle, slow_load] {
        let started = Instant::now();
        let error = pool
            .submit(call(&function, vec![1]))
            .wait(&pool, None)
            .unwrap_err();
        assert!(
            matches!(error, CallError::TimedOut { .. }),
            "{}: {error:?}",
            function.name
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{}: {:?}",
            function.name,
            started.elapsed()
        );
    }
    let honest = Arc::new(function("id", "", "lambda xs: xs"));
    assert_eq!(answer(&pool, &honest, vec![5]), vec![5]);
    assert_eq!(pool.stats().timeouts, 2, "{:?}", pool.stats());
}

/// What a runner shows of earlier calls: `[pid, a patched builtin, a planted
/// module, a planted thread]` (four rows in, four out).
const PROBE: &str = "import builtins, os, sys, threading, pyarrow as pa\n\
     def probe(xs):\n\
     \x20   return pa.array([os.getpid(), int(getattr(builtins, 'dfship_planted', 0)),\n\
     \x20                    int('planted_module' in sys.modules),\n\
     \x20                    sum(t.name == 'planted' for t in threading.enumerate())], pa.int64())";

/// Plants things in its runner for later calls to find, then probes.
const PLANT: &str = "import builtins, os, sys, threading, time, types, pyarrow as pa\n\
     def plant(xs):\n\
     \x20   builtins.dfship_planted = 1\n\
     \x20   sys.modules['planted_module'] = types.ModuleType('planted_module')\n\
     \x20   threading.Thread(target=time.sleep, args=(3600,), name='planted', daemon=True).start()\n\
     \x20   return pa.array([os.getpid(), 1, 1, 1], pa.int64())";

fn isolated_pool(
    runners: usize,
    isolation: dfship_runtime::Isolation,
) -> dfship_runtime::RunnerPool {
    let mut config = common::config(runners);
    config.isolation = isolation;
    dfship_runtime::RunnerPool::new(config)
}

fn as_tenant(
    pool: &dfship_runtime::RunnerPool,
    function: &Arc<dfship_runtime::FunctionSpec>,
    tenant: u64,
) -> Vec<i64> {
    let mut spec = call(function, vec![0, 0, 0, 0]);
    spec.tenant = Some(tenant);
    ints(pool.submit(spec).wait(pool, None).unwrap())
}

#[test]
fn under_query_isolation_nothing_a_query_plants_in_its_runner_reaches_another_query() {
    use dfship_runtime::Isolation;
    let plant = Arc::new(function("plant", PLANT, "plant"));
    let probe = Arc::new(function("probe", PROBE, "probe"));

    // Control: shared runners (one) carry the plants from query 1 to query 2.
    let shared = isolated_pool(1, Isolation::Shared);
    let planted = as_tenant(&shared, &plant, 1);
    let seen = as_tenant(&shared, &probe, 2);
    assert_eq!(
        seen,
        vec![planted[0], 1, 1, 1],
        "shared runners keep what a UDF leaves"
    );

    // Query isolation, two runners: the second query gets the other runner
    // while the first lives; the first query keeps its own runner.
    let pool = isolated_pool(2, Isolation::Query);
    let planted = as_tenant(&pool, &plant, 1);
    let other = as_tenant(&pool, &probe, 2);
    assert_ne!(other[0], planted[0]);
    assert_eq!(other[1..], [0, 0, 0], "query 2 sees nothing of query 1");
    assert_eq!(
        as_tenant(&pool, &probe, 1),
        vec![planted[0], 1, 1, 1],
        "query 1 keeps its runner"
    );
    // Query 1 ends: its runner is replaced by a fresh process.
    pool.end_tenant(1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.stats().retired < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let third = as_tenant(&pool, &probe, 3);
    assert!(
        third[0] != planted[0] && third[1..] == [0, 0, 0],
        "{third:?}"
    );

    // One runner, two live queries: the idle runner of one is retired for
    // the other (never shared).
    let single = isolated_pool(1, Isolation::Query);
    let first = as_tenant(&single, &plant, 10);
    let second = as_tenant(&single, &probe, 11);
    assert!(
        second[0] != first[0] && second[1..] == [0, 0, 0],
        "{second:?}"
    );
    let stats = single.stats();
    assert_eq!((stats.retired, stats.lost), (1, 0), "{stats:?}");
}

/// `function` in environment `environment` (a digest; `None`: the worker's own).
fn in_environment(
    function: &dfship_runtime::FunctionSpec,
    environment: Option<u8>,
) -> Arc<dfship_runtime::FunctionSpec> {
    let mut spec = function.clone();
    spec.environment = environment.map(|byte| [byte; 32]);
    Arc::new(spec)
}

#[test]
fn a_runner_serves_the_functions_of_one_environment_only() {
    use dfship_runtime::Isolation;
    let plant = function("plant", PLANT, "plant");
    let probe = function("probe", PROBE, "probe");
    // Two runners, shared isolation: environment 1's runner keeps serving
    // environment 1 (what it planted is there), environment 2 and the
    // worker's own environment never get it.
    let pool = isolated_pool(2, Isolation::Shared);
    let planted = as_tenant(&pool, &in_environment(&plant, Some(1)), 1);
    let same = as_tenant(&pool, &in_environment(&probe, Some(1)), 2);
    assert_eq!(
        same,
        vec![planted[0], 1, 1, 1],
        "one environment shares its runner"
    );
    let other = as_tenant(&pool, &in_environment(&probe, Some(2)), 3);
    assert!(
        other[0] != planted[0] && other[1..] == [0, 0, 0],
        "{other:?}"
    );
    // The pool is full (environments 1 and 2): the worker's own
    // environment retires an idle runner of another, never shares one.
    let own = as_tenant(&pool, &in_environment(&probe, None), 4);
    assert!(
        own[0] != planted[0] && own[0] != other[0] && own[1..] == [0, 0, 0],
        "{own:?}"
    );
    assert_eq!(pool.stats().retired, 1, "{:?}", pool.stats());
    // One runner, environments taking turns: each turn another process.
    let single = isolated_pool(1, Isolation::Shared);
    let mut seen = Vec::new();
    for (turn, environment) in [Some(1), Some(2), Some(1), None].into_iter().enumerate() {
        let got = as_tenant(&single, &in_environment(&probe, environment), turn as u64);
        assert_eq!(got[1..], [0, 0, 0], "turn {turn}");
        seen.push(got[0]);
    }
    seen.dedup();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_eq!(single.stats().retired, 3, "{:?}", single.stats());
}

#[test]
fn a_runner_imports_nothing_from_the_workers_working_directory() {
    // `python -c` puts the working directory first on sys.path; a module
    // there named like one the runner imports would run in every runner.
    let dir = tempfile_dir().join("hostile-cwd");
    std::fs::create_dir_all(&dir).unwrap();
    let marker = dir.join("imported");
    for module in [
        "functools",
        "inspect",
        "socket",
        "struct",
        "threading",
        "traceback",
        "cloudpickle",
        "pyarrow",
    ] {
        std::fs::write(
            dir.join(format!("{module}.py")),
            format!(
                "open({:?}, 'a').write('{module} ')\n",
                marker.display().to_string()
            ),
        )
        .unwrap();
    }
    // (Pickled first: the helper runs Python too.)
    let f = Arc::new(function(
        "plus",
        "import pyarrow.compute as pc",
        "lambda xs: pc.add(xs, 1)",
    ));
    let spec = call(&f, vec![1]);
    // nextest runs each test in a process of its own: the cwd is ours.
    std::env::set_current_dir(&dir).unwrap();
    let pool = pool(1, None);
    assert_eq!(ints(pool.submit(spec).wait(&pool, None).unwrap()), vec![2]);
    assert!(
        !marker.exists(),
        "the runner imported from its working directory: {}",
        std::fs::read_to_string(&marker).unwrap_or_default()
    );
}

#[test]
fn a_reply_above_the_limit_breaks_its_runner_before_anything_is_allocated() {
    let mut config = common::config(1);
    config.max_reply_bytes = 64 << 20;
    let pool = dfship_runtime::RunnerPool::new(config);
    // Declares a 1 TiB reply for its own call and sends nothing more.
    let huge = Arc::new(function(
        "huge",
        "import sys, os, struct, time\n\
         def huge(xs):\n\
         \x20   request = sys._getframe(1).f_locals['request']\n\
         \x20   os.write(3, struct.pack('<BQQ', 12, request, 1 << 40))\n\
         \x20   time.sleep(600)",
        "huge",
    ));
    let error = pool
        .submit(call(&huge, vec![1]))
        .wait(&pool, None)
        .unwrap_err();
    assert!(
        matches!(&error, CallError::Broken { detail } if detail.contains("above the limit of 67108864")),
        "{error:?}"
    );
    let honest = Arc::new(function("id", "", "lambda xs: xs"));
    assert_eq!(answer(&pool, &honest, vec![3]), vec![3]);
}

/// Holds a secret in the runner's memory; answers the runner's pid and the
/// address of the secret's bytes (CPython: a bytes object's data follows
/// its 32-byte header).
const HOLD_SECRET: &str = "import os, pyarrow as pa\n\
     SECRET = None\n\
     def hold(x):\n\
     \x20   global SECRET\n\
     \x20   SECRET = b'SECRET-OF-QUERY-B-' + os.urandom(8).hex().encode()\n\
     \x20   return pa.array([os.getpid(), id(SECRET) + 32, 0, 0], pa.int64())";

/// Given B's runner pid, the secret's address and the worker's pid: reads
/// B's memory, SIGKILLs B's runner, probes the worker with signal 0, and
/// leaves a double-forked daemon (that tries to start a session of its
/// own). Answers 1 for each attack that worked, and the daemon's pid.
const ATTACK: &str = "import os, signal, time, pyarrow as pa\n\
     def attack(x):\n\
     \x20   pid, address, worker = x.to_pylist()[:3]\n\
     \x20   try:\n\
     \x20       with open(f'/proc/{pid}/mem', 'rb') as mem:\n\
     \x20           mem.seek(address)\n\
     \x20           read = int(mem.read(18) == b'SECRET-OF-QUERY-B-')\n\
     \x20   except OSError:\n\
     \x20       read = 0\n\
     \x20   try:\n\
     \x20       os.kill(pid, signal.SIGKILL)\n\
     \x20       killed = 1\n\
     \x20   except OSError:\n\
     \x20       killed = 0\n\
     \x20   try:\n\
     \x20       os.kill(worker, 0)\n\
     \x20       reached = 1\n\
     \x20   except OSError:\n\
     \x20       reached = 0\n\
     \x20   r, w = os.pipe()\n\
     \x20   if os.fork() == 0:\n\
     \x20       if os.fork() == 0:\n\
     \x20           try:\n\
     \x20               os.setsid()\n\
     \x20           except OSError:\n\
     \x20               pass\n\
     \x20           os.write(w, str(os.getpid()).encode().ljust(16))\n\
     \x20           time.sleep(3600)\n\
     \x20       os._exit(0)\n\
     \x20   daemon = int(os.read(r, 16).decode().strip())\n\
     \x20   return pa.array([read, killed, reached, daemon], pa.int64())";

/// Whether process `pid` still runs (a zombie waiting for its reaper does not).
fn runs(pid: i64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

#[test]
fn under_query_isolation_a_query_cannot_read_or_signal_another_querys_runner_and_what_it_forks_dies_with_its_runner(
) {
    use dfship_runtime::Isolation;
    // No file hidden from runners (a key given as a variable): each runner
    // is still a domain of its own.
    let pool = isolated_pool(2, Isolation::Query);
    let hold = Arc::new(function("hold", HOLD_SECRET, "hold"));
    let attack = Arc::new(function("attack", ATTACK, "attack"));
    let held = as_tenant(&pool, &hold, 1);
    let (b_pid, address) = (held[0], held[1]);

    let mut spec = call(
        &attack,
        vec![b_pid, address, i64::from(std::process::id()), 0],
    );
    spec.tenant = Some(2);
    let outcome = ints(pool.submit(spec).wait(&pool, None).unwrap());
    assert_eq!(
        outcome[..3],
        [0, 0, 0],
        "query 2 read query 1's memory, killed its runner or signalled the worker: {outcome:?}"
    );
    let daemon = outcome[3];
    assert!(
        runs(daemon),
        "the daemon a UDF left runs until its runner ends"
    );

    // Query 1's runner lives on, its secret where it was.
    let again = as_tenant(&pool, &hold, 1);
    assert_eq!(again[0], b_pid, "query 1 kept its runner");
    assert_eq!(pool.stats().lost, 0, "{:?}", pool.stats());

    // Query 2 ends: its runner retires, and its process group with it.
    pool.end_tenant(2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while runs(daemon) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !runs(daemon),
        "a daemon double-forked by a UDF outlived its retired runner"
    );
    assert_eq!(pool.stats().retired, 1, "{:?}", pool.stats());
}

/// This process's peak resident memory (`VmHWM`), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .unwrap();
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    kib * 1024
}

#[test]
fn forged_reply_headers_from_every_runner_hold_at_most_the_reply_budget_in_memory() {
    const MIB: u64 = 1 << 20;
    let mut config = common::config(3);
    config.call_timeout = Some(Duration::from_secs(3));
    config.reply_bytes_in_flight = 256 * MIB;
    let pool = dfship_runtime::RunnerPool::new(config);
    pool.warm_up().unwrap();
    // Each runner announces a 200 MiB RESULT for its call, sends 199 MiB of
    // it from one 1 MiB buffer, and stalls.
    let forge = Arc::new(function(
        "forge",
        "import sys, os, struct, time\n\
         def forge(xs):\n\
         \x20   request = sys._getframe(1).f_locals['request']\n\
         \x20   os.write(3, struct.pack('<BQQ', 12, request, 200 << 20))\n\
         \x20   chunk = b'x' * (1 << 20)\n\
         \x20   for _ in range(199):\n\
         \x20       os.write(3, chunk)\n\
         \x20   time.sleep(3600)\n\
         \x20   return xs",
        "forge",
    ));
    let before = peak_rss();
    let started = Instant::now();
    let calls: Vec<_> = (0..3).map(|i| pool.submit(call(&forge, vec![i]))).collect();
    for pending in calls {
        let error = pending.wait(&pool, None).unwrap_err();
        assert!(matches!(error, CallError::TimedOut { .. }), "{error:?}");
    }
    let grown = peak_rss().saturating_sub(before);
    eprintln!(
        "three forged 200 MiB replies: peak RSS grew {} MiB in {:.1} s",
        grown / MIB,
        started.elapsed().as_secs_f64()
    );
    // Without the budget all three bodies (597 MiB) would be held at once.
    assert!(
        grown < 300 * MIB,
        "peak RSS grew by {} MiB: more than the 256 MiB budget allows",
        grown / MIB
    );
    let honest = Arc::new(function("id", "", "lambda xs: xs"));
    assert_eq!(answer(&pool, &honest, vec![5]), vec![5]);
}
