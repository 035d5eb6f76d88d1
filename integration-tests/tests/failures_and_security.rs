//! Errors reach the client intact, workers survive them, concurrent queries
//! do not deadlock, and workers enforce the cluster key and strict mode.

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::DataType;
use dfship_codec::{CallableCache, ClusterKey, CodecOptions};
use dfship_distributed::PythonWorkerSessionBuilder;
use dfship_integration_tests::*;

async fn dataset() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path()).await.unwrap();
    dir
}

fn key(byte: u8) -> ClusterKey {
    ClusterKey::new(vec![byte; 32]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_raising_udf_reports_the_python_exception_and_workers_recover() {
    let dir = dataset().await;
    let cluster = InProcessCluster::start(2, worker_builder(CallableCache::global())).await;
    let ctx = triple_context(&cluster.urls, CodecOptions::default(), dir.path()).await;
    ctx.register_udf(python_udf(
        "py_fails",
        vec![DataType::Int64],
        DataType::Int64,
        "class QuotaExceeded(Exception):\n    pass\ndef fails(a):\n    raise QuotaExceeded(f'quota exceeded after {len(a)} rows')\n",
        "fails",
    ));
    let error = query_error(&ctx, "SELECT py_fails(id) FROM facts")
        .await
        .to_string();
    assert!(
        error.contains("Python UDF 'py_fails' raised: QuotaExceeded: quota exceeded after"),
        "{error}"
    );

    let rows = sorted_rows(&ctx, "SELECT py_triple(id) AS t FROM facts WHERE id <= 3")
        .await
        .unwrap();
    assert_eq!(rows, vec!["| 3 |", "| 6 |", "| 9 |"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_concurrent_queries_on_two_workers() {
    let dir = dataset().await;
    let cluster = InProcessCluster::start(2, worker_builder(CallableCache::global())).await;
    let ctx = Arc::new(triple_context(&cluster.urls, CodecOptions::default(), dir.path()).await);
    let expected: i64 = (1..=4800i64).map(|v| v * 3).sum();
    let queries = (0..8).map(|i| {
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            let sql = format!("SELECT sum(py_triple(id)) + {i} AS s FROM facts");
            sorted_rows(&ctx, &sql).await.map(|rows| (i, rows))
        })
    });
    let all = tokio::time::timeout(Duration::from_secs(120), futures_join_all(queries))
        .await
        .expect("8 concurrent queries finish within 120 s (no deadlock)");
    for result in all {
        let (i, rows) = result.unwrap().unwrap();
        assert_eq!(rows, vec![format!("| {} |", expected + i)]);
    }
}

async fn futures_join_all<T>(
    handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<Result<T, tokio::task::JoinError>> {
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyed_workers_refuse_clients_without_the_key() {
    let dir = dataset().await;
    let workers = PythonWorkerSessionBuilder::new(CodecOptions::default().with_cluster_key(key(7)));
    let cluster = InProcessCluster::start(2, workers).await;
    let query = "SELECT py_triple(id) FROM facts WHERE id < 5";

    let unsigned = triple_context(&cluster.urls, CodecOptions::default(), dir.path()).await;
    let error = query_error(&unsigned, query).await.to_string();
    // Refused at the door: every RPC must prove the key (the pickles' own
    // tags are checked by the codec tests, bad_input.rs).
    assert!(
        error.contains("this worker requires the cluster key"),
        "{error}"
    );

    let wrong = triple_context(
        &cluster.urls,
        CodecOptions::default().with_cluster_key(key(8)),
        dir.path(),
    )
    .await;
    let error = query_error(&wrong, query).await.to_string();
    // A coordinator with another key cannot tell these workers from
    // impostors: it asks them to prove its key, and sends them nothing.
    assert!(
        error.contains("did not prove that it holds the cluster key")
            && error.contains("does not match this process's cluster key")
            && error.contains("nothing was sent to it"),
        "{error}"
    );

    // Nor does a keyed coordinator send anything to a worker without a key.
    let open =
        InProcessCluster::start(2, PythonWorkerSessionBuilder::new(CodecOptions::default())).await;
    let keyed_to_open = triple_context(
        &open.urls,
        CodecOptions::default().with_cluster_key(key(7)),
        dir.path(),
    )
    .await;
    let error = query_error(&keyed_to_open, query).await.to_string();
    assert!(
        error.contains("did not prove that it holds the cluster key")
            && error.contains("without an identity"),
        "{error}"
    );

    let signed = triple_context(
        &cluster.urls,
        CodecOptions::default().with_cluster_key(key(7)),
        dir.path(),
    )
    .await;
    assert_eq!(sorted_rows(&signed, query).await.unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strict_workers_refuse_inline_udfs() {
    let dir = dataset().await;
    let cluster = InProcessCluster::start(
        2,
        PythonWorkerSessionBuilder::new(CodecOptions::default().with_strict(true)),
    )
    .await;
    let ctx = triple_context(&cluster.urls, CodecOptions::default(), dir.path()).await;
    let error = query_error(&ctx, "SELECT py_triple(id) FROM facts")
        .await
        .to_string();
    assert!(
        error.contains("strict mode is on") && error.contains("py_triple"),
        "{error}"
    );
    // Plans without Python UDFs still run.
    assert_eq!(
        sorted_rows(&ctx, "SELECT count(*) AS c FROM facts")
            .await
            .unwrap(),
        vec!["| 4800 |"]
    );
}

/// Whether the peer closed `stream` within `within` (EOF or reset).
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_caps_connections_handshake_time_and_streams_per_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    let dir = dataset().await;
    let tls_dir = tempfile::tempdir().unwrap();
    let files =
        dfship_distributed::generate_tls_files(tls_dir.path(), &["localhost".to_string()]).unwrap();
    let channels = dfship_distributed::ChannelOptions {
        max_connections: 3,
        handshake_timeout: Duration::from_secs(1),
        tls: dfship_distributed::TlsConfig::from_files(
            Some(&files.cert),
            Some(&files.key),
            Some(&files.ca),
        )
        .unwrap(),
        ..Default::default()
    };
    let workers = PythonWorkerSessionBuilder::with_channel_options(
        CodecOptions::default().with_cluster_key(key(7)),
        channels.clone(),
    );
    let cluster = InProcessCluster::start(2, workers).await;
    let address = cluster.urls[0].trim_start_matches("http://").to_string();

    // A client that never starts its TLS handshake is closed after 1 s.
    let started = std::time::Instant::now();
    let mut silent = TcpStream::connect(&address).await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );

    // Three idle connections fill the worker; a fourth is closed at once.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(&address).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fourth = TcpStream::connect(&address).await.unwrap();
    assert!(closed_within(&mut fourth, Duration::from_millis(500)).await);
    let refused = dfship_distributed::refused_connections();
    assert!(refused >= 1, "{refused}");
    // They go (their handshake time runs out too): the worker serves a real,
    // keyed, TLS query again.
    drop(idle);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let urls: Vec<String> = cluster
        .urls
        .iter()
        .map(|url| url.replace("http://127.0.0.1", "https://localhost"))
        .collect();
    let ctx = dfship_distributed::ClusterContextBuilder::new(&urls)
        .unwrap()
        .with_config(datafusion::prelude::SessionConfig::new().with_target_partitions(4))
        .with_inline_udfs(dfship_distributed::InlineUdfs::with_channel_options(
            CodecOptions::default().with_cluster_key(key(7)),
            channels,
        ))
        .with_file_scan_bytes_per_partition(1)
        .build()
        .unwrap();
    register_dataset(&ctx, dir.path()).await.unwrap();
    let query = "SELECT count(*) AS n FROM facts WHERE id % 7 = 0";
    let local = datafusion::prelude::SessionContext::new();
    register_dataset(&local, dir.path()).await.unwrap();
    assert_eq!(
        sorted_rows(&ctx, query).await.unwrap(),
        sorted_rows(&local, query).await.unwrap()
    );

    // The stream cap is announced in the server's HTTP/2 SETTINGS
    // (a plaintext worker, to read them without TLS).
    let open =
        InProcessCluster::start(1, PythonWorkerSessionBuilder::new(CodecOptions::default())).await;
    let mut h2 = TcpStream::connect(open.urls[0].trim_start_matches("http://"))
        .await
        .unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut header = [0u8; 9];
    h2.read_exact(&mut header).await.unwrap();
    assert_eq!(header[3], 4, "the server starts with SETTINGS");
    let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let mut settings = vec![0u8; length];
    h2.read_exact(&mut settings).await.unwrap();
    let max_streams = settings.chunks(6).find_map(|entry| {
        (u16::from_be_bytes([entry[0], entry[1]]) == 3)
            .then(|| u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]))
    });
    assert_eq!(
        max_streams,
        Some(dfship_distributed::MAX_CONCURRENT_STREAMS)
    );
}

/// A TCP proxy on 127.0.0.1 whose target can be switched; switching drops
/// the connections it carries.
struct SwitchingProxy {
    url: String,
    target: Arc<std::sync::Mutex<String>>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
}

impl SwitchingProxy {
    async fn start(target: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let target = Arc::new(std::sync::Mutex::new(target.to_string()));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let generation = Arc::new(generation);
        let (to, gen) = (Arc::clone(&target), Arc::clone(&generation));
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let address = to.lock().unwrap().clone();
                let mut switched = gen.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&address).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = switched.changed() => {}
                    }
                });
            }
        });
        Self {
            url,
            target,
            generation,
        }
    }

    fn switch_to(&self, target: &str) {
        *self.target.lock().unwrap() = target.to_string();
        self.generation.send_modify(|g| *g += 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_address_that_leads_to_another_worker_is_asked_again_before_anything_signed() {
    let dir = dataset().await;
    let workers = PythonWorkerSessionBuilder::new(CodecOptions::default().with_cluster_key(key(7)));
    let cluster = InProcessCluster::start(3, workers).await;
    let host = |url: &str| url.trim_start_matches("http://").to_string();
    let proxy = SwitchingProxy::start(&host(&cluster.urls[0])).await;
    let ctx = triple_context(
        &[proxy.url.clone(), cluster.urls[1].clone()],
        CodecOptions::default().with_cluster_key(key(7)),
        dir.path(),
    )
    .await;
    let query = "SELECT py_triple(id) AS t FROM facts WHERE id % 5 = 0";
    let rows = |batches: Vec<arrow::array::RecordBatch>| -> usize {
        batches.iter().map(|b| b.num_rows()).sum()
    };
    let first = dfship_distributed::collect(ctx.sql(query).await.unwrap())
        .await
        .unwrap();
    // The address now leads to worker 2 (the proxy closed the connections
    // to worker 0). The coordinator's channel saw its connection close, so
    // it connects afresh and asks the address who it is before it sends
    // anything signed: worker 2 never sees a proof made for worker 0 (a
    // channel that reconnected by itself would send one, be refused, and
    // make the query plan again).
    let refused = dfship_distributed::refused_requests();
    let hellos = dfship_distributed::hello_requests().answered;
    proxy.switch_to(&host(&cluster.urls[2]));
    // Time for the closed connections' ends to be read (a query racing the
    // close would take the other path, the refusal and a new plan).
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let second = dfship_distributed::collect(ctx.sql(query).await.unwrap())
        .await
        .unwrap();
    assert_eq!(rows(first), rows(second));
    assert!(
        dfship_distributed::hello_requests().answered > hellos,
        "the address was asked who it is again"
    );
    assert_eq!(
        dfship_distributed::refused_requests(),
        refused,
        "no proof made for worker 0 reached worker 2"
    );
    // And from then on the address is known as worker 2: no more refusals.
    let refused = dfship_distributed::refused_requests();
    let third = dfship_distributed::collect(ctx.sql(query).await.unwrap())
        .await
        .unwrap();
    assert!(rows(third) > 0);
    assert_eq!(dfship_distributed::refused_requests(), refused);
}
