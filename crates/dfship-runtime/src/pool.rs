//! [`RunnerPool`]: the runners of one process, shared by every query it
//! executes, and the blocking API the engine's threads call it with.
//!
//! Callers [`submit`](RunnerPool::submit) calls and later
//! [`wait`](PendingCall::wait) for their replies, so one caller can have
//! several calls in flight (the slices of a batch, an aggregate's pipelined
//! updates). Everything else — which runner serves a call, starting and
//! replacing runners, timeouts, cancellation, matching replies to calls — is
//! the scheduler's (`scheduler.rs`), a single task that owns all pool state.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::launch::Launcher;
use crate::protocol::{ErrorClass, RunnerVersions};
use crate::scheduler::{self, Event, Waiting};

/// What a runner keeps of the functions it was sent, in pickle bytes,
/// before the pool tells it to forget the others first.
pub const DEFAULT_FUNCTION_BUDGET: usize = 512 * 1024 * 1024;

/// The largest reply a runner may send when it has no memory limit.
pub const DEFAULT_MAX_REPLY_BYTES: u64 = 2 << 30;

/// The bytes of replies all runners of a pool may be sending at once.
pub const DEFAULT_REPLY_BYTES_IN_FLIGHT: u64 = 1 << 30;

/// How long one call may run when nothing else is configured (a call that
/// hangs, or a runner that announces a reply it never finishes, costs a
/// runner after this).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(600);

/// How a pool runs.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Runners at most (at least one).
    pub runners: usize,
    pub launcher: Launcher,
    /// How long one call may run before its runner is killed (process
    /// runners only: a thread cannot be killed).
    pub call_timeout: Option<Duration>,
    /// The largest message a runner may send; a longer one breaks it.
    pub max_reply_bytes: u64,
    /// The bytes of replies being received from all runners at once, at
    /// most: a reply waits (its runner blocks on its socket) until the
    /// replies before it have arrived. Replies of 1 MiB or less are not
    /// counted. A reply longer than this breaks its runner.
    pub reply_bytes_in_flight: u64,
    /// See [`DEFAULT_FUNCTION_BUDGET`].
    pub function_budget: usize,
    /// How long a new runner may take to announce itself.
    pub startup_timeout: Duration,
    /// Whether runners serve one tenant (query) only.
    pub isolation: Isolation,
}

/// Which calls may share a runner process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    /// Any calls: a runner keeps what it loaded (and whatever a UDF left in
    /// it) across queries.
    #[default]
    Shared,
    /// A runner serves the calls of one tenant (a query) only; once the
    /// tenant ends, or another needs the room, the runner is stopped and a
    /// fresh process that never ran user code takes its place. Process
    /// runners only.
    Query,
}

impl std::str::FromStr for Isolation {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "shared" => Ok(Self::Shared),
            "query" => Ok(Self::Query),
            other => Err(format!(
                "'{other}' is not a runner isolation level: use shared (runners serve every \
                 query) or query (a runner serves one query, then a fresh one replaces it)"
            )),
        }
    }
}

impl PoolConfig {
    pub fn new(runners: usize, launcher: Launcher) -> Self {
        Self {
            runners: runners.max(1),
            launcher,
            call_timeout: Some(DEFAULT_CALL_TIMEOUT),
            max_reply_bytes: DEFAULT_MAX_REPLY_BYTES,
            reply_bytes_in_flight: DEFAULT_REPLY_BYTES_IN_FLIGHT,
            function_budget: DEFAULT_FUNCTION_BUDGET,
            startup_timeout: Duration::from_secs(60),
            isolation: Isolation::Shared,
        }
    }
}

