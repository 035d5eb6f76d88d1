//! A worker's HTTP endpoint for operators: liveness, readiness and metrics.
//!
//! Served on `--http-port` (off by default), plain HTTP/1.1, no
//! authentication: it reveals counts and states, never data, plans or keys.
//!
//! - `GET /livez`: 200 while the process serves.
//! - `GET /readyz`: 200 `ready`, or 503 `draining` once the worker drains
//!   (the same state coordinators' probes see, `crate::Drain`), so a load
//!   balancer or Kubernetes stops sending it work.
//! - `GET /metrics`: Prometheus text format: drain state, open tasks, the
//!   runner pool's counters (runners started, alive, busy; calls, loads,
//!   crashes, timeouts, replays, cancelled calls), and what the worker's
//!   ports turned away (connections over a cap or without a preface,
//!   identity challenges by outcome).
//!
//! Requests are read up to 8 KiB and answered in one response; anything else
//! gets 404 (unknown path) or 400 (not HTTP).
//!
//! The port has no key, so it bounds what anyone can hold of it: at most
//! [`HEALTH_MAX_CONNECTIONS`] connections are open (more are closed at once,
//! with a best-effort 503, and counted in `/metrics`), each gets
//! [`HEALTH_IO_TIMEOUT`] to send its request and as long to take the answer,
//! and accept errors (`EMFILE`) are waited out (100 ms) rather than retried
//! in a spin. So slow clients cannot take the worker's file descriptors
//! from its gRPC port, its runners or its file scans.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::drain::Drain;

/// Connections the endpoint keeps open at most; more are closed at once.
pub const HEALTH_MAX_CONNECTIONS: usize = 64;

/// How long a connection may take to send its request, and again to take
/// the answer.
pub const HEALTH_IO_TIMEOUT: Duration = Duration::from_secs(5);

static REFUSED: AtomicU64 = AtomicU64::new(0);

/// Connections to the endpoint this process closed at once because
/// [`HEALTH_MAX_CONNECTIONS`] were open.
pub fn refused_health_connections() -> u64 {
    REFUSED.load(Ordering::Relaxed)
}

/// Serves the endpoint on `listener` until the task is dropped.
pub async fn serve_health(listener: TcpListener, drain: Drain) {
    static WARNED_ACCEPT: Mutex<Option<Instant>> = Mutex::new(None);
    static WARNED_FULL: Mutex<Option<Instant>> = Mutex::new(None);
    let permits = Arc::new(Semaphore::new(HEALTH_MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                if crate::connection_limit::warn_rarely(&WARNED_ACCEPT) {
                    tracing::warn!(
                        %error,
                        "the /livez, /readyz and /metrics port could not accept a connection; \
                         retrying in 100 ms (if it says \"Too many open files\", raise the \
                         worker's open-file limit, `ulimit -n`)"
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 51\r\n\
                connection: close\r\n\r\ntoo many open connections to this port; retry soon\n";
            let _ = stream.try_write(BUSY);
            drop(stream);
            let refused = REFUSED.fetch_add(1, Ordering::Relaxed) + 1;
            if crate::connection_limit::warn_rarely(&WARNED_FULL) {
                tracing::warn!(
                    %peer,
                    refused_total = refused,
                    "closed a connection to /livez, /readyz and /metrics at once: \
                     {HEALTH_MAX_CONNECTIONS} are open, each given {HEALTH_IO_TIMEOUT:?} per \
                     read and write; probes should close their connections (if clients are \
                     slow on purpose, keep --http-port off untrusted networks). At most one \
                     such line a second; refused_total counts them all"
                );
            }
            continue;
        };
        let drain = drain.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut stream = stream;
            let mut request = Vec::with_capacity(1024);
            let mut buffer = [0u8; 1024];
            let read = tokio::time::timeout(HEALTH_IO_TIMEOUT, async {
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let (status, content_type, body) = answer(&request, &drain);
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout(HEALTH_IO_TIMEOUT, async {
                stream.write_all(response.as_bytes()).await?;
                stream.shutdown().await
            })
            .await;
        });
    }
}

fn answer(request: &[u8], drain: &Drain) -> (&'static str, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    let line = request.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return ("400 Bad Request", TEXT, "not an HTTP request\n".into());
    };
    if method != "GET" && method != "HEAD" {
        return ("405 Method Not Allowed", TEXT, "GET only\n".into());
    }
    match path.split('?').next().unwrap_or_default() {
        "/livez" => ("200 OK", TEXT, "ok\n".into()),
        "/readyz" if drain.is_draining() => ("503 Service Unavailable", TEXT, "draining\n".into()),
        "/readyz" => ("200 OK", TEXT, "ready\n".into()),
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics(drain),
        ),
        _ => (
            "404 Not Found",
            TEXT,
            "unknown path: /livez, /readyz and /metrics are served\n".into(),
        ),
    }
}

