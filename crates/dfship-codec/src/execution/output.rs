//! What Python UDFs write — `print`, `sys.stderr`, `logging` records and
//! `warnings` — from the runner to the person who ran the query.
//!
//! A runner captures what each call writes (bounded per call, see
//! `dfship_runner.py`) and sends it as an OUTPUT message before the call's
//! answer; the pool hands it to the call's [`dfship_runtime::OutputSink`],
//! made here by [`sink_for`]. What happens next depends on the query's
//! [`UdfOutputMode`], which the coordinator sends with every task
//! (`dfship-distributed` puts it in a request header, the worker's session
//! builder calls [`set_query_output`]):
//!
//! - `client`: each line is logged (with its query, stage, task and UDF) and
//!   kept in this process's buffer of the query until the coordinator takes
//!   it ([`take_query_output`], polled while the query runs);
//! - `worker`: each line is logged only;
//! - `off`: lines are dropped.
//!
//! Bounds: per query, at most `max_lines` lines and `max_bytes` bytes are
//! kept (logged or buffered) over its life, the rest only counted; all
//! queries' buffers together hold at most [`MAX_BUFFERED_BYTES`]; at most
//! [`MAX_QUERIES`] queries are remembered (the least recently written go
//! first). Calls that belong to no task (a process running stages without a
//! coordinator's task id) write their lines to this process's stderr, as a
//! runner's prints went before.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

use dfship_runtime::{CallOutput, OutputSink, OutputStream};

/// Where a query's UDF output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UdfOutputMode {
    /// To the client that ran the query (and the workers' logs).
    #[default]
    Client,
    /// To the workers' logs only.
    Worker,
    /// Nowhere.
    Off,
}

impl UdfOutputMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Worker => "worker",
            Self::Off => "off",
        }
    }
}

impl std::str::FromStr for UdfOutputMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "client" => Ok(Self::Client),
            "worker" => Ok(Self::Worker),
            "off" => Ok(Self::Off),
            other => Err(format!(
                "unknown UDF output mode '{other}'; use 'client' (show it where the query \
                 was run), 'worker' (workers' logs only) or 'off'"
            )),
        }
    }
}

/// How much of a query's UDF output is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimits {
    pub max_lines: u64,
    pub max_bytes: u64,
}

/// Lines of a query kept by default (per process, and on the client).
pub const DEFAULT_OUTPUT_LINES: u64 = 10_000;
/// Bytes of a query kept by default (per process, and on the client).
pub const DEFAULT_OUTPUT_BYTES: u64 = 1 << 20;

impl Default for OutputLimits {
    fn default() -> Self {
        Self {
            max_lines: DEFAULT_OUTPUT_LINES,
            max_bytes: DEFAULT_OUTPUT_BYTES,
        }
    }
}

/// Bytes of output buffered for all queries of this process together.
pub const MAX_BUFFERED_BYTES: u64 = 64 << 20;
/// Queries whose output settings and buffers are remembered.
pub const MAX_QUERIES: usize = 1024;

/// Where a line came from in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputOrigin {
    /// A worker's task of the query.
    Task { stage: u64, task: u64 },
    /// The stages the coordinator runs itself.
    Coordinator,
}

/// One line a UDF wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    pub origin: OutputOrigin,
    pub udf: String,
    pub stream: OutputStream,
    pub text: String,
}

/// What [`take_query_output`] hands over: lines kept since the last take,
/// and what was dropped since then.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TakenOutput {
    pub lines: Vec<OutputLine>,
    pub dropped_lines: u64,
    pub dropped_bytes: u64,
}

#[derive(Debug)]
struct QueryOutput {
    mode: UdfOutputMode,
    limits: OutputLimits,
    /// Kept over the query's life (the caps apply to these).
    kept_lines: u64,
    kept_bytes: u64,
    /// Buffered, not taken yet: (from the coordinator's own stages, line).
    buffered: VecDeque<OutputLine>,
    buffered_bytes: u64,
    dropped_lines: u64,
    dropped_bytes: u64,
    warned: bool,
    touched: Instant,
}

impl QueryOutput {
    fn new(mode: UdfOutputMode, limits: OutputLimits) -> Self {
        Self {
            mode,
            limits,
            kept_lines: 0,
            kept_bytes: 0,
            buffered: VecDeque::new(),
            buffered_bytes: 0,
            dropped_lines: 0,
            dropped_bytes: 0,
            warned: false,
            touched: Instant::now(),
        }
    }
}

#[derive(Default)]
struct Registry {
    queries: HashMap<[u8; 16], QueryOutput>,
    /// Task id -> (query, where its lines come from).
    tasks: HashMap<String, ([u8; 16], OutputOrigin)>,
    buffered_bytes: u64,
}

