//! A worker's HTTP endpoint for operators: liveness, readiness and metrics.
//!
//! Served on `--http-port` (off by default), plain HTTP/1.1, no
//! authentication: it reveals counts and states, never data, plans or keys.
//!
//! - `GET /livez`: 200 while the process serves.
//! - `GET /readyz`: 200 `ready`, or 503 `draining` once the worker drains
//!   (the same state coordinators' probes see, `crate::Drain`), so a load
//!   balancer or Kubernetes stops sending it work.
//! - `GET /metrics`: Prometheus text format: drain state, open tasks, and the
//!   runner pool's counters (runners started, alive, busy; calls, loads,
//!   crashes, timeouts, replays, cancelled calls).
//!
//! Requests are read up to 8 KiB and answered in one response; anything else
//! gets 404 (unknown path) or 400 (not HTTP).

use std::fmt::Write as _;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::drain::Drain;

/// Serves the endpoint on `listener` until the task is dropped.
pub async fn serve_health(listener: TcpListener, drain: Drain) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let drain = drain.clone();
        tokio::spawn(async move {
            let mut request = Vec::with_capacity(1024);
            let mut buffer = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(5), async {
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
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
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
