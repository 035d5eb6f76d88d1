//! Any `target_partitions` works with any number of workers: the even file
//! scan split (`dfship_distributed::leaf`) keeps upstream's planner from
//! failing with "Different partition count … DistributedLeafExec".

use datafusion::prelude::{SessionConfig, SessionContext};
use dfship_codec::CodecOptions;
use dfship_distributed::{ClusterContextBuilder, PythonWorkerSessionBuilder};
use dfship_integration_tests::*;

const QUERY: &str =
    "SELECT category, count(*) AS c, sum(py_double(id)) AS s FROM facts GROUP BY category";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_partition_count_on_two_and_three_workers() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path()).await.unwrap();
    let local = SessionContext::new();
    register_dataset(&local, dir.path()).await.unwrap();
    for udf in matrix_udfs() {
        local.register_udf(udf);
    }
    let expected = sorted_rows(&local, QUERY).await.unwrap();
    assert_eq!(expected.len(), 4);

    for workers in [2, 3] {
        let cluster = InProcessCluster::start(
            workers,
            PythonWorkerSessionBuilder::new(CodecOptions::default()),
        )
        .await;
        for partitions in 1..=5 {
            for bytes_per_partition in [1, 4096] {
                let mut builder = ClusterContextBuilder::new(&cluster.urls)
                    .unwrap()
                    .with_config(SessionConfig::new().with_target_partitions(partitions))
                    .with_file_scan_bytes_per_partition(bytes_per_partition);
                for udf in matrix_udfs() {
                    builder = builder.with_python_udf(udf);
                }
                let ctx = builder.build().unwrap();
                register_dataset(&ctx, dir.path()).await.unwrap();
                let actual = sorted_rows(&ctx, QUERY).await.unwrap_or_else(|e| {
                    panic!("{workers} workers, target_partitions {partitions}, {bytes_per_partition} bytes per partition: {e}")
                });
                assert_eq!(
                    actual, expected,
                    "{workers} workers, target_partitions {partitions}"
                );
            }
        }
    }
}