/// A function the pool can send to runners: its pickle and how to run it.
#[derive(Debug, Clone)]
pub struct FunctionSpec {
    /// The UDF's name, for logs.
    pub name: String,
    /// SHA-256 of `pickle`: the key runners hold the function by.
    pub digest: [u8; 32],
    /// `CONTENT_CALLABLE` or `CONTENT_DATAFUSION_TUPLE`.
    pub content: u8,
    pub pickle: Bytes,
    /// Who pickled it: a runner of another Python minor or cloudpickle major
    /// version cannot load it.
    pub versions: RunnerVersions,
    /// At most this many runners hold the function (load it, or keep objects made by it).
    pub concurrency: Option<usize>,
    /// The environment the function runs in (the digest naming it): a runner
    /// that served one environment never serves another (the pickle enters
    /// it when loaded, putting its code on the runner's `sys.path`). `None`:
    /// the worker's own environment.
    pub environment: Option<[u8; 32]>,
    /// Calls of an async function in flight on one runner at most.
    pub max_in_flight: usize,
    /// Whether a stateless call may run again on a fresh runner when its
    /// runner dies during it (the UDF is not volatile).
    pub replayable: bool,
}

/// The default `max_in_flight` of async UDFs.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 32;

/// A call of an object that lives in a runner (an aggregate's accumulators).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectCall {
    /// From [`RunnerPool::new_object_id`].
    pub id: u64,
    /// The call that creates the object: the pool places it on a runner,
    /// and every later call of the object goes there.
    pub create: bool,
}

/// One call: a message to a runner and the function it concerns.
#[derive(Debug, Clone)]
pub struct CallSpec {
    pub function: Arc<FunctionSpec>,
    /// `CALL`, `AGGREGATE` or `WINDOW`.
    pub kind: u8,
    /// The body after the digest, in parts (sent without copying them together).
    pub body: Vec<Bytes>,
    pub object: Option<ObjectCall>,
    /// Whose call it is (a query), for [`Isolation::Query`]; calls of no
    /// tenant share runners with each other only.
    pub tenant: Option<u64>,
    /// Where what the call writes (stdout, stderr, logging, warnings) goes,
    /// as the runner reports it before the call's answer; `None` drops it.
    pub output: Option<OutputSink>,
}

/// Receives what a call wrote ([`crate::protocol::CallOutput`]), on the
/// pool's scheduler thread: keep it short and never block.
#[derive(Clone)]
pub struct OutputSink(pub Arc<dyn Fn(crate::protocol::CallOutput) + Send + Sync>);

impl OutputSink {
    pub fn new(sink: impl Fn(crate::protocol::CallOutput) + Send + Sync + 'static) -> Self {
        Self(Arc::new(sink))
    }
}

impl std::fmt::Debug for OutputSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutputSink")
    }
}

/// A runner's answer to a call: `RESULT` or `DONE`, and its body.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub kind: u8,
    pub body: Vec<u8>,
}

/// Why a call has no reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// The runner answered ERROR.
    Failed {
        class: Option<ErrorClass>,
        text: String,
    },
    /// The runner died during the call; how it ended.
    Lost { how: String },
    /// The runner was killed during the call because of another call on it
    /// (one that ran past the timeout, broke the protocol, or was cancelled).
    Stopped { reason: String },
    /// The call ran longer than the pool's call timeout; its runner was killed.
    TimedOut { after: Duration },
    /// The caller cancelled it.
    Cancelled,
    /// The object the call is for lived in a runner that is gone.
    StateLost { how: String },
    /// The runner broke the protocol (a reply to no call, a malformed or
    /// oversized message); it was killed.
    Broken { detail: String },
    /// The function was pickled by another Python or cloudpickle than the runners run.
    VersionMismatch {
        pickled: RunnerVersions,
        runner: RunnerVersions,
    },
    /// No runner could be started.
    StartFailed { detail: String },
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Failed { text, .. } => write!(f, "{text}"),
            Self::Lost { how } => write!(f, "its runner died during the call: {how}"),
            Self::Stopped { reason } => {
                write!(f, "its runner was killed during the call: {reason}")
            }
            Self::TimedOut { after } => write!(f, "it did not finish within {after:?}"),
            Self::Cancelled => write!(f, "the call was cancelled"),
            Self::StateLost { how } => write!(f, "the runner holding its state is gone: {how}"),
            Self::Broken { detail } => write!(f, "its runner broke the runner protocol: {detail}"),
            Self::VersionMismatch { pickled, runner } => write!(
                f,
                "it was pickled by Python {}.{} / cloudpickle {} but the runners run Python {}.{} \
                 / cloudpickle {}",
                pickled.python_major,
                pickled.python_minor,
                pickled.cloudpickle_major,
                runner.python_major,
                runner.python_minor,
                runner.cloudpickle_major
            ),
            Self::StartFailed { detail } => write!(f, "{detail}"),
        }
    }
}

