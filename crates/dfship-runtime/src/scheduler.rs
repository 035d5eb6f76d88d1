//! The pool's scheduler: one task, on a thread of its own, that owns every
//! runner and every call in flight. Callers talk to it through [`Event`]s;
//! each runner has a reader and a writer task that do the same.
//!
//! Rules, in the order they are applied to each waiting call (oldest first):
//!
//! - **A call of an object goes to the runner that holds it**, at once,
//!   behind whatever that runner is doing: the runner serves its socket in
//!   order, so an aggregate's updates are pipelined and its state never
//!   moves. If that runner is gone, the call fails (`StateLost`): state is
//!   never rebuilt behind the caller's back.
//! - **A synchronous call takes an idle runner**, preferring one that holds
//!   its function, and never queues behind another call (so it never shares
//!   the fate of another query's call). A call that has waited
//!   [`STARVATION`] while every runner stayed busy (objects' pipelined calls
//!   can keep a runner fed) *reserves* the least loaded one: no new call is
//!   sent there, the object calls bound to it wait in line, and it takes the
//!   runner as soon as it drains.
//! - **An async call shares a runner** with other async calls, up to the
//!   function's `max_in_flight` on that runner, never behind a synchronous one.
//! - **A function with `concurrency = N`** is held by N runners at most
//!   (loaded, or keeping objects it made); its calls wait for those.
//! - **A runner serves one environment** (`FunctionSpec::environment`):
//!   bound to the environment of the first call it serves, it never loads a
//!   function of another (the pickle puts its environment's code on the
//!   runner's `sys.path`, and modules once imported stay). When calls of
//!   an environment wait and the pool is full, idle runners of other
//!   environments retire to make room; a runner of a shipped environment
//!   idle for [`ENVIRONMENT_IDLE`] retires too. Under `Isolation::Query`
//!   the binding is to (environment, query).
//! - Runners start on demand up to the pool's size; one that dies, times
//!   out, breaks the protocol or is killed for a cancelled call is replaced.
//! - **What may run twice**: a stateless call of a UDF that is not volatile
//!   whose runner *crashed* during it (a segfault, an abort, the memory
//!   limit) runs once more, first in line, on a fresh runner; a second crash
//!   fails it with both causes. Nothing else is replayed: not a volatile
//!   UDF's call, not a call that timed out, was cancelled or broke the
//!   protocol, and never a call of an object (its state died with its runner).
//!
//! Every reply must name a call in flight on the runner that sent it (ids
//! are random, 64 bits); anything else — an unknown id, an unexpected kind,
//! a message above the size limit — kills the runner, and its calls fail
//! with the reason. A runner's reply is never handed to another call.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::process::ExitStatus;
use std::sync::atomic::Ordering;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::launch::{describe_exit, launch, RunnerHandle};
use crate::pool::{CallError, CallSpec, Counters, Isolation, PoolConfig, Reply};
use crate::protocol::{self, ErrorClass, RunnerVersions, PROTOCOL_VERSION};

/// How long a synchronous call waits for an idle runner before it queues
/// behind a busy one.
pub(crate) const STARVATION: Duration = Duration::from_millis(200);

/// How long a runner bound to a shipped environment stays idle before it
/// retires (its slot goes back to the pool; the environment's files stay
/// cached on disk).
pub(crate) const ENVIRONMENT_IDLE: Duration = Duration::from_secs(120);

/// Late replies of cancelled async calls remembered per runner.
const IGNORED_KEPT: usize = 10_000;

/// Ended tenants remembered (a runner bound to one retires once idle).
const ENDED_TENANTS_KEPT: usize = 1_024;

/// A fresh, unguessable request id (never 0, which READY uses).
pub(crate) fn request_id() -> u64 {
    let mut bytes = [0u8; 8];
    loop {
        if getrandom::fill(&mut bytes).is_err() {
            // No entropy source: still unique, just guessable.
            static FALLBACK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
            return FALLBACK.fetch_add(1, Ordering::Relaxed) | (1 << 63);
        }
        let id = u64::from_le_bytes(bytes);
        if id != 0 {
            return id;
        }
    }
}

/// A submitted call not answered yet.
pub(crate) struct Waiting {
    pub id: u64,
    pub spec: CallSpec,
    pub reply: SyncSender<Result<Reply, CallError>>,
    pub since: Instant,
    /// How its first runner ended, when it is being replayed.
    pub first_crash: Option<String>,
}

impl Waiting {
    fn answer(self, answer: Result<Reply, CallError>) {
        let _ = self.reply.send(answer);
    }
}

pub(crate) enum Event {
    /// The pool is dropped: stop every runner, then the scheduler (and say so).
    Shutdown(SyncSender<()>),
    Submit(Box<Waiting>),
    Cancel(u64),
    Close(u64),
    /// A tenant's calls are over (`RunnerPool::end_tenant`).
    TenantEnded(u64),
    WarmUp(SyncSender<Result<(), String>>),
    Started(Result<Box<NewRunner>, String>),
    Message {
        runner: u64,
        kind: u8,
        request: u64,
        body: Vec<u8>,
    },
    /// The runner sent something unacceptable; its reader stopped.
    Unreadable {
        runner: u64,
        detail: String,
    },
    /// The runner's socket closed (it died, or was killed).
    Eof {
        runner: u64,
    },
    /// A runner that ended has been reaped.
    Reaped {
        runner: u64,
        status: Option<ExitStatus>,
    },
}

/// A runner that has announced itself.
pub(crate) struct NewRunner {
    handle: RunnerHandle,
    versions: RunnerVersions,
    pid: u32,
    reader: tokio::net::unix::OwnedReadHalf,
    writer: tokio::net::unix::OwnedWriteHalf,
}

/// Starts the scheduler's thread; returns where to send it events.
pub(crate) fn start(
    config: PoolConfig,
    counters: Arc<Counters>,
) -> Result<UnboundedSender<Event>, String> {
    let (events, inbox) = unbounded_channel();
    let own = events.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the UDF runner pool: {e}"))?;
    std::thread::Builder::new()
        .name("dfship-runner-pool".to_string())
        .spawn(move || {
            let scheduler = Scheduler::new(config, counters, own);
            runtime.block_on(scheduler.run(inbox));
        })
        .map_err(|e| format!("cannot start the UDF runner pool's thread: {e}"))?;
    Ok(events)
}

