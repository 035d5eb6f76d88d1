//! A query you can stop and watch: its timeout, and what its Python UDFs
//! write brought back to whoever ran it.
//!
//! **Stopping.** A query runs inside the future [`crate::collect_with`]
//! returns. Dropping that future (Ctrl-C in `dfship sql`, `KeyboardInterrupt`
//! in Python, `tokio::select!` against your own signal, or
//! [`QueryOptions::timeout`]) drops the query's streams; datafusion-distributed
//! then closes each task's `CoordinatorChannel` request stream, and every
//! worker's `TaskLifetimeLayer` ends the task: its Python calls still waiting
//! are cancelled, async coroutines get `CancelledError`, and a runner in the
//! middle of a synchronous call is killed (a fresh one takes its place). The
//! stages the coordinator runs itself are a task too (see `retry::run_once`),
//! ended the same way. Nothing is retried after a cancellation or a timeout.
//!
//! **Watching.** Runners capture what each call writes (`dfship_codec`'s
//! `output` module); a worker keeps the lines of a query whose mode is
//! `client` (the coordinator names the mode and caps in [`OUTPUT_HEADER`] on
//! every task) and hands them over when asked (`UdfOutput`, a method of the
//! payload service, under the cluster key like every RPC). [`OutputWatcher`]
//! asks every live worker each [`crate::PROGRESS_INTERVAL`] while the query
//! runs, and once more when it ends (also when it fails), and calls the
//! query's [`OutputCallback`] with each line, labelled with its worker and
//! UDF; past the query's caps it counts, and says once at the end how much
//! it dropped.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dfship_codec::{OutputLimits, UdfOutputMode};
use url::Url;
use uuid::Uuid;

use crate::channel::InlineUdfChannelResolver;

/// The gRPC metadata key that carries a query's output mode and caps to
/// its workers: `MODE;MAX_LINES;MAX_BYTES` (e.g. `client;10000;1048576`).
pub const OUTPUT_HEADER: &str = "dfship-udf-output";

/// What a coordinator does with each of its queries beyond running it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueryOptions {
    /// A query running longer is cancelled on every worker and fails with
    /// `[query-timeout]` (`None`: no limit).
    pub timeout: Option<Duration>,
    /// Where what its Python UDFs write goes.
    pub udf_output: UdfOutputMode,
    /// How much of it is kept, per query (on each worker, and here).
    pub udf_output_limits: OutputLimits,
}

impl QueryOptions {
    /// The [`OUTPUT_HEADER`] value of these options.
    pub(crate) fn output_header(&self) -> Option<http::HeaderValue> {
        let limits = self.udf_output_limits;
        http::HeaderValue::from_str(&format!(
            "{};{};{}",
            self.udf_output.name(),
            limits.max_lines,
            limits.max_bytes
        ))
        .ok()
    }
}

/// The mode and caps of an [`OUTPUT_HEADER`] value; anything malformed is
/// ignored (the worker then logs the lines, as for an older coordinator).
pub(crate) fn parse_output_header(
    value: &http::HeaderValue,
) -> Option<(UdfOutputMode, OutputLimits)> {
    let text = value.to_str().ok().filter(|t| t.len() <= 64)?;
    let mut parts = text.split(';');
    let mode = parts.next()?.parse().ok()?;
    let max_lines = parts.next()?.parse().ok()?;
    let max_bytes = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((
        mode,
        OutputLimits {
            max_lines,
            max_bytes,
        },
    ))
}

/// One line a Python UDF wrote, as the client receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdfOutput {
    /// `HOST:PORT` of the worker, or `coordinator` for the stages this
    /// process ran (empty for the `dropped` summary).
    pub worker: String,
    /// The stage and task (workers only).
    pub stage: Option<u64>,
    pub task: Option<u64>,
    /// The UDF's name.
    pub udf: String,
    /// `stdout`, `stderr`, `logging`, `warning`, or `dropped` for the one
    /// line that says how much was dropped past the caps.
    pub stream: String,
    pub text: String,
}

impl std::fmt::Display for UdfOutput {
    /// `(udf, worker) text`, the way it is shown on a client's stderr.
    /// Control characters (a UDF's terminal escape sequences) are shown
    /// escaped, never sent to the terminal as they are.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.stream == "dropped" {
            return write!(f, "(dfship) {}", self.text);
        }
        write!(
            f,
            "({}, {}) {}",
            printable(&self.udf),
            self.worker,
            printable(&self.text)
        )
    }
}

/// `text` with control characters but tabs escaped (`\u{1b}`).
fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() && c != '\t') {
        return std::borrow::Cow::Borrowed(text);
    }
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\t' {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// Called with each line of UDF output (from a tokio task: keep it short).
pub type OutputCallback = Arc<dyn Fn(&UdfOutput) + Send + Sync>;

/// The default [`OutputCallback`]: each line on this process's stderr,
/// prefixed with its UDF and worker.
pub fn print_output_to_stderr() -> OutputCallback {
    Arc::new(|line: &UdfOutput| eprintln!("{line}"))
}

/// What the client has delivered of one query's output.
#[derive(Default)]
struct Delivered {
    lines: u64,
    bytes: u64,
    dropped_lines: u64,
    dropped_bytes: u64,
}

struct Shared {
    query: Uuid,
    workers: Vec<Url>,
    channels: Option<InlineUdfChannelResolver>,
    callback: OutputCallback,
    limits: OutputLimits,
    delivered: Mutex<Delivered>,
}

