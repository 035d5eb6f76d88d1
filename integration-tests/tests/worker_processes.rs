//! The query matrix on 3 spawned `dfship-worker` processes over gRPC on
//! 127.0.0.1: Python UDFs are known only to the coordinator (this process).

use datafusion::prelude::{SessionConfig, SessionContext};
use dfship_codec::CodecOptions;
use dfship_distributed::{ClusterContextBuilder, InlineUdfs};
use dfship_integration_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_query_matrix_on_worker_processes() {
    matrix_on_workers(&[]).await;
}

/// The same matrix, with workers running Python in-process instead of in
/// runner processes: the same results (both equal single-node).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_query_matrix_on_in_process_workers() {
    matrix_on_workers(&["--python-mode", "in-process"]).await;
}

async fn matrix_on_workers(worker_args: &[&str]) {
    matrix_on_workers_with(worker_args, CodecOptions::default()).await;
}

async fn matrix_on_workers_with(worker_args: &[&str], options: CodecOptions) {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path()).await.unwrap();
    let cluster = SpawnedCluster::start(3, worker_args);
    let inline = InlineUdfs::new(options);
    let distributed = ClusterContextBuilder::new(&cluster.urls)
        .unwrap()
        .with_config(
            SessionConfig::new()
                .with_target_partitions(3)
                .set_bool("datafusion.execution.parquet.pushdown_filters", true),
        )
        .with_inline_udfs(inline.clone())
        .with_file_scan_bytes_per_partition(1)
        .build()
        .unwrap();
    let local = SessionContext::new_with_config(
        SessionConfig::new().set_bool("datafusion.execution.parquet.pushdown_filters", true),
    );
    for ctx in [&distributed, &local] {
        register_dataset(ctx, dir.path()).await.unwrap();
        for udf in matrix_udfs() {
            ctx.register_udf(udf);
        }
    }
    for (name, sql) in MATRIX {
        let expected = sorted_rows(&local, sql).await.unwrap();
        let actual = sorted_rows(&distributed, sql)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(actual, expected, "{name}");
        println!("{name}: ok ({} rows)", expected.len());
    }
    let stats = inline.encoder().stats();
    assert!(stats.inline_udfs > 0, "{stats:?}");
    println!(
        "coordinator shipped {} stage plans with {} inline UDF calls ({} payload bytes)",
        stats.plans, stats.inline_udfs, stats.inline_bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_process_survives_a_failing_udf() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path()).await.unwrap();
    let cluster = SpawnedCluster::start(2, &[]);
    let ctx = ClusterContextBuilder::new(&cluster.urls)
        .unwrap()
        .with_config(SessionConfig::new().with_target_partitions(4))
        .with_file_scan_bytes_per_partition(1)
        .build()
        .unwrap();
    register_dataset(&ctx, dir.path()).await.unwrap();
    ctx.register_udf(python_udf(
        "py_zero_div",
        vec![arrow::datatypes::DataType::Int64],
        arrow::datatypes::DataType::Int64,
        "",
        "lambda a: 1 // 0",
    ));
    let error = query_error(&ctx, "SELECT py_zero_div(id) FROM facts")
        .await
        .to_string();
    assert!(
        error.contains("ZeroDivisionError: integer division or modulo by zero"),
        "{error}"
    );
    ctx.register_udf(python_udf(
        "py_ok",
        vec![arrow::datatypes::DataType::Int64],
        arrow::datatypes::DataType::Int64,
        "",
        "lambda a: pc.add(a, 1)",
    ));
    assert_eq!(
        sorted_rows(&ctx, "SELECT max(py_ok(id)) AS m FROM facts")
            .await
            .unwrap(),
        vec!["| 4801 |"]
    );
}

/// The matrix on workers that require the cluster key for every RPC, from a
/// coordinator that has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_query_matrix_on_keyed_workers() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("cluster.key");
    std::fs::write(&key_file, "a secret shared by the cluster").unwrap();
    matrix_on_workers_with(
        &["--cluster-key-file", key_file.to_str().unwrap()],
        CodecOptions::default()
            .with_cluster_key(dfship_codec::ClusterKey::from_file(&key_file).unwrap()),
    )
    .await;
}

/// A worker refuses to listen beyond loopback unprotected, naming the way
/// out; with `--insecure` it starts and warns loudly.
#[test]
fn a_worker_refuses_to_listen_beyond_loopback_without_a_key() {
    let refused = std::process::Command::new(worker_binary())
        .args(["--host", "0.0.0.0", "--port", "0"])
        .env_remove("DFSHIP_CLUSTER_KEY")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--insecure"), "{stderr}");
    assert!(stderr.contains("--cluster-key-file"), "{stderr}");

    let mut insecure = std::process::Command::new(worker_binary())
        .args([
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--insecure",
            "--python-runners",
            "1",
        ])
        .args(["--python-env", venv().to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(insecure.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert!(
        line.starts_with("dfship-worker listening on http://0.0.0.0:"),
        "{line}"
    );
    insecure.kill().unwrap();
    let output = insecure.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("WARNING: INSECURE"), "{stderr}");
}

/// A stage plan above the message limit (coordinator and workers configured
/// alike) is refused with an error that names the limit, and smaller ones
/// still run. (datafusion-distributed reports a failed plan send only as the
/// worker's wait timing out, ten seconds later; dfship names the cause.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oversized_message_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path()).await.unwrap();
    // Stage plans of the queries below are a few kB; a UDF closing over
    // 64 kB makes one far larger than the limit.
    let cluster = SpawnedCluster::start(2, &["--max-message-bytes", "40000"]);
    let inline = InlineUdfs::with_channel_options(
        CodecOptions::default(),
        dfship_distributed::ChannelOptions {
            max_message_bytes: 40000,
            ..Default::default()
        },
    );
    let ctx = ClusterContextBuilder::new(&cluster.urls)
        .unwrap()
        .with_config(SessionConfig::new().with_target_partitions(4))
        .with_inline_udfs(inline)
        .with_file_scan_bytes_per_partition(1)
        .build()
        .unwrap();
    register_dataset(&ctx, dir.path()).await.unwrap();
    ctx.register_udf(python_udf(
        "py_triple",
        vec![arrow::datatypes::DataType::Int64],
        arrow::datatypes::DataType::Int64,
        "",
        "lambda a: pc.multiply(a, 3)",
    ));
    ctx.register_udf(python_udf(
        "py_heavy",
        vec![arrow::datatypes::DataType::Int64],
        arrow::datatypes::DataType::Int64,
        "import os\nblob = os.urandom(64 * 1024)\n",
        "lambda a, _blob=blob: a",
    ));
    let error = query_error(&ctx, "SELECT sum(py_heavy(id)) FROM facts")
        .await
        .to_string();
    assert!(
        error.contains("above the message limit of 40000 bytes")
            && error.contains("--max-message-bytes"),
        "{error}"
    );
    let rows = sorted_rows(&ctx, "SELECT sum(py_triple(id)) AS s FROM facts")
        .await
        .unwrap();
    assert_eq!(rows, vec![format!("| {} |", 3 * 4800 * 4801 / 2)]);
}