/// Why the scheduler is ending a runner.
#[derive(Debug, Clone)]
enum Ending {
    TimedOut {
        request: u64,
        after: Duration,
        name: String,
    },
    Broken(String),
    Cancelled,
    /// Its tenant ended, or another tenant needed the room (`Isolation::Query`).
    Retired,
}

enum InFlight {
    Load([u8; 32]),
    Call {
        /// `None` once answered (a cancelled synchronous call still runs).
        waiting: Option<Box<Waiting>>,
        digest: [u8; 32],
        asynchronous: bool,
        sent: Instant,
        name: String,
    },
}

struct Runner {
    id: u64,
    pid: u32,
    versions: RunnerVersions,
    handle: Option<RunnerHandle>,
    out: UnboundedSender<Vec<Bytes>>,
    /// Functions sent (true once LOADED).
    loaded: HashMap<[u8; 32], (bool, usize)>,
    loaded_bytes: usize,
    in_flight: HashMap<u64, InFlight>,
    /// Synchronous calls in the order the runner serves them.
    sync_order: VecDeque<u64>,
    head_since: Instant,
    async_calls: HashMap<[u8; 32], usize>,
    /// Objects living here, by the function that made them.
    objects: HashMap<u64, [u8; 32]>,
    ignored: HashSet<u64>,
    ending: Option<Ending>,
    /// A starving call this runner is kept for (module docs).
    reserved_for: Option<u64>,
    /// The calls it serves since it served one: their environment, and
    /// under `Isolation::Query` their tenant.
    bound: Option<Binding>,
    /// When its last call ended (or it started).
    last_used: Instant,
    /// Told when the runner is killed (its reader may wait for reply budget).
    killed: Arc<tokio::sync::Notify>,
}

/// Which calls a runner serves once it served one (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Binding {
    environment: Option<[u8; 32]>,
    /// `None` under `Isolation::Shared`, and for calls of no tenant.
    tenant: Option<u64>,
}

impl Binding {
    fn of(isolation: Isolation, spec: &CallSpec) -> Self {
        Self {
            environment: spec.function.environment,
            tenant: match isolation {
                Isolation::Shared => None,
                Isolation::Query => spec.tenant,
            },
        }
    }
}

impl Runner {
    /// Whether a call `request` may be sent here now, reservation-wise.
    fn open_to(&self, request: u64) -> bool {
        self.reserved_for.is_none_or(|reserved| reserved == request)
    }

    fn idle(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// Whether `Isolation::Query` may stop it now: alive, idle, holding no
    /// object, kept for no starving call.
    fn retirable(&self) -> bool {
        self.ending.is_none()
            && self.idle()
            && self.objects.is_empty()
            && self.reserved_for.is_none()
    }

    /// When it retires for want of calls: bound to a shipped environment and
    /// retirable, [`ENVIRONMENT_IDLE`] after its last call.
    fn environment_idle_at(&self) -> Option<Instant> {
        let shipped = matches!(
            self.bound,
            Some(Binding {
                environment: Some(_),
                ..
            })
        );
        (shipped && self.retirable()).then(|| self.last_used + ENVIRONMENT_IDLE)
    }

    fn async_in_flight(&self) -> usize {
        self.async_calls.values().sum()
    }

    fn holds(&self, digest: &[u8; 32]) -> bool {
        self.loaded.contains_key(digest) || self.objects.values().any(|d| d == digest)
    }

    fn send(&self, kind: u8, request: u64, parts: Vec<Bytes>) {
        let length: usize = parts.iter().map(Bytes::len).sum();
        let mut message = Vec::with_capacity(parts.len() + 1);
        message.push(Bytes::copy_from_slice(&protocol::header(
            kind,
            request,
            length as u64,
        )));
        message.extend(parts);
        // A closed writer means the runner is gone: its reader reports it.
        let _ = self.out.send(message);
    }

    /// Call `request` no longer holds its place: an async slot of its
    /// function, or its turn among the synchronous calls.
    fn release_slot(&mut self, request: u64, digest: &[u8; 32], asynchronous: bool) {
        if asynchronous {
            if let Some(count) = self.async_calls.get_mut(digest) {
                *count = count.saturating_sub(1);
            }
        } else if let Some(at) = self.sync_order.iter().position(|r| *r == request) {
            self.sync_order.remove(at);
            if at == 0 {
                self.head_since = Instant::now();
            }
        }
    }

    fn kill(&mut self, why: Ending) {
        if self.ending.is_none() {
            self.ending = Some(why);
        }
        if let Some(handle) = self.handle.as_mut() {
            handle.kill();
        }
        // A reader waiting for reply budget stops waiting: the socket is dead.
        self.killed.notify_one();
    }
}

enum Object {
    Placed(u64),
    Lost(String),
}

enum Placement {
    On(u64),
    Wait,
    Fail(CallError),
}

struct Scheduler {
    config: PoolConfig,
    counters: Arc<Counters>,
    events: UnboundedSender<Event>,
    runners: HashMap<u64, Runner>,
    /// Runners whose socket closed, waiting to be reaped (their calls fail then).
    ended: HashMap<u64, Runner>,
    next_runner: u64,
    starting: usize,
    waiting: VecDeque<Box<Waiting>>,
    objects: HashMap<u64, Object>,
    /// What LOADED said of each function: whether its calls are coroutines.
    asynchronous: HashMap<[u8; 32], bool>,
    warm_ups: Vec<SyncSender<Result<(), String>>>,
    last_start_error: Option<String>,
    /// After a failed start while other runners serve, no start until then.
    starts_blocked_until: Option<Instant>,
    /// Tenants that ended (their runners retire once idle), oldest first.
    ended_tenants: VecDeque<u64>,
    /// Shared by every runner's reader.
    reply_budget: ReplyBudget,
}

impl Scheduler {
    fn new(config: PoolConfig, counters: Arc<Counters>, events: UnboundedSender<Event>) -> Self {
        Self {
            reply_budget: ReplyBudget::new(config.reply_bytes_in_flight),
            config,
            counters,
            events,
            runners: HashMap::new(),
            ended: HashMap::new(),
            next_runner: 1,
            starting: 0,
            waiting: VecDeque::new(),
            objects: HashMap::new(),
            asynchronous: HashMap::new(),
            warm_ups: Vec::new(),
            last_start_error: None,
            starts_blocked_until: None,
            ended_tenants: VecDeque::new(),
        }
    }