/// Brings one query's UDF output to its callback (module docs).
pub(crate) struct OutputWatcher {
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl OutputWatcher {
    pub fn start(
        query: Uuid,
        workers: Vec<Url>,
        channels: Option<InlineUdfChannelResolver>,
        options: &QueryOptions,
        callback: OutputCallback,
    ) -> Self {
        let shared = Arc::new(Shared {
            query,
            workers,
            channels,
            callback,
            limits: options.udf_output_limits,
            delivered: Mutex::new(Delivered::default()),
        });
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let polling = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(crate::retry::PROGRESS_INTERVAL) => {}
                }
                // A round is never cut off half-way: lines a worker handed
                // over are always delivered.
                polling.round().await;
            }
        });
        Self {
            shared,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops polling after the round in flight, asks everyone once more
    /// (until they have nothing left) and says how much was dropped. (The
    /// query's own task forgets its output here when it ends: `retry::LocalTask`.)
    pub async fn finish(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        for _ in 0..64 {
            if self.shared.round().await == 0 {
                break;
            }
        }
        self.shared.summary();
    }
}

impl Drop for OutputWatcher {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Shared {
    /// One ask of this process and of every worker; the lines delivered.
    async fn round(&self) -> usize {
        let query = *self.query.as_bytes();
        let local = dfship_codec::take_query_output(query, true, usize::MAX);
        let mut count = local.lines.len();
        self.deliver_dropped(local.dropped_lines, local.dropped_bytes);
        for line in local.lines {
            self.deliver(UdfOutput {
                worker: "coordinator".to_string(),
                stage: None,
                task: None,
                udf: line.udf,
                stream: line.stream.name().to_string(),
                text: line.text,
            });
        }
        let Some(channels) = &self.channels else {
            return count;
        };
        // Every worker at once. One that does not answer (lost, draining)
        // is skipped: the query's own error handling deals with it.
        let asks = self.workers.iter().map(|url| async move {
            let channel = channels.raw_channel(url).await.ok()?;
            let reply = crate::payloads::fetch_udf_output(channel, self.query)
                .await
                .ok()?;
            Some((url, reply))
        });
        for (url, reply) in futures::future::join_all(asks).await.into_iter().flatten() {
            count += reply.lines.len();
            self.deliver_dropped(reply.dropped_lines, reply.dropped_bytes);
            let worker = worker_label(url);
            for line in reply.lines {
                self.deliver(UdfOutput {
                    worker: worker.clone(),
                    stage: Some(line.stage),
                    task: Some(line.task),
                    udf: line.udf,
                    stream: line.stream,
                    text: line.text,
                });
            }
        }
        count
    }

    fn deliver(&self, line: UdfOutput) {
        {
            let mut delivered = self.delivered.lock().unwrap_or_else(|p| p.into_inner());
            let size = line.text.len() as u64;
            if delivered.lines >= self.limits.max_lines
                || delivered.bytes + size > self.limits.max_bytes
            {
                delivered.dropped_lines += 1;
                delivered.dropped_bytes += size;
                return;
            }
            delivered.lines += 1;
            delivered.bytes += size;
        }
        (self.callback)(&line);
    }

    fn deliver_dropped(&self, lines: u64, bytes: u64) {
        let mut delivered = self.delivered.lock().unwrap_or_else(|p| p.into_inner());
        delivered.dropped_lines += lines;
        delivered.dropped_bytes += bytes;
    }

    fn summary(&self) {
        let (lines, bytes) = {
            let delivered = self.delivered.lock().unwrap_or_else(|p| p.into_inner());
            (delivered.dropped_lines, delivered.dropped_bytes)
        };
        if lines == 0 {
            return;
        }
        (self.callback)(&UdfOutput {
            worker: String::new(),
            stage: None,
            task: None,
            udf: String::new(),
            stream: "dropped".to_string(),
            text: format!(
                "dropped {lines} lines ({bytes} bytes) of UDF output past the query's caps of \
                 {} lines and {} bytes; raise udf_output_max_lines / udf_output_max_bytes to \
                 see more, or set udf_output to 'worker' to keep it in the workers' logs only",
                self.limits.max_lines, self.limits.max_bytes
            ),
        });
    }
}

/// `HOST:PORT` of a worker URL.
fn worker_label(url: &Url) -> String {
    match (url.host_str(), url.port_or_known_default()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        (Some(host), None) => host.to_string(),
        _ => url.as_str().trim_end_matches('/').to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_output_header_round_trips_and_nonsense_is_ignored() {
        let options = QueryOptions {
            udf_output: UdfOutputMode::Worker,
            udf_output_limits: OutputLimits {
                max_lines: 7,
                max_bytes: 99,
            },
            ..Default::default()
        };
        let header = options.output_header().unwrap();
        assert_eq!(header.to_str().unwrap(), "worker;7;99");
        assert_eq!(
            parse_output_header(&header),
            Some((UdfOutputMode::Worker, options.udf_output_limits))
        );
        for bad in ["loud;1;2", "client;1", "client;1;2;3", "client;-1;2", ""] {
            let value = http::HeaderValue::from_str(bad).unwrap();
            assert_eq!(parse_output_header(&value), None, "{bad}");
        }
    }

    #[test]
    fn lines_are_shown_with_their_udf_and_worker() {
        let line = UdfOutput {
            worker: "127.0.0.1:50051".to_string(),
            stage: Some(1),
            task: Some(0),
            udf: "slow".to_string(),
            stream: "stdout".to_string(),
            text: "hello".to_string(),
        };
        assert_eq!(line.to_string(), "(slow, 127.0.0.1:50051) hello");
        let hostile = UdfOutput {
            text: "\u{1b}]0;owned\u{7}red\tok\r".to_string(),
            ..line
        };
        assert_eq!(
            hostile.to_string(),
            "(slow, 127.0.0.1:50051) \\u{1b}]0;owned\\u{7}red\tok\\r"
        );
        let url = Url::parse("https://w1.example:8443/").unwrap();
        assert_eq!(worker_label(&url), "w1.example:8443");
    }
}
