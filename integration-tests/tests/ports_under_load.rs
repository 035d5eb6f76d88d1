//! A worker's ports stay up under load from nobody: spawned `dfship-worker`
//! processes on 127.0.0.1, flooded from another loopback address
//! (127.0.0.2) with idle connections, slow health-port clients, and
//! identity challenges, while a real coordinator (this process, from
//! 127.0.0.1) runs queries on them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dfship_codec::{ClusterKey, CodecOptions};
use dfship_integration_tests::*;

/// Where the floods come from: another loopback address than the
/// coordinator's (127.0.0.1), so per-address limits tell them apart.
const FLOOD_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

const QUERY: &str = "SELECT sum(py_triple(id)) AS s FROM facts";

fn expected_rows() -> Vec<String> {
    vec![format!("| {} |", 3 * 4800 * 4801 / 2)]
}

/// A `dfship-worker` process with its gRPC and HTTP addresses; killed when dropped.
struct Worker {
    child: Child,
    url: String,
    grpc: SocketAddr,
    http: SocketAddr,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `count` workers (one runner each, `/metrics` on a free port)
/// with `args`; with `open_files`, under a soft and hard `RLIMIT_NOFILE` of
/// that many (`ulimit -n` in a shell that then execs the worker). Two at
/// least: a coordinator runs a plan for one worker itself.
fn spawn_workers(count: usize, args: &[&str], open_files: Option<u32>) -> Vec<Worker> {
    let started: Vec<_> = (0..count)
        .map(|_| {
            let mut command = match open_files {
                Some(limit) => {
                    let mut shell = Command::new("sh");
                    shell
                        .arg("-c")
                        .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                        .arg(worker_binary());
                    shell
                }
                None => Command::new(worker_binary()),
            };
            let mut child = command
                .args(["--port", "0", "--http-port", "0", "--python-runners", "1"])
                .arg("--python-env")
                .arg(venv())
                .args(args)
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn dfship-worker");
            let stdout = child.stdout.take().expect("piped stdout");
            let (sender, receiver) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let _ = sender.send(line);
                }
            });
            (child, receiver)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    started
        .into_iter()
        .map(|(child, receiver)| {
            let (mut url, mut http) = (None, None);
            while url.is_none() || http.is_none() {
                let line = receiver
                    .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                    .expect("the worker announces its addresses within 60 s");
                if let Some(rest) = line.strip_prefix("dfship-worker listening on ") {
                    url = Some(rest.to_string());
                } else if let Some(rest) = line.strip_prefix("dfship-worker http on http://") {
                    http = Some(rest.parse().expect("an HTTP address"));
                }
            }
            let url: String = url.unwrap();
            let grpc = url
                .trim_start_matches("http://")
                .parse()
                .expect("a gRPC address");
            Worker {
                child,
                url,
                grpc,
                http: http.unwrap(),
            }
        })
        .collect()
}

fn urls(workers: &[Worker]) -> Vec<String> {
    workers.iter().map(|w| w.url.clone()).collect()
}

/// Tasks `worker` has taken (so a query did reach it).
fn tasks_taken(worker: &Worker) -> f64 {
    metric(&metrics(worker), "dfship_worker_tasks_total")
}

/// A cluster key in a file of its own (for `--cluster-key-file`).
fn key_file(dir: &Path) -> (String, ClusterKey) {
    let path = dir.join("cluster.key");
    let key = dfship_distributed::write_cluster_key_file(&path).unwrap();
    (path.to_str().unwrap().to_string(), key)
}

/// `GET path` on the health port; the body, or `None` if refused.
fn http_get(address: SocketAddr, path: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: worker\r\n\r\n").as_bytes())
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// `/metrics`, retried for up to 10 s (the port may be full for a moment).
fn metrics(worker: &Worker) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(body) = http_get(worker.http, "/metrics") {
            return body;
        }
        assert!(Instant::now() < deadline, "/metrics answers within 10 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The value of the series `series` (a name, with its labels if any).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Runs the test query as a keyed client (from 127.0.0.1) while `flood`
/// goes on against `workers[0]`: checks its rows and that the flooded worker
/// ran tasks of it; the client's context (its connections stay open) and
/// how long the query took.
async fn keyed_query_during(
    workers: &[Worker],
    key: ClusterKey,
    dir: &Path,
    flood: &str,
) -> (datafusion::prelude::SessionContext, Duration) {
    let ctx = triple_context(
        &urls(workers),
        CodecOptions::default().with_cluster_key(key),
        dir,
    )
    .await;
    let started = Instant::now();
    let rows = tokio::time::timeout(Duration::from_secs(20), sorted_rows(&ctx, QUERY))
        .await
        .expect("the query ends within 20 s")
        .unwrap_or_else(|e| panic!("the query succeeds during the {flood}: {e}"));
    let took = started.elapsed();
    assert_eq!(rows, expected_rows());
    assert!(
        tasks_taken(&workers[0]) > 0.0,
        "the flooded worker ran tasks of the query"
    );
    (ctx, took)
}

/// A TCP connection to `to` from `FLOOD_IP`.
async fn connect_from_flood_ip(to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(FLOOD_IP), 0))?;
    socket.connect(to).await
}