    async fn run(mut self, mut inbox: UnboundedReceiver<Event>) {
        loop {
            let wake = self.next_wake();
            tokio::select! {
                event = inbox.recv() => match event {
                    Some(Event::Shutdown(done)) => {
                        self.stop_all();
                        let _ = done.send(());
                        return;
                    }
                    None => break,
                    Some(event) => self.handle(event),
                },
                _ = tokio::time::sleep_until(wake.into()) => self.expire(Instant::now()),
            }
            self.schedule();
            self.publish();
        }
        self.stop_all();
    }

    /// Kills every runner and fails every call still waiting.
    fn stop_all(&mut self) {
        for runner in self.runners.values_mut() {
            if let Some(handle) = runner.handle.as_mut() {
                handle.kill();
                let _ = handle.reap(Duration::from_millis(200));
            }
        }
        for waiting in std::mem::take(&mut self.waiting) {
            waiting.answer(Err(CallError::Lost {
                how: "the runner pool was shut down".to_string(),
            }));
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Shutdown(done) => {
                self.stop_all();
                let _ = done.send(());
            }
            Event::Submit(waiting) => self.waiting.push_back(waiting),
            Event::Cancel(request) => self.cancel(request),
            Event::Close(object) => self.close(object),
            Event::TenantEnded(tenant) => {
                if !self.ended_tenants.contains(&tenant) {
                    if self.ended_tenants.len() >= ENDED_TENANTS_KEPT {
                        self.ended_tenants.pop_front();
                    }
                    self.ended_tenants.push_back(tenant);
                }
            }
            Event::WarmUp(reply) => {
                self.warm_ups.push(reply);
                let missing = self
                    .config
                    .runners
                    .saturating_sub(self.runners.len() + self.starting);
                for _ in 0..missing {
                    self.start_runner();
                }
                self.answer_warm_ups();
            }
            Event::Started(started) => self.started(started),
            Event::Message {
                runner,
                kind,
                request,
                body,
            } => self.message(runner, kind, request, body),
            Event::Unreadable { runner, detail } => {
                if let Some(runner) = self.runners.get_mut(&runner) {
                    runner.kill(Ending::Broken(detail));
                }
            }
            Event::Eof { runner } => self.eof(runner),
            Event::Reaped { runner, status } => self.reaped(runner, status),
        }
    }

    // Runners.

    fn start_runner(&mut self) {
        self.starting += 1;
        let launcher = self.config.launcher.clone();
        let events = self.events.clone();
        let startup = self.config.startup_timeout;
        tokio::spawn(async move {
            let described = launcher.describe();
            let launched = tokio::task::spawn_blocking(move || launch(&launcher)).await;
            let started = match launched {
                Ok(Ok(launched)) => {
                    announce(launched.socket, launched.handle, startup, &described).await
                }
                Ok(Err(detail)) => Err(detail),
                Err(e) => Err(format!("starting a UDF runner failed: {e}")),
            };
            let _ = events.send(Event::Started(started.map(Box::new)));
        });
    }

    fn started(&mut self, started: Result<Box<NewRunner>, String>) {
        self.starting = self.starting.saturating_sub(1);
        match started {
            Ok(new) => {
                let NewRunner {
                    handle,
                    versions,
                    pid,
                    reader,
                    writer,
                } = *new;
                let id = self.next_runner;
                self.next_runner += 1;
                let (out, outbox) = unbounded_channel();
                tokio::spawn(write_loop(writer, outbox));
                let killed = Arc::new(tokio::sync::Notify::new());
                tokio::spawn(read_loop(
                    id,
                    reader,
                    self.config.max_reply_bytes,
                    self.reply_budget.clone(),
                    Arc::clone(&killed),
                    self.events.clone(),
                ));
                Counters::bump(&self.counters.started);
                self.last_start_error = None;
                self.runners.insert(
                    id,
                    Runner {
                        id,
                        pid,
                        versions,
                        handle: Some(handle),
                        out,
                        loaded: HashMap::new(),
                        loaded_bytes: 0,
                        in_flight: HashMap::new(),
                        sync_order: VecDeque::new(),
                        head_since: Instant::now(),
                        async_calls: HashMap::new(),
                        objects: HashMap::new(),
                        ignored: HashSet::new(),
                        ending: None,
                        reserved_for: None,
                        bound: None,
                        last_used: Instant::now(),
                        killed,
                    },
                );
                tracing::debug!(runner = id, pid, "UDF runner started");
            }
            Err(detail) => {
                tracing::warn!(%detail, "a UDF runner did not start");
                self.last_start_error = Some(detail.clone());
                if self.live_runners() > 0 {
                    self.starts_blocked_until = Some(Instant::now() + Duration::from_secs(1));
                } else if self.starting == 0 {
                    // Nothing can serve the calls waiting for a runner.
                    let waiting = std::mem::take(&mut self.waiting);
                    for call in waiting {
                        call.answer(Err(CallError::StartFailed {
                            detail: detail.clone(),
                        }));
                    }
                }
            }
        }
        self.answer_warm_ups();
    }

    fn answer_warm_ups(&mut self) {
        if self.warm_ups.is_empty() {
            return;
        }
        let outcome = if self.live_runners() >= self.config.runners {
            Ok(())
        } else if self.starting == 0 {
            Err(self
                .last_start_error
                .clone()
                .unwrap_or_else(|| "UDF runners did not start".to_string()))
        } else {
            return;
        };
        for reply in self.warm_ups.drain(..) {
            let _ = reply.send(outcome.clone());
        }
    }

    fn live_runners(&self) -> usize {
        self.runners.values().filter(|r| r.ending.is_none()).count()
    }

    /// The socket of `id` closed: nothing more is sent to it; its calls
    /// fail once it is reaped (so errors can say how it ended).
    fn eof(&mut self, id: u64) {
        let Some(mut runner) = self.runners.remove(&id) else {
            return;
        };
        let handle = runner.handle.take();
        self.ended.insert(id, runner);
        let events = self.events.clone();
        tokio::task::spawn_blocking(move || {
            let status = handle.and_then(|mut handle| handle.reap(Duration::from_secs(2)));
            let _ = events.send(Event::Reaped { runner: id, status });
        });
    }