/// The metrics, in Prometheus text format.
pub fn metrics(drain: &Drain) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    metric(
        "dfship_worker_draining",
        "gauge",
        "1 while the worker drains (SIGTERM) and takes no new work.",
        f64::from(u8::from(drain.is_draining())),
    );
    metric(
        "dfship_worker_open_tasks",
        "gauge",
        "Tasks whose query has not ended.",
        drain.open_tasks() as f64,
    );
    let stats = dfship_codec::runner_pool_stats().unwrap_or_default();
    let counters = [
        (
            "runners_started",
            "Python UDF runners started.",
            stats.started,
        ),
        (
            "runners_lost",
            "Runners that ended while needed, and were replaced.",
            stats.lost,
        ),
        (
            "runner_crashes",
            "Runners that died on their own (crash, memory limit).",
            stats.crashes,
        ),
        (
            "runner_timeouts",
            "Runners killed because a call ran past --udf-timeout.",
            stats.timeouts,
        ),
        (
            "runner_protocol_breaks",
            "Runners killed because they broke the runner protocol.",
            stats.broken,
        ),
        ("udf_loads", "Python UDFs loaded into runners.", stats.loads),
        (
            "udf_calls",
            "Python UDF calls sent to runners.",
            stats.calls,
        ),
        (
            "udf_calls_cancelled",
            "Python UDF calls cancelled with their query.",
            stats.cancelled,
        ),
        (
            "udf_calls_replayed",
            "Python UDF calls replayed on a fresh runner after a crash.",
            stats.replays,
        ),
    ];
    for (name, help, value) in counters {
        metric(
            &format!("dfship_{name}_total"),
            "counter",
            help,
            value as f64,
        );
    }
    metric(
        "dfship_worker_tasks_total",
        "counter",
        "Tasks this worker has taken (stage plans received).",
        drain.tasks_started() as f64,
    );
    metric(
        "dfship_received_bytes_total",
        "counter",
        "Bytes (Arrow, in memory) of record batches read from other workers' tasks (shuffles).",
        crate::channel::received_bytes() as f64,
    );
    let (_, kept_bytes, kept_hits) = dfship_codec::PayloadStore::global().stats();
    metric(
        "dfship_payload_store_hits_total",
        "counter",
        "UDF pickles a plan named by digest, answered from this worker's store.",
        kept_hits as f64,
    );
    metric(
        "dfship_payload_store_bytes",
        "gauge",
        "Bytes of the UDF pickles this worker keeps across queries (by digest).",
        kept_bytes as f64,
    );
    metric(
        "dfship_rpcs_refused_total",
        "counter",
        "Requests refused for a missing, wrong, stale or replayed cluster-key proof.",
        crate::rpc_auth::refused_requests() as f64,
    );
    metric(
        "dfship_connections_refused_total",
        "counter",
        "Connections closed at once because --max-connections were open.",
        crate::connection_limit::refused_connections() as f64,
    );
    metric(
        "dfship_connections_refused_per_ip_total",
        "counter",
        "Connections closed at once because their address already held the most one address may.",
        crate::connection_limit::refused_connections_per_ip() as f64,
    );
    metric(
        "dfship_connections_preface_timeouts_total",
        "counter",
        "Connections closed because they sent no HTTP/2 preface (or TLS handshake) in time.",
        crate::connection_limit::preface_timeouts() as f64,
    );
    metric(
        "dfship_health_connections_refused_total",
        "counter",
        "Connections to this HTTP endpoint closed at once because it had its most open.",
        refused_health_connections() as f64,
    );
    let hellos = crate::rpc_auth::hello_requests();
    let _ = writeln!(
        out,
        "# HELP dfship_hello_requests_total Identity challenges (/dfship.Auth/Hello) received, \
         by outcome: answered, invalid (malformed), rate_limited (over the rate of its address).\n\
         # TYPE dfship_hello_requests_total counter"
    );
    for (outcome, count) in [
        ("answered", hellos.answered),
        ("invalid", hellos.invalid),
        ("rate_limited", hellos.rate_limited),
    ] {
        let _ = writeln!(
            out,
            "dfship_hello_requests_total{{outcome=\"{outcome}\"}} {count}"
        );
    }
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    metric(
        "dfship_runners_alive",
        "gauge",
        "Python UDF runners alive now.",
        stats.alive as f64,
    );
    metric(
        "dfship_runners_busy",
        "gauge",
        "Runners with a call in flight now.",
        stats.busy as f64,
    );
    per_udf(&mut out);
    out
}

/// A per-UDF series: name, kind, help and the figure it shows.
type Series = (
    &'static str,
    &'static str,
    &'static str,
    fn(&dfship_codec::UdfFigures) -> f64,
);

/// `dfship_udf_*{udf="name"}`: each Python UDF's calls, rows, seconds and
/// failures in this worker.
fn per_udf(out: &mut String) {
    let figures = dfship_codec::udf_figures();
    let series: [Series; 4] = [
        (
            "dfship_udf_batch_calls_total",
            "counter",
            "Calls of a Python UDF (batches, or slices of batch_size).",
            |f| f.calls as f64,
        ),
        (
            "dfship_udf_rows_total",
            "counter",
            "Rows passed to a Python UDF.",
            |f| f.rows as f64,
        ),
        (
            "dfship_udf_seconds_total",
            "counter",
            "Seconds waited for a Python UDF's results (Python plus transfer).",
            |f| f.seconds,
        ),
        (
            "dfship_udf_failures_total",
            "counter",
            "Calls of a Python UDF that failed.",
            |f| f.failures as f64,
        ),
    ];
    for (name, kind, help, value) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (udf, f) in &figures {
            let _ = writeln!(out, "{name}{{udf=\"{}\"}} {}", label(udf), value(f));
        }
    }
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::label;

    #[test]
    fn udf_names_from_plans_cannot_break_the_exposition_format() {
        assert_eq!(label("plain_name"), "plain_name");
        assert_eq!(
            label("a\"b\\c\nd} 1\nfake_metric 9"),
            "a\\\"b\\\\c\\nd} 1\\nfake_metric 9"
        );
        assert!(!label("x\ny").contains('\n'));
    }
}
