//! A UDF closing over megabytes reaches each worker once, across queries:
//! plans name its pickle by digest and the coordinator hands a worker the
//! pickle only when that worker (that incarnation of it) does not hold it.

use datafusion::arrow::datatypes::DataType;
use dfship_codec::CodecOptions;
use dfship_distributed::InlineUdfs;
use dfship_integration_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_closure_goes_to_each_worker_once_across_queries_and_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path()).await.unwrap();
    let mut cluster = SpawnedCluster::start(2, &["--python-runners", "1"]);
    let inline = InlineUdfs::new(CodecOptions::default());
    let ctx = dfship_distributed::ClusterContextBuilder::new(&cluster.urls)
        .unwrap()
        .with_inline_udfs(inline.clone())
        .with_file_scan_bytes_per_partition(1)
        .build()
        .unwrap();
    register_dataset(&ctx, dir.path()).await.unwrap();
    const BLOB: usize = 2 << 20;
    ctx.register_udf(python_udf(
        "big_closure",
        vec![DataType::Int64],
        DataType::Int64,
        &format!("import pyarrow.compute as pc\nblob = bytes(range(256)) * ({BLOB} // 256)\n"),
        "lambda a, _blob=blob: pc.add(a, len(_blob))",
    ));
    let sql = "SELECT sum(big_closure(id)) AS s FROM facts";
    let expected = sorted_rows(&ctx, "SELECT sum(id) + count(*) * 2097152 AS s FROM facts")
        .await
        .unwrap();

    assert_eq!(sorted_rows(&ctx, sql).await.unwrap(), expected);
    let first = inline.payload_stats();
    assert_eq!(
        first.pushed, 2,
        "each worker was handed the pickle once: {first:?}"
    );
    assert!(first.pushed_bytes > 2 * BLOB as u64, "{first:?}");

    for _ in 0..2 {
        assert_eq!(sorted_rows(&ctx, sql).await.unwrap(), expected);
    }
    let later = inline.payload_stats();
    assert_eq!(
        later.pushed, 2,
        "later queries hand over nothing: {later:?}"
    );
    assert!(
        later.checks > first.checks && later.reused > first.reused,
        "{later:?}"
    );

    // A new process on the same address holds nothing: it gets the pickle again.
    cluster.restart(0);
    assert_eq!(sorted_rows(&ctx, sql).await.unwrap(), expected);
    let restarted = inline.payload_stats();
    assert_eq!(
        restarted.pushed, 3,
        "only the restarted worker got it again: {restarted:?}"
    );
}