    fn reaped(&mut self, id: u64, status: Option<ExitStatus>) {
        let Some(runner) = self.ended.remove(&id) else {
            return;
        };
        let how = describe_exit(status);
        let ending = runner.ending.clone();
        if matches!(ending, Some(Ending::Retired)) {
            Counters::bump(&self.counters.retired);
        } else {
            Counters::bump(&self.counters.lost);
        }
        match &ending {
            None => Counters::bump(&self.counters.crashes),
            Some(Ending::TimedOut { .. }) => Counters::bump(&self.counters.timeouts),
            Some(Ending::Broken(_)) => Counters::bump(&self.counters.broken),
            Some(Ending::Cancelled | Ending::Retired) => {}
        }
        let lost_state = match &ending {
            None => format!("runner {} (pid {}) died: {how}", runner.id, runner.pid),
            Some(Ending::TimedOut { after, name, .. }) => format!(
                "runner {} was killed because a call of Python UDF '{name}' on it ran past \
                 {after:?} (the call timeout)",
                runner.id
            ),
            Some(Ending::Broken(detail)) => format!(
                "runner {} was killed because it broke the runner protocol ({detail})",
                runner.id
            ),
            Some(Ending::Cancelled) => {
                format!("runner {} was stopped to cancel a call on it", runner.id)
            }
            Some(Ending::Retired) => format!(
                "runner {} was retired (its query ended: runners serve one query)",
                runner.id
            ),
        };
        for object in runner.objects.keys() {
            self.objects
                .insert(*object, Object::Lost(lost_state.clone()));
        }
        let mut replayed = Vec::new();
        for (request, in_flight) in runner.in_flight {
            let InFlight::Call {
                waiting: Some(mut waiting),
                ..
            } = in_flight
            else {
                continue;
            };
            // A stateless call of a non-volatile UDF whose runner crashed
            // (not one killed on purpose) runs once more on a fresh runner.
            let replayable = ending.is_none()
                && waiting.spec.object.is_none()
                && waiting.spec.function.replayable
                && waiting.first_crash.is_none();
            if replayable {
                waiting.first_crash = Some(how.clone());
                Counters::bump(&self.counters.replays);
                replayed.push(waiting);
                continue;
            }
            let error = match &ending {
                None => match &waiting.first_crash {
                    Some(first) => CallError::Lost {
                        how: format!(
                            "{how}; it was replayed once on a fresh runner after its first \
                             runner crashed too ({first})"
                        ),
                    },
                    None if waiting.spec.object.is_none() && !waiting.spec.function.replayable => {
                        CallError::Lost {
                            how: format!(
                                "{how}; it was not replayed: the UDF is volatile, so running it \
                                 twice is not the same as running it once"
                            ),
                        }
                    }
                    None => CallError::Lost { how: how.clone() },
                },
                Some(Ending::TimedOut {
                    request: late,
                    after,
                    ..
                }) if *late == request => CallError::TimedOut { after: *after },
                Some(Ending::Broken(detail)) => CallError::Broken {
                    detail: detail.clone(),
                },
                Some(_) => CallError::Stopped {
                    reason: lost_state.clone(),
                },
            };
            waiting.answer(Err(error));
        }
        // Replays go first, in their original order.
        for waiting in replayed.into_iter().rev() {
            self.waiting.push_front(waiting);
        }
        tracing::debug!(runner = id, %how, "UDF runner ended");
        // Keep the pool warm: a replacement starts in the background.
        if self.runners.len() + self.starting < self.config.runners {
            self.start_runner();
        }
    }

    // Messages from runners.

    fn message(&mut self, id: u64, kind: u8, request: u64, body: Vec<u8>) {
        let Some(runner) = self.runners.get_mut(&id) else {
            return;
        };
        if runner.ending.is_some() {
            // Condemned (broken, timed out, stopped): nothing it still sends
            // answers a call; its calls fail once it is reaped.
            return;
        }
        if kind == protocol::OUTPUT {
            // What a call wrote, before its answer: the call stays in flight.
            match runner.in_flight.get(&request) {
                Some(InFlight::Call { waiting, name, .. }) => match protocol::parse_output(&body) {
                    Ok(output) => {
                        if let Some(sink) = waiting.as_ref().and_then(|w| w.spec.output.as_ref()) {
                            (sink.0)(output);
                        }
                    }
                    Err(detail) => {
                        let detail = format!("a malformed OUTPUT of Python UDF '{name}': {detail}");
                        runner.kill(Ending::Broken(detail));
                    }
                },
                // A cancelled async call's output: nobody waits for it.
                None if runner.ignored.contains(&request) => {}
                _ => runner.kill(Ending::Broken(
                    "an OUTPUT message for no call in flight".to_string(),
                )),
            }
            return;
        }
        let Some(in_flight) = runner.in_flight.remove(&request) else {
            if runner.ignored.remove(&request) {
                return;
            }
            let detail = if request == 0 {
                format!("an unsolicited message (kind {kind})")
            } else {
                format!("a reply (kind {kind}) to no call in flight")
            };
            runner.kill(Ending::Broken(detail));
            return;
        };
        runner.last_used = Instant::now();
        match in_flight {
            InFlight::Load(digest) => match kind {
                protocol::LOADED if body.len() == 1 => {
                    if let Some(entry) = runner.loaded.get_mut(&digest) {
                        entry.0 = true;
                    }
                    self.asynchronous
                        .insert(digest, body[0] & protocol::FLAG_ASYNC != 0);
                }
                // The call sent after the LOAD answers with the same error.
                protocol::ERROR => {
                    if let Some((_, bytes)) = runner.loaded.remove(&digest) {
                        runner.loaded_bytes = runner.loaded_bytes.saturating_sub(bytes);
                    }
                }
                other => runner.kill(Ending::Broken(format!(
                    "message kind {other} ({} bytes) in answer to LOAD",
                    body.len()
                ))),
            },
            InFlight::Call {
                waiting,
                digest,
                asynchronous,
                name,
                ..
            } => {
                runner.release_slot(request, &digest, asynchronous);
                let answer = match kind {
                    protocol::RESULT | protocol::DONE => Ok(Reply { kind, body }),
                    protocol::ERROR => {
                        let class = body.first().and_then(|c| ErrorClass::from_code(*c));
                        let text =
                            String::from_utf8_lossy(body.get(1..).unwrap_or_default()).into_owned();
                        Err(CallError::Failed { class, text })
                    }
                    other => {
                        let detail = format!(
                            "message kind {other} in answer to a call of Python UDF '{name}'"
                        );
                        runner.kill(Ending::Broken(detail.clone()));
                        Err(CallError::Broken { detail })
                    }
                };
                if let Some(waiting) = waiting {
                    waiting.answer(answer);
                }
            }
        }
    }