/// Whether the peer has closed `stream` (EOF or reset), without waiting.
/// (What the worker sent, its HTTP/2 SETTINGS, is read and dropped.)
fn is_closed(mut stream: &std::net::TcpStream) -> bool {
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() != std::io::ErrorKind::WouldBlock,
        }
    }
}

/// A worker's open file descriptors (from /proc).
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |entries| entries.count())
}

/// 1,100 idle connections (more than `--max-connections`, 1024) from one
/// address: the per-address cap keeps all but 64 from the worker, a
/// coordinator on another address runs its query at once, and the 64 are
/// closed when their preface deadline passes. (Before: the idle connections
/// took every slot and the query could not connect.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_from_one_address_leave_room_for_other_clients() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path()).await.unwrap();
    let (key_path, key) = key_file(dir.path());
    let workers = spawn_workers(2, &["--cluster-key-file", &key_path], None);
    let worker = &workers[0];

    let opened = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..1100 {
        let stream = connect_from_flood_ip(worker.grpc)
            .await
            .expect("connect from 127.0.0.2");
        let stream = stream.into_std().unwrap();
        stream.set_nonblocking(true).unwrap();
        idle.push(stream);
    }
    println!("opened 1100 idle connections in {:?}", opened.elapsed());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let still_open = idle.iter().filter(|s| !is_closed(s)).count();
    println!("idle connections the worker kept: {still_open}");
    assert!(
        still_open <= dfship_distributed::MAX_CONNECTIONS_PER_IP,
        "one address holds at most {} connections, it holds {still_open}",
        dfship_distributed::MAX_CONNECTIONS_PER_IP
    );

    let (ctx, took) = keyed_query_during(&workers, key, dir.path(), "idle flood").await;
    println!("query during the idle flood: {took:?}");
    assert!(
        opened.elapsed() < dfship_distributed::PREFACE_TIMEOUT,
        "the query ran while the idle connections were still open ({:?}); the per-address \
         cap let it in, not the preface deadline",
        opened.elapsed()
    );

    // The ones kept are closed once the preface deadline passes.
    let deadline = opened + dfship_distributed::PREFACE_TIMEOUT + Duration::from_secs(3);
    let mut open = still_open;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        open = idle.iter().filter(|s| !is_closed(s)).count();
        if open == 0 {
            break;
        }
    }
    println!(
        "idle connections open {:?} after they were opened: {open}",
        opened.elapsed()
    );
    assert_eq!(open, 0, "connections that never sent a preface are closed");
    let text = metrics(worker);
    let per_ip = metric(&text, "dfship_connections_refused_per_ip_total");
    let timeouts = metric(&text, "dfship_connections_preface_timeouts_total");
    println!("refused per address: {per_ip}, preface timeouts: {timeouts}");
    assert!(per_ip >= (1100 - still_open) as f64, "{per_ip}");
    assert!(timeouts >= still_open as f64, "{timeouts}");

    // And the coordinator's own connection (it sent its preface) serves on.
    assert_eq!(sorted_rows(&ctx, QUERY).await.unwrap(), expected_rows());
}

