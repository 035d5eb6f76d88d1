//! Query time when a UDF closes over a large object: tiny and 16 MB
//! closures on stages of 2 and 8 tasks over 2 worker processes (release
//! binaries, 2 runners each), for the first query after the UDF is declared
//! (the pickle reaches each worker, and each runner, once) and for the
//! queries after it (plans name the pickle by digest; the workers hold it,
//! the runners keep the callable). Prints a Markdown table (benches/run.sh
//! copies it into the results). Workers are `$DFSHIP_WORKER_BIN`.

use std::time::Instant;

use arrow::datatypes::DataType;
use datafusion::prelude::{SessionConfig, SessionContext};
use dfship_benches::*;
use dfship_codec::CodecOptions;
use dfship_distributed::{ClusterContextBuilder, InlineUdfs};
use dfship_integration_tests::{python_udf, SpawnedCluster};

const FILES: usize = 32;
const RUNS: usize = 5;

async fn write_files(dir: &std::path::Path) {
    let ctx = SessionContext::new();
    for part in 0..FILES {
        ctx.sql(&format!(
            "COPY (SELECT CAST(v AS BIGINT) AS id FROM generate_series({}, {}) AS t(v)) TO '{}' \
             STORED AS PARQUET",
            part * 2000,
            part * 2000 + 1999,
            dir.join("t")
                .join(format!("part-{part:02}.parquet"))
                .display()
        ))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    }
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    init_python();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(write_files(dir.path()));
    let cluster = SpawnedCluster::start(2, &["--python-runners", "2"]);

    println!(
        "### Closure size vs query time (2 worker processes, median of {RUNS} later queries)\n"
    );
    println!(
        "| tasks | closure | first query ms | vs tiny | later queries ms | vs tiny | bytes handed to workers: first / later |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for tasks in [2usize, 8] {
        let (mut tiny_first, mut tiny_later) = (f64::NAN, f64::NAN);
        for megabytes in [0usize, 16] {
            let inline = InlineUdfs::new(CodecOptions::default());
            let ctx = ClusterContextBuilder::new(&cluster.urls)
                .unwrap()
                .with_config(SessionConfig::new().with_target_partitions(2))
                .with_file_scan_bytes_per_partition(1)
                .with_max_tasks_per_stage(tasks)
                .with_inline_udfs(inline.clone())
                .build()
                .unwrap();
            rt.block_on(ctx.register_parquet(
                "t",
                dir.path().join("t").to_str().unwrap(),
                Default::default(),
            ))
            .unwrap();
            // A fresh object for each row of the table: a new digest, new to every worker.
            let size = megabytes << 20;
            ctx.register_udf(python_udf(
                "closing",
                vec![DataType::Int64],
                DataType::Int64,
                &format!("import os\nblob = os.urandom({size})\n"),
                "lambda a, _blob=blob: pc.add(a, len(_blob) % 7)",
            ));
            let query = "SELECT sum(closing(id)) FROM t";
            let run = || {
                let started = Instant::now();
                rt.block_on(async { ctx.sql(query).await?.collect().await })
                    .unwrap();
                started.elapsed().as_secs_f64() * 1000.0
            };
            let first = run();
            let pushed_first = inline.payload_stats().pushed_bytes;
            let later = median((0..RUNS).map(|_| run()).collect());
            let pushed_later = (inline.payload_stats().pushed_bytes - pushed_first) / RUNS as u64;
            if megabytes == 0 {
                (tiny_first, tiny_later) = (first, later);
            }
            println!(
                "| {tasks} | {} | {first:.1} | {:.2}× | {later:.1} | {:.2}× | {pushed_first} / {pushed_later} |",
                if megabytes == 0 {
                    "tiny".to_string()
                } else {
                    format!("{megabytes} MB")
                },
                first / tiny_first,
                later / tiny_later
            );
        }
    }
}