    // Callers.

    fn cancel(&mut self, request: u64) {
        tracing::debug!(request, "call cancelled");
        if let Some(at) = self.waiting.iter().position(|w| w.id == request) {
            if let Some(waiting) = self.waiting.remove(at) {
                Counters::bump(&self.counters.cancelled);
                waiting.answer(Err(CallError::Cancelled));
            }
            self.release_reservation(request);
            return;
        }
        let can_kill = self.config.launcher.can_kill();
        let Some(runner) = self
            .runners
            .values_mut()
            .find(|r| r.in_flight.contains_key(&request))
        else {
            return;
        };
        let (waiting, asynchronous, digest) = match runner.in_flight.get_mut(&request) {
            Some(InFlight::Call {
                waiting,
                digest,
                asynchronous,
                ..
            }) => (waiting.take(), *asynchronous, *digest),
            _ => return,
        };
        let Some(waiting) = waiting else {
            return;
        };
        Counters::bump(&self.counters.cancelled);
        waiting.answer(Err(CallError::Cancelled));
        // A call sent with its function's LOAD was placed before LOADED said
        // whether the function is async; by now the runner has said so.
        let coroutine = asynchronous || self.asynchronous.get(&digest).copied().unwrap_or(false);
        if coroutine {
            runner.in_flight.remove(&request);
            runner.release_slot(request, &digest, asynchronous);
            if runner.ignored.len() >= IGNORED_KEPT {
                runner.ignored.clear();
            }
            runner.ignored.insert(request);
            runner.send(protocol::CANCEL, request, Vec::new());
        } else if can_kill && runner.objects.is_empty() && runner.in_flight.len() == 1 {
            // Nothing else lives here: stopping the runner stops the call now.
            runner.kill(Ending::Cancelled);
        }
        // Otherwise the call runs to its end (killing would lose other
        // queries' state); its reply is dropped.
    }

    fn close(&mut self, object: u64) {
        tracing::debug!(object, "object closed");
        // Calls of the object not sent yet have nobody waiting for them.
        let dropped: Vec<u64> = self
            .waiting
            .iter()
            .filter(|w| w.spec.object.map(|o| o.id) == Some(object))
            .map(|w| w.id)
            .collect();
        self.waiting
            .retain(|w| w.spec.object.map(|o| o.id) != Some(object));
        for request in dropped {
            self.release_reservation(request);
        }
        if let Some(Object::Placed(id)) = self.objects.remove(&object) {
            if let Some(runner) = self.runners.get_mut(&id) {
                runner.objects.remove(&object);
                runner.send(
                    protocol::CLOSE,
                    0,
                    vec![Bytes::copy_from_slice(&object.to_le_bytes())],
                );
            }
        }
    }

    // Time.

    fn next_wake(&self) -> Instant {
        let mut wake = Instant::now() + Duration::from_secs(3600);
        if let (Some(timeout), true) = (self.config.call_timeout, self.config.launcher.can_kill()) {
            for runner in self.runners.values().filter(|r| r.ending.is_none()) {
                if !runner.sync_order.is_empty() {
                    wake = wake.min(runner.head_since + timeout);
                }
                for in_flight in runner.in_flight.values() {
                    if let InFlight::Call {
                        asynchronous: true,
                        sent,
                        ..
                    } = in_flight
                    {
                        wake = wake.min(*sent + timeout);
                    }
                }
            }
        }
        let now = Instant::now();
        for waiting in &self.waiting {
            let starved = waiting.since + STARVATION;
            if starved > now {
                wake = wake.min(starved);
            }
        }
        if let Some(blocked) = self.starts_blocked_until.filter(|until| *until > now) {
            wake = wake.min(blocked);
        }
        // Runners of shipped environments retire when unused (`retire_runners`).
        for at in self
            .runners
            .values()
            .filter_map(Runner::environment_idle_at)
        {
            wake = wake.min(at.max(now));
        }
        wake
    }

    fn expire(&mut self, now: Instant) {
        let Some(timeout) = self.config.call_timeout else {
            return;
        };
        if !self.config.launcher.can_kill() {
            return;
        }
        for runner in self.runners.values_mut().filter(|r| r.ending.is_none()) {
            let late_sync = runner
                .sync_order
                .front()
                .filter(|_| now >= runner.head_since + timeout)
                .copied();
            let late_async =
                runner
                    .in_flight
                    .iter()
                    .find_map(|(request, in_flight)| match in_flight {
                        InFlight::Call {
                            asynchronous: true,
                            sent,
                            ..
                        } if now >= *sent + timeout => Some(*request),
                        _ => None,
                    });
            if let Some(request) = late_sync.or(late_async) {
                let name = match runner.in_flight.get(&request) {
                    Some(InFlight::Call { name, .. }) => name.clone(),
                    _ => "?".to_string(),
                };
                runner.kill(Ending::TimedOut {
                    request,
                    after: timeout,
                    name,
                });
            }
        }
    }

    // Scheduling.

    fn schedule(&mut self) {
        let mut at = 0;
        let mut need_runner: usize = 0;
        while at < self.waiting.len() {
            match self.place(&self.waiting[at]) {
                Placement::On(runner) => {
                    if let Some(waiting) = self.waiting.remove(at) {
                        self.dispatch(runner, waiting);
                    }
                }
                Placement::Fail(error) => {
                    if let Some(waiting) = self.waiting.remove(at) {
                        self.release_reservation(waiting.id);
                        waiting.answer(Err(error));
                    }
                }
                Placement::Wait => {
                    if self.would_use_new_runner(&self.waiting[at]) {
                        need_runner += 1;
                    }
                    at += 1;
                }
            }
        }
        self.reserve_for_starving();
        self.retire_runners(need_runner);
        let room = self
            .config
            .runners
            .saturating_sub(self.runners.len() + self.starting);
        let wanted = need_runner.saturating_sub(self.starting);
        if self
            .starts_blocked_until
            .is_some_and(|until| until > Instant::now())
        {
            return;
        }
        for _ in 0..wanted.min(room) {
            self.start_runner();
        }
    }

