//! Python UDFs run in each worker's pool of runner processes: faults stay
//! in the runner that hit them, a hung call is bounded by `--udf-timeout`,
//! a slow one is not, and a cancelled query frees its runners. Workers are
//! real `dfship-worker` processes over gRPC on 127.0.0.1.

use std::path::Path;
use std::time::{Duration, Instant};

use arrow::datatypes::DataType;
use datafusion::prelude::SessionContext;
use dfship_integration_tests::*;

/// A healthy query: the sum of 3 × id over `facts` (ids 1..=4800).
async fn assert_healthy(ctx: &SessionContext) {
    let rows = sorted_rows(ctx, "SELECT sum(py_triple(id)) AS s FROM facts")
        .await
        .unwrap();
    assert_eq!(rows, vec![format!("| {} |", 3 * 4800 * 4801 / 2)]);
}

/// Waits until every worker has `runners` live runner processes again.
fn wait_for_runners(cluster: &SpawnedCluster, runners: usize) -> Vec<Vec<u32>> {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let pids = cluster.runner_pids();
        if pids.iter().all(|worker| worker.len() == runners) || Instant::now() > until {
            return pids;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crashes_and_memory_exhaustion_stay_in_one_runner() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path()).await.unwrap();
    let cluster = SpawnedCluster::start(
        2,
        &["--python-runners", "2", "--runner-memory-limit", "1GiB"],
    );
    let started = wait_for_runners(&cluster, 2);
    assert!(
        started.iter().all(|worker| worker.len() == 2),
        "each worker starts its 2 runners: {started:?}"
    );
    let ctx = triple_context(&cluster.urls, Default::default(), dir.path()).await;
    assert_healthy(&ctx).await;

    let faults = [
        ("py_abort", "import os\n", "lambda a: os.abort()", "SIGABRT"),
        (
            "py_segfault",
            "import ctypes\n",
            "lambda a: ctypes.string_at(0)",
            "SIGSEGV",
        ),
        (
            "py_hog",
            "",
            "lambda a: (bytearray(3 << 30), a)[1]",
            "--runner-memory-limit",
        ),
    ];
    for (name, setup, body, expected) in faults {
        ctx.register_udf(python_udf(
            name,
            vec![DataType::Int64],
            DataType::Int64,
            setup,
            body,
        ));
        let error = query_error(&ctx, &format!("SELECT sum({name}(id)) FROM facts")).await;
        let text = error.to_string();
        assert!(text.contains(&format!("'{name}'")), "{name}: {text}");
        assert!(text.contains(expected), "{name}: {text}");
        println!("{name}: {text}");
        // The workers survived and still have their runners (replaced).
        for pid in cluster.pids() {
            assert!(
                Path::new(&format!("/proc/{pid}")).exists(),
                "worker {pid} is alive"
            );
        }
        assert_healthy(&ctx).await;
    }
    let after = wait_for_runners(&cluster, 2);
    assert!(
        after.iter().all(|worker| worker.len() == 2),
        "crashed runners were replaced: {after:?}"
    );
    assert_ne!(after, started, "the crashed runners are new processes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_udf_is_stopped_by_the_timeout_and_its_runner_replaced() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path()).await.unwrap();
    let cluster = SpawnedCluster::start(2, &["--python-runners", "2", "--udf-timeout", "2"]);
    let ctx = triple_context(&cluster.urls, Default::default(), dir.path()).await;
    ctx.register_udf(python_udf(
        "py_spin",
        vec![DataType::Int64],
        DataType::Int64,
        "def spin(a):\n    while True:\n        pass\n",
        "spin",
    ));
    let before = wait_for_runners(&cluster, 2);
    let started = Instant::now();
    let error = query_error(&ctx, "SELECT sum(py_spin(id)) FROM facts").await;
    let elapsed = started.elapsed();
    let text = error.to_string();
    assert!(elapsed < Duration::from_secs(7), "failed after {elapsed:?}");
    assert!(text.contains("'py_spin'") && text.contains("2s"), "{text}");
    assert!(text.contains("--udf-timeout"), "{text}");
    assert_eq!(
        dfship_codec::ErrorKind::of(&error),
        dfship_codec::ErrorKind::UdfRaised
    );
    let after = wait_for_runners(&cluster, 2);
    assert!(after.iter().all(|worker| worker.len() == 2), "{after:?}");
    assert_ne!(
        after, before,
        "the spinning runners were killed and replaced"
    );
    assert_healthy(&ctx).await;
    println!("py_spin failed after {elapsed:?}: {text}");
}

/// Two one-row Parquet files: a scan gives each worker one batch.
async fn write_tiny(dir: &Path) {
    let ctx = SessionContext::new();
    for part in 0..2 {
        ctx.sql(&format!(
            "COPY (SELECT CAST({part} AS BIGINT) AS v) TO '{}' STORED AS PARQUET",
            dir.join("tiny")
                .join(format!("part-{part}.parquet"))
                .display()
        ))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_udf_completes_and_a_cancelled_query_frees_its_runners() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path()).await.unwrap();
    write_tiny(dir.path()).await;
    // One runner per worker: a call left running would block the next query.
    let cluster = SpawnedCluster::start(2, &["--python-runners", "1"]);
    let ctx = triple_context(&cluster.urls, Default::default(), dir.path()).await;
    ctx.register_parquet(
        "tiny",
        dir.path().join("tiny").to_str().unwrap(),
        Default::default(),
    )
    .await
    .unwrap();
    let sleeper = |name: &str, seconds: u32| {
        python_udf(
            name,
            vec![DataType::Int64],
            DataType::Int64,
            &format!(
                "import time\ndef slow(a):\n    if len(a):\n        time.sleep({seconds})\n    return a\n"
            ),
            "slow",
        )
    };
    ctx.register_udf(sleeper("py_sleep15", 15));
    let started = Instant::now();
    // One call sleeps (the other batch is empty after the filter).
    let rows = sorted_rows(&ctx, "SELECT py_sleep15(v) AS v FROM tiny WHERE v = 1")
        .await
        .unwrap();
    assert_eq!(rows, vec!["| 1 |"]);
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_secs(15), "{elapsed:?}");
    println!("15 s per batch: completed in {elapsed:?}");

    ctx.register_udf(sleeper("py_sleep120", 120));
    let before = wait_for_runners(&cluster, 1);
    let cancelled = tokio::time::timeout(
        Duration::from_secs(3),
        ctx.sql("SELECT py_sleep120(v) FROM tiny")
            .await
            .unwrap()
            .collect(),
    )
    .await;
    assert!(cancelled.is_err(), "the query was still running after 3 s");
    // The next query gets runners at once: the cancelled calls were stopped.
    let started = Instant::now();
    let rows = sorted_rows(&ctx, "SELECT py_triple(v) AS v FROM tiny")
        .await
        .unwrap();
    assert_eq!(rows, vec!["| 0 |", "| 3 |"]);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(15),
        "the next query waited {waited:?} for runners"
    );
    let after = wait_for_runners(&cluster, 1);
    assert_ne!(after, before, "the cancelled calls' runners were replaced");
    println!("after cancelling, the next query ran in {waited:?}");
}
