//! Encode and decode of a stage plan with 0, 1 and 10 Python UDFs.
//!
//! - `encode/N`: what the coordinator does per stage.
//! - `decode/N`: what a worker does per task. Decoding is lazy (nothing is
//!   unpickled), so this is the same with a cold or a warm cache; the target
//!   is decode(10) ≤ 1.2 × decode(0).
//! - `decode_and_run/{cold,warm}/N`: decode plus running the stage on a few
//!   rows, i.e. the first call of each UDF: `cold` has an empty callable
//!   cache (every UDF unpickled, as the first task in a process), `warm` a
//!   filled one (as every later task).

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dfship_benches::*;
use dfship_codec::CallableCache;

fn bench(c: &mut Criterion) {
    init_python();
    // Counts and times of this process's own interpreter and callable cache.
    dfship_codec::configure_python_execution(
        dfship_codec::PythonExecution::default().with_mode(dfship_codec::PythonMode::InProcess),
    )
    .expect("configure Python execution");
    let rt = runtime();
    let data = dataset(&rt);
    let task_ctx = Arc::new(datafusion::execution::TaskContext::default());
    let warm = codecs(Arc::new(CallableCache::new(64 << 20)));
    let plans: Vec<_> = [0, 1, 10]
        .iter()
        .map(|&n| (n, stage_plan(&rt, &data, n)))
        .collect();

    let mut group = c.benchmark_group("encode");
    for (n, plan) in &plans {
        group.bench_with_input(BenchmarkId::from_parameter(n), plan, |b, plan| {
            b.iter(|| encode(&warm, plan))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("decode");
    for (n, plan) in &plans {
        let bytes = encode(&warm, plan);
        group.bench_with_input(BenchmarkId::from_parameter(n), &bytes, |b, bytes| {
            b.iter(|| decode(&warm, bytes, &task_ctx).unwrap())
        });
    }
    group.finish();

    let mut group = c.benchmark_group("decode_and_run");
    for (n, plan) in &plans {
        let bytes = encode(&warm, plan);
        // Fill the warm cache once.
        run(
            &rt,
            decode(&warm, &bytes, &task_ctx).unwrap(),
            Arc::clone(&task_ctx),
        );
        group.bench_with_input(BenchmarkId::new("warm", n), &bytes, |b, bytes| {
            b.iter(|| {
                run(
                    &rt,
                    decode(&warm, bytes, &task_ctx).unwrap(),
                    Arc::clone(&task_ctx),
                )
            })
        });
        group.bench_with_input(BenchmarkId::new("cold", n), &bytes, |b, bytes| {
            b.iter_batched(
                || codecs(Arc::new(CallableCache::new(64 << 20))),
                |cold| {
                    run(
                        &rt,
                        decode(&cold, bytes, &task_ctx).unwrap(),
                        Arc::clone(&task_ctx),
                    )
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