    /// Whether `runner` may serve `spec`.
    fn serves(&self, runner: &Runner, spec: &CallSpec) -> bool {
        serves(runner, Binding::of(self.config.isolation, spec))
    }

    /// Stops idle runners whose tenant ended (`Isolation::Query`) or whose
    /// shipped environment went unused for [`ENVIRONMENT_IDLE`], and, while
    /// calls wait for a runner that cannot start (the pool is full), idle
    /// runners bound to other environments or tenants (their replacements
    /// start when they are reaped). A runner holding objects is never retired.
    fn retire_runners(&mut self, need_runner: usize) {
        let ended = &self.ended_tenants;
        let now = Instant::now();
        for runner in self.runners.values_mut() {
            let tenant_ended = matches!(
                runner.bound,
                Some(Binding { tenant: Some(tenant), .. }) if ended.contains(&tenant)
            );
            let environment_unused = runner.environment_idle_at().is_some_and(|at| at <= now);
            if runner.retirable() && (tenant_ended || environment_unused) {
                runner.kill(Ending::Retired);
            }
        }
        // Runners already starting will serve that many of the waiting calls.
        let wanted = need_runner.saturating_sub(self.starting);
        let room = self.runners.len() + self.starting < self.config.runners;
        if wanted == 0 || room {
            return;
        }
        let isolation = self.config.isolation;
        let waiting_for: HashSet<Binding> = self
            .waiting
            .iter()
            .filter(|w| self.would_use_new_runner(w))
            .map(|w| Binding::of(isolation, &w.spec))
            .collect();
        let bound_elsewhere = |runner: &&mut Runner| {
            runner.retirable()
                && runner
                    .bound
                    .is_some_and(|binding| !waiting_for.contains(&binding))
        };
        for runner in self
            .runners
            .values_mut()
            .filter(bound_elsewhere)
            .take(wanted)
        {
            runner.kill(Ending::Retired);
        }
    }

    fn would_use_new_runner(&self, waiting: &Waiting) -> bool {
        let object = waiting.spec.object;
        if object.is_some_and(|o| !o.create) {
            return false;
        }
        match waiting.spec.function.concurrency {
            Some(cap) => self.holders(&waiting.spec.function.digest) < cap,
            None => true,
        }
    }

    fn holders(&self, digest: &[u8; 32]) -> usize {
        self.runners
            .values()
            .filter(|r| r.ending.is_none() && r.holds(digest))
            .count()
    }

    fn place(&self, waiting: &Waiting) -> Placement {
        let spec = &waiting.spec;
        let function = &spec.function;
        let digest = &function.digest;
        if let Some(runner) = self.runners.values().find(|r| r.ending.is_none()) {
            if runner.versions != function.versions {
                return Placement::Fail(CallError::VersionMismatch {
                    pickled: function.versions,
                    runner: runner.versions,
                });
            }
        }
        if let Some(object) = spec.object.filter(|o| !o.create) {
            return match self.objects.get(&object.id) {
                Some(Object::Placed(id)) => match self.runners.get(id) {
                    Some(runner) if runner.ending.is_none() && !runner.open_to(waiting.id) => {
                        Placement::Wait
                    }
                    Some(runner) if runner.ending.is_none() => Placement::On(*id),
                    _ => Placement::Fail(CallError::StateLost {
                        how: format!("runner {id} ended"),
                    }),
                },
                Some(Object::Lost(how)) => {
                    Placement::Fail(CallError::StateLost { how: how.clone() })
                }
                // Its creating call has not been placed yet.
                None if self.waiting.iter().any(|w| {
                    w.spec.object
                        == Some(crate::pool::ObjectCall {
                            id: object.id,
                            create: true,
                        })
                }) =>
                {
                    Placement::Wait
                }
                None => Placement::Fail(CallError::StateLost {
                    how: format!("object {} was never created or is closed", object.id),
                }),
            };
        }
        let capped = function
            .concurrency
            .is_some_and(|cap| self.holders(digest) >= cap);
        let eligible = |runner: &&Runner| {
            runner.ending.is_none()
                && (!capped || runner.holds(digest))
                && runner.open_to(waiting.id)
                && self.serves(runner, spec)
        };
        let asynchronous = spec.kind == protocol::CALL
            && spec.object.is_none()
            && self.asynchronous.get(digest) == Some(&true);
        if asynchronous {
            let best = self
                .runners
                .values()
                .filter(eligible)
                .filter(|r| {
                    r.sync_order.is_empty()
                        && r.async_calls.get(digest).copied().unwrap_or(0) < function.max_in_flight
                })
                .min_by_key(|r| (!r.holds(digest), r.async_in_flight(), r.id));
            return best.map_or(Placement::Wait, |r| Placement::On(r.id));
        }
        let idle = self
            .runners
            .values()
            .filter(eligible)
            .filter(|r| r.idle())
            .min_by_key(|r| (!r.holds(digest), r.objects.len(), r.id));
        if let Some(runner) = idle {
            return Placement::On(runner.id);
        }
        Placement::Wait
    }

    /// Reserves a runner for each synchronous call that has waited
    /// [`STARVATION`] with every runner busy and no runner to start.
    fn reserve_for_starving(&mut self) {
        let room_to_start = self.runners.len() + self.starting < self.config.runners;
        let isolation = self.config.isolation;
        let starving: Vec<(u64, [u8; 32], bool, Binding)> = self
            .waiting
            .iter()
            .filter(|w| w.since.elapsed() >= STARVATION)
            .filter(|w| w.spec.object.is_none_or(|o| o.create))
            .filter(|w| {
                !(w.spec.kind == protocol::CALL
                    && self.asynchronous.get(&w.spec.function.digest) == Some(&true))
            })
            .map(|w| {
                let capped = w
                    .spec
                    .function
                    .concurrency
                    .is_some_and(|cap| self.holders(&w.spec.function.digest) >= cap);
                (
                    w.id,
                    w.spec.function.digest,
                    capped,
                    Binding::of(isolation, &w.spec),
                )
            })
            .collect();
        for (request, digest, capped, binding) in starving {
            if (room_to_start && !capped)
                || self
                    .runners
                    .values()
                    .any(|r| r.reserved_for == Some(request))
            {
                continue;
            }
            let least = self
                .runners
                .values_mut()
                .filter(|r| r.ending.is_none() && r.reserved_for.is_none())
                .filter(|r| !capped || r.holds(&digest))
                .filter(|r| serves(r, binding))
                .min_by_key(|r| (r.in_flight.len(), r.id));
            if let Some(runner) = least {
                runner.reserved_for = Some(request);
            }
        }
    }

