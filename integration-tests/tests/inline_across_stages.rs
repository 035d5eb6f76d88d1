//! Python UDFs registered only on the coordinator run on 3 real workers
//! (gRPC on 127.0.0.1) in every position of a distributed plan, with results
//! equal to single-node DataFusion.

use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_distributed::display_plan_ascii;
use dfship_codec::{CallableCache, CodecOptions};
use dfship_distributed::{ClusterContextBuilder, InlineUdfs};
use dfship_integration_tests::*;

async fn single_node(dir: &std::path::Path) -> SessionContext {
    let ctx = SessionContext::new_with_config(
        SessionConfig::new().set_bool("datafusion.execution.parquet.pushdown_filters", true),
    );
    register_dataset(&ctx, dir).await.unwrap();
    for udf in matrix_udfs() {
        ctx.register_udf(udf);
    }
    ctx
}

fn coordinator(urls: &[String], inline: InlineUdfs) -> SessionContext {
    let config = SessionConfig::new()
        .with_target_partitions(3)
        .set_bool("datafusion.execution.parquet.pushdown_filters", true);
    let ctx = ClusterContextBuilder::new(urls)
        .unwrap()
        .with_config(config)
        .with_inline_udfs(inline)
        .with_file_scan_bytes_per_partition(1)
        .build()
        .unwrap();
    for udf in matrix_udfs() {
        ctx.register_udf(udf); // only the coordinator knows them
    }
    ctx
}

/// Runs the matrix on 3 in-process workers.
async fn run_matrix() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path()).await.unwrap();
    let cluster = InProcessCluster::start(3, worker_builder(CallableCache::global())).await;
    let inline = InlineUdfs::new(CodecOptions::default());
    let distributed = coordinator(&cluster.urls, inline.clone());
    register_dataset(&distributed, dir.path()).await.unwrap();
    let local = single_node(dir.path()).await;

    let mut report = Vec::new();
    for (name, sql) in MATRIX {
        let plan = distributed
            .sql(sql)
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        let shown = display_plan_ascii(plan.as_ref(), false);
        assert!(
            shown.contains("Stage"),
            "{name}: the plan is distributed:\n{shown}"
        );
        let before = inline.encoder().stats();

        let expected = sorted_rows(&local, sql).await.unwrap();
        let actual = sorted_rows(&distributed, sql)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!expected.is_empty(), "{name}: the query returns rows");
        assert_eq!(actual, expected, "{name}");
        let after = inline.encoder().stats();
        let (plans, udfs) = (
            after.plans - before.plans,
            after.inline_udfs - before.inline_udfs,
        );
        assert!(
            plans > 0 && udfs > 0,
            "{name}: stage plans were shipped with inline UDFs: {after:?}"
        );
        report.push(format!(
            "{name}: {plans} stage plans shipped carrying {udfs} inline UDF calls, {} rows",
            expected.len()
        ));
    }
    println!("{}", report.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_query_matrix_matches_single_node() {
    run_matrix().await;
    let stats = dfship_codec::runner_pool_stats().expect("the runner pool is the default");
    assert!(
        stats.loads > 0 && stats.calls > stats.loads,
        "runners received each callable once and reused it across tasks: {stats:?}"
    );
    assert_eq!(stats.lost, 0, "{stats:?}");
    println!("runner pool: {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_query_matrix_matches_single_node_in_process() {
    dfship_codec::configure_python_execution(
        dfship_codec::PythonExecution::default().with_mode(dfship_codec::PythonMode::InProcess),
    )
    .unwrap();
    run_matrix().await;
    let stats = dfship_codec::runner_pool_stats().expect("in-process mode has a pool of threads");
    assert!(
        stats.loads > 0 && stats.calls > stats.loads,
        "the interpreter threads loaded each callable once and reused it across tasks: {stats:?}"
    );
    assert_eq!(stats.lost, 0, "{stats:?}");
    println!("in-process runners: {stats:?}");
}