/// Set when the task a call belongs to is over (cancelled, or finished);
/// it also says whose the task is (its tenant, for [`Isolation::Query`]).
#[derive(Debug, Clone, Default)]
pub struct CancelToken {
    cancelled: Arc<AtomicBool>,
    tenant: Option<u64>,
}

impl CancelToken {
    /// A token for a task of `tenant`.
    pub fn for_tenant(tenant: u64) -> Self {
        Self {
            cancelled: Arc::default(),
            tenant: Some(tenant),
        }
    }

    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    pub fn tenant(&self) -> Option<u64> {
        self.tenant
    }
}

/// What a [`RunnerPool`] has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Runners started (first starts and replacements).
    pub started: u64,
    /// Runners that ended while the pool needed them (crashes, timeouts,
    /// cancellations, protocol breaches), and were replaced.
    pub lost: u64,
    /// Of those, runners that died on their own (crash, memory limit).
    pub crashes: u64,
    /// Of those, runners killed because a call ran past the timeout.
    pub timeouts: u64,
    /// Of those, runners killed because they broke the protocol.
    pub broken: u64,
    /// Functions sent to runners (one per runner and digest, again after a FORGET).
    pub loads: u64,
    /// Calls sent to runners.
    pub calls: u64,
    /// Calls cancelled by their caller.
    pub cancelled: u64,
    /// Calls run again on a fresh runner after theirs crashed.
    pub replays: u64,
    /// Runners stopped because their tenant ended or another tenant needed
    /// the room ([`Isolation::Query`]); not counted as lost.
    pub retired: u64,
    /// Runners alive now.
    pub alive: usize,
    /// Runners with a call in flight now.
    pub busy: usize,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub started: AtomicU64,
    pub lost: AtomicU64,
    pub crashes: AtomicU64,
    pub timeouts: AtomicU64,
    pub broken: AtomicU64,
    pub loads: AtomicU64,
    pub calls: AtomicU64,
    pub cancelled: AtomicU64,
    pub replays: AtomicU64,
    pub retired: AtomicU64,
    pub alive: AtomicUsize,
    pub busy: AtomicUsize,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The runners of one process (see the module docs).
pub struct RunnerPool {
    config: PoolConfig,
    events: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Event>>>,
    counters: Arc<Counters>,
    next_object: AtomicU64,
}

impl fmt::Debug for RunnerPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunnerPool")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish()
    }
}