    /// Forgets the reservation held for `request` (dispatched, cancelled, dropped).
    fn release_reservation(&mut self, request: u64) {
        for runner in self.runners.values_mut() {
            if runner.reserved_for == Some(request) {
                runner.reserved_for = None;
            }
        }
    }

    fn dispatch(&mut self, id: u64, waiting: Box<Waiting>) {
        self.release_reservation(waiting.id);
        let asynchronous_functions = &self.asynchronous;
        let Some(runner) = self.runners.get_mut(&id) else {
            waiting.answer(Err(CallError::Lost {
                how: format!("runner {id} ended"),
            }));
            return;
        };
        runner.bound = Some(Binding::of(self.config.isolation, &waiting.spec));
        runner.last_used = Instant::now();
        let function = Arc::clone(&waiting.spec.function);
        let digest = function.digest;
        if !runner.loaded.contains_key(&digest) {
            let size = function.pickle.len();
            if runner.loaded_bytes + size > self.config.function_budget {
                forget_unpinned(runner, &digest);
            }
            let load = request_id();
            runner.send(
                protocol::LOAD,
                load,
                vec![
                    Bytes::copy_from_slice(&digest),
                    Bytes::copy_from_slice(&[function.content]),
                    function.pickle.clone(),
                ],
            );
            runner.in_flight.insert(load, InFlight::Load(digest));
            runner.loaded.insert(digest, (false, size));
            runner.loaded_bytes += size;
            Counters::bump(&self.counters.loads);
        }
        let spec = &waiting.spec;
        let asynchronous = spec.kind == protocol::CALL
            && spec.object.is_none()
            && asynchronous_functions.get(&digest) == Some(&true);
        let mut parts = Vec::with_capacity(spec.body.len() + 1);
        parts.push(Bytes::copy_from_slice(&digest));
        parts.extend(spec.body.iter().cloned());
        runner.send(spec.kind, waiting.id, parts);
        if let Some(object) = spec.object.filter(|o| o.create) {
            self.objects.insert(object.id, Object::Placed(id));
            runner.objects.insert(object.id, digest);
        }
        if asynchronous {
            *runner.async_calls.entry(digest).or_default() += 1;
        } else {
            if runner.sync_order.is_empty() {
                runner.head_since = Instant::now();
            }
            runner.sync_order.push_back(waiting.id);
        }
        Counters::bump(&self.counters.calls);
        tracing::debug!(
            runner = id,
            udf = %function.name,
            object = ?spec.object,
            asynchronous,
            queued = runner.sync_order.len(),
            "call sent"
        );
        runner.in_flight.insert(
            waiting.id,
            InFlight::Call {
                digest,
                asynchronous,
                sent: Instant::now(),
                name: function.name.clone(),
                waiting: Some(waiting),
            },
        );
    }