impl Registry {
    fn entry(&mut self, query: [u8; 16]) -> &mut QueryOutput {
        if !self.queries.contains_key(&query) && self.queries.len() >= MAX_QUERIES {
            let oldest = self
                .queries
                .iter()
                .min_by_key(|(_, q)| q.touched)
                .map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                self.forget(oldest);
            }
        }
        self.queries.entry(query).or_insert_with(|| {
            // A query nobody announced: its lines go to the log, as before.
            QueryOutput::new(UdfOutputMode::Worker, OutputLimits::default())
        })
    }

    fn forget(&mut self, query: [u8; 16]) {
        if let Some(gone) = self.queries.remove(&query) {
            self.buffered_bytes = self.buffered_bytes.saturating_sub(gone.buffered_bytes);
        }
        self.tasks.retain(|_, (q, _)| *q != query);
    }
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(Default::default);

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sets where the UDF output of `query` goes in this process, and its caps.
/// The first call for a query wins (every task of it says the same).
pub fn set_query_output(query: [u8; 16], mode: UdfOutputMode, limits: OutputLimits) {
    let mut registry = registry();
    let entry = registry.entry(query);
    if entry.kept_lines == 0 && entry.buffered.is_empty() {
        entry.mode = mode;
        entry.limits = limits;
    }
    entry.touched = Instant::now();
}

/// Names the query of task `id` and where its lines come from, so the
/// output of its calls is kept under that query.
pub fn bind_task_output(id: &str, query: [u8; 16], origin: OutputOrigin) {
    let mut registry = registry();
    if registry.tasks.len() >= 16 * MAX_QUERIES && !registry.tasks.contains_key(id) {
        // Tasks are forgotten with their query; this bounds a flood of ids.
        let known: std::collections::HashSet<[u8; 16]> = registry.queries.keys().copied().collect();
        registry.tasks.retain(|_, (q, _)| known.contains(q));
        if registry.tasks.len() >= 16 * MAX_QUERIES {
            return;
        }
    }
    registry.tasks.insert(id.to_string(), (query, origin));
}

/// Takes what calls of `query` wrote since the last take: the lines of
/// workers' tasks (`coordinator` false) or of the coordinator's own stages
/// (`coordinator` true), at most `max_bytes` of text (the rest stays for the
/// next take), with what was dropped since the last take.
pub fn take_query_output(query: [u8; 16], coordinator: bool, max_bytes: usize) -> TakenOutput {
    let mut registry = registry();
    let Some(entry) = registry.queries.get_mut(&query) else {
        return TakenOutput::default();
    };
    let mut taken = TakenOutput::default();
    let mut bytes = 0usize;
    let mut kept = VecDeque::with_capacity(entry.buffered.len());
    let mut released = 0u64;
    while let Some(line) = entry.buffered.pop_front() {
        let mine = (line.origin == OutputOrigin::Coordinator) == coordinator;
        if mine && (taken.lines.is_empty() || bytes + line.text.len() <= max_bytes) {
            bytes += line.text.len();
            released += line.text.len() as u64;
            taken.lines.push(line);
        } else {
            kept.push_back(line);
        }
    }
    entry.buffered = kept;
    entry.buffered_bytes = entry.buffered_bytes.saturating_sub(released);
    // Drops are reported once, to whoever asks first.
    taken.dropped_lines = std::mem::take(&mut entry.dropped_lines);
    taken.dropped_bytes = std::mem::take(&mut entry.dropped_bytes);
    entry.touched = Instant::now();
    registry.buffered_bytes = registry.buffered_bytes.saturating_sub(released);
    taken
}

/// Forgets `query` (its buffers, settings and tasks): the coordinator does
/// it once the query is over and its output taken.
pub fn forget_query_output(query: [u8; 16]) {
    registry().forget(query);
}

/// The sink for calls of `udf` made by task `task` (see the module docs).
pub(crate) fn sink_for(task: Option<&str>, udf: &str) -> OutputSink {
    let bound = task.and_then(|id| registry().tasks.get(id).copied());
    let udf = udf.to_string();
    match bound {
        Some((query, origin)) => OutputSink::new(move |output| keep(query, origin, &udf, output)),
        None => OutputSink(Arc::new(|output: CallOutput| {
            use std::io::Write;
            let mut stderr = std::io::stderr().lock();
            for (_, text) in &output.lines {
                let _ = writeln!(stderr, "{text}");
            }
            if output.dropped_lines > 0 {
                let _ = writeln!(
                    stderr,
                    "(dropped {} more lines this UDF call wrote)",
                    output.dropped_lines
                );
            }
        })),
    }
}