impl RunnerPool {
    /// A pool; nothing starts until the first call or [`Self::warm_up`].
    pub fn new(config: PoolConfig) -> Self {
        let mut config = config;
        config.runners = config.runners.max(1);
        Self {
            config,
            events: Mutex::new(None),
            counters: Arc::default(),
            next_object: AtomicU64::new(1),
        }
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    fn send(&self, event: Event) -> Result<(), String> {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if events.is_none() {
            *events = Some(scheduler::start(
                self.config.clone(),
                Arc::clone(&self.counters),
            )?);
        }
        match events.as_ref() {
            Some(sender) => sender
                .send(event)
                .map_err(|_| "the UDF runner pool's scheduler has stopped".to_string()),
            None => Err("the UDF runner pool did not start".to_string()),
        }
    }

    /// Starts runners until the pool is full; fails when one cannot start.
    pub fn warm_up(&self) -> Result<(), String> {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        self.send(Event::WarmUp(reply))?;
        answer
            .recv()
            .map_err(|_| "the UDF runner pool's scheduler has stopped".to_string())?
    }

    /// A fresh id for an object that will live in a runner.
    pub fn new_object_id(&self) -> u64 {
        self.next_object.fetch_add(1, Ordering::Relaxed)
    }

    /// Hands `call` to the scheduler; never blocks.
    pub fn submit(&self, call: CallSpec) -> PendingCall {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        let id = scheduler::request_id();
        let waiting = Waiting {
            id,
            spec: call,
            reply,
            since: Instant::now(),
            first_crash: None,
        };
        let failed = self.send(Event::Submit(Box::new(waiting)));
        PendingCall {
            id,
            answer: Mutex::new(answer),
            failed: failed.err(),
        }
    }

    /// Tells the runner holding `object` to drop it; never blocks.
    pub fn close_object(&self, object: u64) {
        let _ = self.send(Event::Close(object));
    }

    fn cancel(&self, request: u64) {
        let _ = self.send(Event::Cancel(request));
    }

    /// Tenant `tenant` (a query) will make no more calls: under
    /// [`Isolation::Query`] its runners are stopped once idle and fresh ones
    /// started in their place; never blocks.
    pub fn end_tenant(&self, tenant: u64) {
        if self.config.isolation == Isolation::Query {
            let _ = self.send(Event::TenantEnded(tenant));
        }
    }

    pub fn stats(&self) -> PoolStats {
        let c = &self.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        PoolStats {
            started: load(&c.started),
            lost: load(&c.lost),
            crashes: load(&c.crashes),
            timeouts: load(&c.timeouts),
            broken: load(&c.broken),
            loads: load(&c.loads),
            calls: load(&c.calls),
            cancelled: load(&c.cancelled),
            replays: load(&c.replays),
            retired: load(&c.retired),
            alive: c.alive.load(Ordering::Relaxed),
            busy: c.busy.load(Ordering::Relaxed),
        }
    }
}

impl Drop for RunnerPool {
    /// Stops every runner (a process's pool normally lives as long as it).
    fn drop(&mut self) {
        let events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sender) = events.as_ref() {
            let (done, stopped) = std::sync::mpsc::sync_channel(1);
            if sender.send(Event::Shutdown(done)).is_ok() {
                let _ = stopped.recv_timeout(Duration::from_secs(5));
            }
        }
    }
}

/// A submitted call; [`Self::wait`] for its reply.
#[derive(Debug)]
pub struct PendingCall {
    id: u64,
    /// (In a mutex only so a pending call may sit in `Sync` accumulators.)
    answer: Mutex<Receiver<Result<Reply, CallError>>>,
    failed: Option<String>,
}

impl PendingCall {
    /// Blocks until the call is answered. `cancel` is looked at first and
    /// then every 100 ms while it waits; once set, the call is cancelled.
    pub fn wait(self, pool: &RunnerPool, cancel: Option<&CancelToken>) -> Result<Reply, CallError> {
        if let Some(detail) = self.failed {
            return Err(CallError::StartFailed { detail });
        }
        let answer = self.answer.into_inner().unwrap_or_else(|p| p.into_inner());
        // Cancelled already (a batch's later slices, once its task ended):
        // out of the queue at once, not after a first wait.
        let mut cancel_sent = false;
        if cancel.is_some_and(CancelToken::is_cancelled) {
            pool.cancel(self.id);
            cancel_sent = true;
        }
        loop {
            match answer.recv_timeout(Duration::from_millis(100)) {
                Ok(answer) => return answer,
                Err(RecvTimeoutError::Timeout) => {
                    if !cancel_sent && cancel.is_some_and(CancelToken::is_cancelled) {
                        pool.cancel(self.id);
                        cancel_sent = true;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(CallError::Lost {
                        how: "the UDF runner pool's scheduler stopped".to_string(),
                    })
                }
            }
        }
    }

    /// The reply, if it has come (never blocks).
    pub fn try_take(&mut self) -> Option<Result<Reply, CallError>> {
        if let Some(detail) = self.failed.take() {
            return Some(Err(CallError::StartFailed { detail }));
        }
        self.answer
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .try_recv()
            .ok()
    }
}