    fn publish(&self) {
        let live = self.runners.values().filter(|r| r.ending.is_none());
        let (alive, busy) = live.fold((0, 0), |(alive, busy), r| {
            (alive + 1, busy + usize::from(!r.idle()))
        });
        self.counters.alive.store(alive, Ordering::Relaxed);
        self.counters.busy.store(busy, Ordering::Relaxed);
    }
}

/// Tells `runner` to forget every function it holds that nothing in flight
/// or alive there needs, to make room for `keep`.
fn forget_unpinned(runner: &mut Runner, keep: &[u8; 32]) {
    let pinned: HashSet<[u8; 32]> = runner
        .in_flight
        .values()
        .map(|f| match f {
            InFlight::Load(digest) => *digest,
            InFlight::Call { digest, .. } => *digest,
        })
        .chain(runner.objects.values().copied())
        .chain(std::iter::once(*keep))
        .collect();
    let forgotten: Vec<[u8; 32]> = runner
        .loaded
        .keys()
        .filter(|d| !pinned.contains(*d))
        .copied()
        .collect();
    for digest in forgotten {
        if let Some((_, bytes)) = runner.loaded.remove(&digest) {
            runner.loaded_bytes = runner.loaded_bytes.saturating_sub(bytes);
        }
        runner.send(protocol::FORGET, 0, vec![Bytes::copy_from_slice(&digest)]);
    }
}

/// Whether `runner` may serve a call bound to `binding`: a fresh runner, or
/// one bound to the same environment (and, under `Query`, tenant).
fn serves(runner: &Runner, binding: Binding) -> bool {
    runner.bound.is_none_or(|bound| bound == binding)
}

/// Waits for a new runner's READY and checks it.
async fn announce(
    socket: StdUnixStream,
    mut handle: RunnerHandle,
    startup: Duration,
    python: &str,
) -> Result<NewRunner, String> {
    if let Err(e) = socket.set_nonblocking(true) {
        return Err(refuse(
            &mut handle,
            format!("cannot set up a UDF runner's socket: {e}"),
        ));
    }
    let socket = match tokio::net::UnixStream::from_std(socket) {
        Ok(socket) => socket,
        Err(e) => {
            return Err(refuse(
                &mut handle,
                format!("cannot set up a UDF runner's socket: {e}"),
            ))
        }
    };
    let (mut reader, writer) = socket.into_split();
    let first = tokio::time::timeout(
        startup,
        read_message(
            &mut reader,
            1 << 20,
            &ReplyBudget::new(1 << 20),
            &tokio::sync::Notify::new(),
        ),
    )
    .await;
    let (kind, _, body) = match first {
        Err(_) => {
            return Err(refuse(
                &mut handle,
                format!("a UDF runner ({python}) did not announce itself within {startup:?}"),
            ))
        }
        Ok(Err(ReadFailure::Closed)) => {
            let status = handle.reap(Duration::from_secs(2));
            return Err(format!(
                "a UDF runner ({python}) did not start: {}",
                describe_exit(status)
            ));
        }
        Ok(Err(ReadFailure::Invalid(detail))) => {
            return Err(refuse(
                &mut handle,
                format!("a UDF runner ({python}) sent {detail} instead of READY"),
            ))
        }
        Ok(Ok(message)) => message,
    };
    match kind {
        protocol::READY => {
            let (protocol_version, versions, pid) = match protocol::parse_ready(&body) {
                Ok(ready) => ready,
                Err(detail) => return Err(refuse(&mut handle, detail)),
            };
            if protocol_version != PROTOCOL_VERSION {
                return Err(refuse(
                    &mut handle,
                    format!(
                        "the UDF runner started with {python} speaks runner protocol version \
                         {protocol_version}, but this process speaks version {PROTOCOL_VERSION}; \
                         the runner comes from another dfship build: point \
                         --python-executable at a plain Python interpreter (dfship sends it the \
                         runner's code) and make sure nothing on its path replaces that code"
                    ),
                ));
            }
            Ok(NewRunner {
                pid: handle.pid().unwrap_or(pid),
                handle,
                versions,
                reader,
                writer,
            })
        }
        protocol::ERROR => {
            let text = String::from_utf8_lossy(body.get(1..).unwrap_or_default()).into_owned();
            Err(refuse(
                &mut handle,
                format!(
                    "a UDF runner cannot start in the Python environment of {python}: {text}; \
                     install pyarrow and cloudpickle there, or point --python-executable (or \
                     --python-env) at an interpreter that has them"
                ),
            ))
        }
        other => Err(refuse(
            &mut handle,
            format!(
                "a UDF runner sent message kind {other} instead of READY; is {python} a \
                 compatible Python interpreter?"
            ),
        )),
    }
}

/// Stops a runner that will not be used; returns `detail`.
fn refuse(handle: &mut RunnerHandle, detail: String) -> String {
    handle.kill();
    let _ = handle.reap(Duration::from_millis(100));
    detail
}

enum ReadFailure {
    Closed,
    Invalid(String),
}

/// Replies this small are read without counting against the pool's reply
/// budget: they never wait behind a large one.
const UNCOUNTED_REPLY_BYTES: u64 = 1 << 20;

/// The budget's unit (the semaphore counts `u32` permits).
const BUDGET_UNIT: u64 = 1024;

/// The bytes of replies being received from all runners at once, at most
/// (`PoolConfig::reply_bytes_in_flight`). A reply's whole length is taken
/// before its body is read (first come, first served: two large replies
/// never hold half each), and given back once it has arrived.
#[derive(Clone)]
pub(crate) struct ReplyBudget {
    permits: Arc<tokio::sync::Semaphore>,
    bytes: u64,
}

impl ReplyBudget {
    pub(crate) fn new(bytes: u64) -> Self {
        let units = (bytes / BUDGET_UNIT).clamp(1, u64::from(u32::MAX) / 2);
        Self {
            permits: Arc::new(tokio::sync::Semaphore::new(units as usize)),
            bytes: units * BUDGET_UNIT,
        }
    }
}

async fn read_message(
    reader: &mut tokio::net::unix::OwnedReadHalf,
    max_body: u64,
    budget: &ReplyBudget,
    killed: &tokio::sync::Notify,
) -> Result<(u8, u64, Vec<u8>), ReadFailure> {
    let mut header = [0u8; protocol::HEADER_LEN];
    reader
        .read_exact(&mut header)
        .await
        .map_err(|_| ReadFailure::Closed)?;
    let (kind, request, length) = protocol::parse_header(&header);
    if length > max_body {
        return Err(ReadFailure::Invalid(format!(
            "a message of {length} bytes, above the limit of {max_body} (a runner may not \
             send more than its memory limit, or 2 GiB)"
        )));
    }
    if length > budget.bytes {
        return Err(ReadFailure::Invalid(format!(
            "a message of {length} bytes, more than the {} bytes this process lets all its \
             runners' replies hold at once (raise --runner-replies-in-flight, or return \
             smaller batches)",
            budget.bytes
        )));
    }
    let _permit = if length > UNCOUNTED_REPLY_BYTES {
        let units = length.div_ceil(BUDGET_UNIT) as u32;
        tokio::select! {
            permit = Arc::clone(&budget.permits).acquire_many_owned(units) => {
                Some(permit.map_err(|_| ReadFailure::Closed)?)
            }
            // Killed while waiting (timed out): nothing more to read.
            _ = killed.notified() => return Err(ReadFailure::Closed),
        }
    } else {
        None
    };
    // The buffer grows with what has arrived (never past the declared
    // length): a header alone allocates nothing.
    let mut body: Vec<u8> = Vec::new();
    while (body.len() as u64) < length {
        let remaining = length - body.len() as u64;
        if body.capacity() == body.len() {
            let grow = remaining.min((body.len() as u64).max(64 * 1024));
            body.reserve_exact(grow as usize);
        }
        let spare = (body.capacity() - body.len()) as u64;
        let read = (&mut *reader)
            .take(remaining.min(spare))
            .read_buf(&mut body)
            .await
            .map_err(|_| ReadFailure::Closed)?;
        if read == 0 {
            return Err(ReadFailure::Closed);
        }
    }
    Ok((kind, request, body))
}

async fn read_loop(
    runner: u64,
    mut reader: tokio::net::unix::OwnedReadHalf,
    max_body: u64,
    budget: ReplyBudget,
    killed: Arc<tokio::sync::Notify>,
    events: UnboundedSender<Event>,
) {
    loop {
        match read_message(&mut reader, max_body, &budget, &killed).await {
            Ok((kind, request, body)) => {
                if events
                    .send(Event::Message {
                        runner,
                        kind,
                        request,
                        body,
                    })
                    .is_err()
                {
                    return;
                }
            }
            Err(ReadFailure::Invalid(detail)) => {
                let _ = events.send(Event::Unreadable { runner, detail });
                // Keep draining until the killed runner's socket closes.
                let mut sink = [0u8; 8192];
                while matches!(reader.read(&mut sink).await, Ok(n) if n > 0) {}
                let _ = events.send(Event::Eof { runner });
                return;
            }
            Err(ReadFailure::Closed) => {
                let _ = events.send(Event::Eof { runner });
                return;
            }
        }
    }
}

async fn write_loop(
    mut writer: tokio::net::unix::OwnedWriteHalf,
    mut outbox: UnboundedReceiver<Vec<Bytes>>,
) {
    while let Some(parts) = outbox.recv().await {
        for part in parts {
            if writer.write_all(&part).await.is_err() {
                return;
            }
        }
    }
}