/// Keeps (logs, buffers) what one call of `udf` wrote for `query`.
fn keep(query: [u8; 16], origin: OutputOrigin, udf: &str, output: CallOutput) {
    let mut registry = registry();
    let total_buffered = registry.buffered_bytes;
    let entry = registry.entry(query);
    entry.touched = Instant::now();
    let mode = entry.mode;
    if mode == UdfOutputMode::Off {
        return;
    }
    let query_id = uuid_text(&query);
    let (stage, task) = match origin {
        OutputOrigin::Task { stage, task } => (Some(stage), Some(task)),
        OutputOrigin::Coordinator => (None, None),
    };
    let mut added = 0u64;
    entry.dropped_lines += output.dropped_lines;
    entry.dropped_bytes += output.dropped_bytes;
    for (stream, text) in output.lines {
        let size = text.len() as u64;
        let over_query = entry.kept_lines >= entry.limits.max_lines
            || entry.kept_bytes + size > entry.limits.max_bytes;
        let over_process =
            mode == UdfOutputMode::Client && total_buffered + added + size > MAX_BUFFERED_BYTES;
        if over_query || over_process {
            entry.dropped_lines += 1;
            entry.dropped_bytes += size;
            continue;
        }
        entry.kept_lines += 1;
        entry.kept_bytes += size;
        tracing::info!(
            target: "dfship::udf_output",
            query_id = %query_id,
            stage,
            task,
            udf,
            stream = stream.name(),
            "{text}"
        );
        if mode == UdfOutputMode::Client {
            added += size;
            entry.buffered.push_back(OutputLine {
                origin,
                udf: udf.to_string(),
                stream,
                text,
            });
        }
    }
    if entry.dropped_lines > 0 && !entry.warned {
        entry.warned = true;
        tracing::warn!(
            target: "dfship::udf_output",
            query_id = %query_id,
            max_lines = entry.limits.max_lines,
            max_bytes = entry.limits.max_bytes,
            "the query's UDFs wrote more than its output caps: further lines are counted, not kept"
        );
    }
    entry.buffered_bytes += added;
    registry.buffered_bytes += added;
}

fn uuid_text(query: &[u8; 16]) -> String {
    let hex: String = query.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(n: usize, text: &str) -> CallOutput {
        CallOutput {
            lines: (0..n)
                .map(|i| (OutputStream::Stdout, format!("{text} {i}")))
                .collect(),
            dropped_lines: 0,
            dropped_bytes: 0,
        }
    }

    #[test]
    fn client_output_is_kept_per_query_within_its_caps_and_taken_once() {
        let query = [31; 16];
        set_query_output(
            query,
            UdfOutputMode::Client,
            OutputLimits {
                max_lines: 5,
                max_bytes: 1000,
            },
        );
        bind_task_output(
            "output-task-a",
            query,
            OutputOrigin::Task { stage: 1, task: 0 },
        );
        let sink = sink_for(Some("output-task-a"), "f");
        (sink.0)(lines(3, "a"));
        (sink.0)(CallOutput {
            dropped_lines: 10,
            dropped_bytes: 100,
            ..lines(4, "b")
        });
        let taken = take_query_output(query, false, 1 << 20);
        assert_eq!(taken.lines.len(), 5, "{taken:?}");
        assert_eq!(taken.lines[0].text, "a 0");
        assert_eq!(taken.lines[4].text, "b 1");
        assert_eq!(taken.lines[0].udf, "f");
        assert_eq!(taken.dropped_lines, 12);
        assert!(taken.dropped_bytes >= 100);
        let again = take_query_output(query, false, 1 << 20);
        assert!(again.lines.is_empty() && again.dropped_lines == 0);
        forget_query_output(query);
    }

    #[test]
    fn coordinator_lines_and_worker_lines_are_taken_apart_and_in_slices() {
        let query = [32; 16];
        set_query_output(query, UdfOutputMode::Client, OutputLimits::default());
        bind_task_output("output-task-c", query, OutputOrigin::Coordinator);
        bind_task_output(
            "output-task-w",
            query,
            OutputOrigin::Task { stage: 2, task: 1 },
        );
        (sink_for(Some("output-task-c"), "g").0)(lines(2, "here"));
        (sink_for(Some("output-task-w"), "g").0)(lines(3, "there"));
        let mine = take_query_output(query, true, 1 << 20);
        assert_eq!(mine.lines.len(), 2);
        let first = take_query_output(query, false, 8);
        assert_eq!(
            first.lines.len(),
            1,
            "a slice of at most 8 bytes (one line at least)"
        );
        let rest = take_query_output(query, false, 1 << 20);
        assert_eq!(rest.lines.len(), 2);
        forget_query_output(query);
    }

    #[test]
    fn worker_and_off_modes_buffer_nothing_and_unknown_tasks_do_not_panic() {
        for (n, mode) in [(33u8, UdfOutputMode::Worker), (34, UdfOutputMode::Off)] {
            let query = [n; 16];
            set_query_output(query, mode, OutputLimits::default());
            let id = format!("output-task-{n}");
            bind_task_output(&id, query, OutputOrigin::Task { stage: 1, task: 0 });
            (sink_for(Some(&id), "h").0)(lines(3, "x"));
            assert!(take_query_output(query, false, 1 << 20).lines.is_empty());
            forget_query_output(query);
        }
        (sink_for(Some("never-bound"), "h").0)(lines(1, "to stderr"));
        (sink_for(None, "h").0)(lines(1, "to stderr"));
    }

    #[test]
    fn modes_parse_and_name_themselves() {
        for mode in [
            UdfOutputMode::Client,
            UdfOutputMode::Worker,
            UdfOutputMode::Off,
        ] {
            assert_eq!(mode.name().parse::<UdfOutputMode>(), Ok(mode));
        }
        assert!("loud"
            .parse::<UdfOutputMode>()
            .unwrap_err()
            .contains("client"));
    }
}
