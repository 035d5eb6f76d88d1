//! Query time when a UDF closes over a large object: 1, 16 and 64 MB
//! closures on stages of 2, 8 and 32 tasks over 2 workers, against the same
//! query with a tiny closure. A large pickle travels to each worker once per
//! query (later plans name it by digest) and to each runner once, so the
//! ratio should stay near 1. Prints a Markdown table (benches/run.sh copies it
//! into the results). Workers serve gRPC on 127.0.0.1 inside this process.

use std::time::Instant;

use arrow::datatypes::DataType;
use datafusion::prelude::{SessionConfig, SessionContext};
use dfship_benches::*;
use dfship_codec::CodecOptions;
use dfship_distributed::{ClusterContextBuilder, InlineUdfs};
use dfship_integration_tests::{python_udf, InProcessCluster};

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
    let cluster = rt.block_on(InProcessCluster::start(
        2,
        dfship_distributed::PythonWorkerSessionBuilder::new(CodecOptions::default()),
    ));

    println!("### Closure size vs query time (2 workers, median of {RUNS} runs)\n");
    println!("| tasks | closure | query ms | vs tiny closure | inline bytes shipped per query |");
    println!("|---:|---:|---:|---:|---:|");
    for tasks in [2usize, 8, 32] {
        let mut tiny = f64::NAN;
        for megabytes in [0usize, 1, 16, 64] {
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
            // A fresh object per run of the table: a new digest, shipped anew.
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
                rt.block_on(async { ctx.sql(query).await?.collect().await })
                    .unwrap()
            };
            run(); // warm-up: runners load the callable
            let before = inline.encoder().stats();
            let times: Vec<f64> = (0..RUNS)
                .map(|_| {
                    let started = Instant::now();
                    run();
                    started.elapsed().as_secs_f64() * 1000.0
                })
                .collect();
            let after = inline.encoder().stats();
            let per_query = (after.inline_bytes - before.inline_bytes) / RUNS as u64;
            let time = median(times);
            if megabytes == 0 {
                tiny = time;
            }
            println!(
                "| {tasks} | {} | {time:.1} | {:.2}× | {per_query} |",
                if megabytes == 0 {
                    "tiny".to_string()
                } else {
                    format!("{megabytes} MB")
                },
                time / tiny
            );
        }
    }
}