/// With `RLIMIT_NOFILE` at 1024 (soft and hard), 1,200 slow clients of the
/// health port hold at most 64 of the worker's file descriptors; queries
/// (new connections, file scans, runner calls) succeed throughout. (Before:
/// the worker ran out of descriptors, its accept loops spun on EMFILE, and
/// queries failed with "Too many open files".)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_health_port_clients_cannot_take_the_workers_file_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path()).await.unwrap();
    let workers = spawn_workers(2, &[], Some(1024));
    let worker = &workers[0];
    let pid = worker.child.id();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        line.split_whitespace().collect::<Vec<_>>()[3..5],
        ["1024", "1024"],
        "{line}"
    );

    // Slow clients: each sends half a request and waits; when the worker
    // closes it, it connects again (after 1 s if it was closed at once).
    let stop = Arc::new(AtomicBool::new(false));
    let connects = Arc::new(AtomicUsize::new(0));
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..1200 {
        let (stop, connects, to) = (Arc::clone(&stop), Arc::clone(&connects), worker.http);
        flood.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while !stop.load(Ordering::Relaxed) {
                let Ok(Ok(mut stream)) =
                    tokio::time::timeout(Duration::from_secs(1), connect_from_flood_ip(to)).await
                else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                connects.fetch_add(1, Ordering::Relaxed);
                let at = Instant::now();
                let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\n").await;
                let mut buf = [0u8; 256];
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf))
                        .await
                    {
                        Ok(Ok(0)) | Ok(Err(_)) => break,
                        _ => continue,
                    }
                }
                let pause = if at.elapsed() < Duration::from_millis(200) {
                    1000
                } else {
                    50
                };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let ctx = triple_context(&urls(&workers), CodecOptions::default(), dir.path()).await;
    let mut most_fds = 0;
    for round in 0..4 {
        most_fds = most_fds.max(open_fds(pid));
        let started = Instant::now();
        let rows = tokio::time::timeout(Duration::from_secs(20), sorted_rows(&ctx, QUERY))
            .await
            .unwrap_or_else(|_| panic!("query {round} ends within 20 s"))
            .unwrap_or_else(|e| panic!("query {round} succeeds during the slow flood: {e}"));
        assert_eq!(rows, expected_rows());
        most_fds = most_fds.max(open_fds(pid));
        println!(
            "query {round} during the slow flood: {:?}; worker fds {}",
            started.elapsed(),
            open_fds(pid)
        );
    }
    stop.store(true, Ordering::Relaxed);
    let flood_connects = connects.load(Ordering::Relaxed);
    flood.shutdown().await;
    assert!(
        tasks_taken(worker) > 0.0,
        "the flooded worker ran tasks of the queries"
    );
    println!("slow-client connections made: {flood_connects}; most worker fds seen: {most_fds}");
    assert!(
        most_fds < 512,
        "the health port holds at most {} descriptors, the worker had {most_fds} open",
        dfship_distributed::HEALTH_MAX_CONNECTIONS
    );
    let text = metrics(worker);
    let refused = metric(&text, "dfship_health_connections_refused_total");
    println!("health connections refused at once: {refused}");
    assert!(refused >= 1000.0, "{refused}");
}

/// A flood of identity challenges from one address: the first ones
/// (a burst of 40) are answered, the rest turned away (RESOURCE_EXHAUSTED,
/// counted apart in /metrics), and a coordinator on another address
/// connects and runs its query meanwhile. (Before: every challenge was
/// answered and none counted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hello_flood_is_counted_and_slowed_and_a_real_client_still_connects() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path()).await.unwrap();
    let (key_path, key) = key_file(dir.path());
    let workers = spawn_workers(2, &["--cluster-key-file", &key_path], None);
    let worker = &workers[0];
    let auth = dfship_distributed::RpcAuthenticator::new(&key);

    let channel = tonic::transport::Endpoint::from_shared(worker.url.clone())
        .unwrap()
        .local_address(Some(IpAddr::V4(FLOOD_IP)))
        .connect()
        .await
        .expect("a channel from 127.0.0.2");
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let (stop, url) = (Arc::clone(&stop), worker.url.clone());
        tokio::spawn(async move {
            let (mut answered, mut limited) = (0u64, 0u64);
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let mut batch = tokio::task::JoinSet::new();
                for _ in 0..50 {
                    let (mut channel, auth, url) = (channel.clone(), auth.clone(), url.clone());
                    batch.spawn(async move {
                        dfship_distributed::challenge_endpoint(
                            &mut channel,
                            &auth,
                            &url,
                            Duration::from_secs(5),
                        )
                        .await
                    });
                }
                while let Some(result) = batch.join_next().await {
                    match result.unwrap() {
                        Ok(_) => answered += 1,
                        Err(e) if e.contains("turned away") => limited += 1,
                        Err(e) => panic!("an unexpected answer to a challenge: {e}"),
                    }
                }
            }
            (answered, limited, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (_ctx, took) = keyed_query_during(&workers, key, dir.path(), "Hello flood").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (answered, limited, flooded) = flood.await.unwrap();
    println!(
        "Hello flood: {answered} answered, {limited} rate-limited in {flooded:?}; the query \
         during it took {took:?}"
    );
    let allowed = dfship_distributed::HELLO_BURST
        + dfship_distributed::HELLO_RATE_PER_SECOND * flooded.as_secs_f64()
        + 5.0;
    assert!(answered as f64 <= allowed, "{answered} > {allowed}");
    assert!(
        answered >= dfship_distributed::HELLO_BURST as u64,
        "{answered}"
    );
    assert!(limited > answered, "{limited} limited, {answered} answered");

    let text = metrics(worker);
    let counted_answered = metric(&text, "dfship_hello_requests_total{outcome=\"answered\"}");
    let counted_limited = metric(
        &text,
        "dfship_hello_requests_total{outcome=\"rate_limited\"}",
    );
    println!("/metrics: {counted_answered} answered, {counted_limited} rate-limited");
    assert_eq!(counted_limited, limited as f64);
    // The flood's, and the coordinator's own.
    assert!(counted_answered > answered as f64, "{counted_answered}");
}
