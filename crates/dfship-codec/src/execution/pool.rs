//! [`RunnerPool`]: the runner processes of this process, shared by every
//! query it executes.
//!
//! - **Fair.** Callers wait in one FIFO queue, whichever query they belong
//!   to; the first in line gets the next free runner. A caller prefers a free
//!   runner that already holds its callable, so a callable is sent to a
//!   runner once (per digest), not once per call or per task.
//! - **Lazy and self-healing.** Runners start on first use, up to the pool's
//!   size; one that dies, times out or is cancelled is dropped (killed and
//!   reaped) and the next caller starts a replacement.
//! - **Bounded.** A runner keeps the callables it was sent up to a byte
//!   budget; beyond it the pool tells it to forget the others first.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arrow::array::ArrayData;
use arrow::datatypes::DataType;
use datafusion::error::{DataFusionError, Result};

use crate::error::{ErrorKind, UdfPayloadError};
use crate::execution::protocol::{self, RunnerErrorClass};
use crate::execution::runner::{Runner, RunnerFailure};
use crate::execution::{CancelToken, PythonExecution};
use crate::pickled::{PickleContent, PickledCallable};
use crate::result_check::{invalid_array, not_an_array};

/// What a runner keeps of the callables it was sent, in pickle bytes.
const RUNNER_CALLABLE_BUDGET: usize = 512 * 1024 * 1024;

/// A call the pool evaluates.
pub(crate) struct RunnerCall<'a> {
    pub udf_name: &'a str,
    pub returns: &'a DataType,
    pub pickled: &'a PickledCallable,
    /// The message (`CALL`, `AGGREGATE`, `WINDOW`) and its body after the digest.
    pub message: u8,
    pub body: &'a [u8],
    /// Rows of the batch, for error messages.
    pub number_rows: usize,
    pub cancel: Option<&'a CancelToken>,
}

/// What a [`RunnerPool`] has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Runner processes started (first starts and replacements).
    pub started: u64,
    /// Runners that died, timed out or were cancelled, and were replaced.
    pub lost: u64,
    /// Callables sent to runners (one per runner and digest).
    pub loads: u64,
    /// Calls evaluated.
    pub calls: u64,
    /// Runners alive now.
    pub alive: usize,
    /// Runners evaluating a call now.
    pub busy: usize,
}

#[derive(Default)]
struct Counters {
    started: AtomicU64,
    lost: AtomicU64,
    loads: AtomicU64,
    calls: AtomicU64,
}

struct State {
    idle: Vec<Runner>,
    /// Runners checked out (busy, or starting).
    checked_out: usize,
    /// Tickets of the callers waiting for a runner, first come first served.
    queue: VecDeque<u64>,
    next_ticket: u64,
}

pub(crate) struct RunnerPool {
    config: PythonExecution,
    state: Mutex<State>,
    changed: Condvar,
    counters: Counters,
}

/// A runner checked out of the pool, or the right to start one.
enum Lease {
    Idle(Runner),
    Start,
}

impl RunnerPool {
    pub(crate) fn new(config: PythonExecution) -> Self {
        Self {
            config,
            state: Mutex::new(State {
                idle: Vec::new(),
                checked_out: 0,
                queue: VecDeque::new(),
                next_ticket: 0,
            }),
            changed: Condvar::new(),
            counters: Counters::default(),
        }
    }

    pub(crate) fn stats(&self) -> PoolStats {
        let state = self.lock();
        PoolStats {
            started: self.counters.started.load(Ordering::Relaxed),
            lost: self.counters.lost.load(Ordering::Relaxed),
            loads: self.counters.loads.load(Ordering::Relaxed),
            calls: self.counters.calls.load(Ordering::Relaxed),
            alive: state.idle.len() + state.checked_out,
            busy: state.checked_out,
        }
    }

    /// Starts runners until the pool is full.
    pub(crate) fn warm_up(&self) -> Result<()> {
        loop {
            {
                let mut state = self.lock();
                if state.idle.len() + state.checked_out >= self.config.runners {
                    return Ok(());
                }
                state.checked_out += 1;
            }
            match Runner::start(&self.config) {
                Ok(runner) => {
                    self.counters.started.fetch_add(1, Ordering::Relaxed);
                    self.give_back(runner);
                }
                Err(detail) => {
                    self.give_up_slot();
                    return Err(DataFusionError::Configuration(detail));
                }
            }
        }
    }

    /// Evaluates one call on a runner; returns the (unchecked) result.
    pub(crate) fn call(&'static self, call: &RunnerCall<'_>) -> Result<ArrayData> {
        let mut runner = match self.acquire(call.pickled.digest(), call.cancel)? {
            Lease::Idle(runner) => runner,
            Lease::Start => match Runner::start(&self.config) {
                Ok(runner) => {
                    self.counters.started.fetch_add(1, Ordering::Relaxed);
                    runner
                }
                Err(detail) => {
                    self.give_up_slot();
                    return Err(DataFusionError::Execution(format!(
                        "{} cannot run Python UDF '{}': {detail}",
                        ErrorKind::UdfLoadFailed.tag(),
                        call.udf_name
                    )));
                }
            },
        };
        let outcome = self.call_on(&mut runner, call);
        match outcome {
            Ok(result) => {
                self.give_back(runner);
                result
            }
            Err(failure) => {
                let how = runner.describe_failure(&failure);
                drop(runner);
                self.counters.lost.fetch_add(1, Ordering::Relaxed);
                self.replace_lost_runner();
                Err(self.failure_error(call, &failure, &how))
            }
        }
    }

    /// Loads the callable if needed, then calls it. The outer error means
    /// the runner is gone; the inner result is the call's own outcome.
    fn call_on(
        &self,
        runner: &mut Runner,
        call: &RunnerCall<'_>,
    ) -> Result<Result<ArrayData>, RunnerFailure> {
        let digest = call.pickled.digest();
        let cancelled = || call.cancel.is_some_and(CancelToken::is_cancelled);
        if let Err(mismatch) = call
            .pickled
            .versions()
            .check_loadable_by(call.udf_name, runner.versions)
        {
            return Ok(Err(mismatch.into()));
        }
        if !runner.loaded.contains(digest) {
            let size = call.pickled.bytes().len();
            if runner.loaded_bytes + size > RUNNER_CALLABLE_BUDGET {
                for old in runner.loaded.drain().collect::<Vec<_>>() {
                    runner.send(protocol::FORGET, &[&old])?;
                }
                runner.loaded_bytes = 0;
            }
            let content = match call.pickled.content() {
                PickleContent::Callable => 0u8,
                PickleContent::DataFusionPythonTuple => 1u8,
            };
            runner.send(protocol::LOAD, &[digest, &[content], call.pickled.bytes()])?;
            let reply = runner.receive(far_future(), &cancelled)?;
            self.counters.loads.fetch_add(1, Ordering::Relaxed);
            match reply.kind {
                protocol::LOADED => {
                    runner.loaded.insert(*digest);
                    runner.loaded_bytes += size;
                }
                protocol::ERROR => return Ok(Err(self.runner_error(call, &reply.body))),
                other => {
                    runner.kill();
                    return Err(RunnerFailure::Protocol(format!(
                        "message kind {other} in answer to LOAD"
                    )));
                }
            }
        }
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        runner.send(call.message, &[digest, call.body])?;
        let deadline = self
            .config
            .udf_timeout
            .map(|timeout| Instant::now() + timeout)
            .unwrap_or_else(far_future);
        let reply = runner.receive(deadline, &cancelled)?;
        match reply.kind {
            protocol::RESULT => Ok(protocol::decode_result(reply.body)
                .map_err(|detail| invalid_array(call.udf_name, &detail))),
            protocol::ERROR => Ok(Err(self.runner_error(call, &reply.body))),
            other => {
                runner.kill();
                Err(RunnerFailure::Protocol(format!(
                    "message kind {other} in answer to CALL"
                )))
            }
        }
    }

    /// A runner's ERROR message as the error users see.
    fn runner_error(&self, call: &RunnerCall<'_>, body: &[u8]) -> DataFusionError {
        let class = body
            .first()
            .and_then(|code| RunnerErrorClass::from_code(*code));
        let text = String::from_utf8_lossy(body.get(1..).unwrap_or_default()).into_owned();
        runner_error(
            call.udf_name,
            call.returns,
            class,
            &text,
            self.config.runner_memory_limit,
        )
    }

    /// The error for a call whose runner failed.
    fn failure_error(
        &self,
        call: &RunnerCall<'_>,
        failure: &RunnerFailure,
        how: &str,
    ) -> DataFusionError {
        let name = call.udf_name;
        let message = match failure {
            RunnerFailure::TimedOut => format!(
                "{} Python UDF '{name}' did not finish a batch of {} rows within {:?} \
                 (--udf-timeout); its runner was killed and is replaced. Make the UDF faster, \
                 or raise --udf-timeout",
                ErrorKind::UdfRaised.tag(),
                call.number_rows,
                self.config.udf_timeout.unwrap_or_default()
            ),
            RunnerFailure::Cancelled => format!(
                "the query was cancelled while Python UDF '{name}' ran; its runner was stopped"
            ),
            RunnerFailure::Died(_) | RunnerFailure::Protocol(_) => {
                let memory = match self.config.runner_memory_limit {
                    Some(limit) => format!(
                        " Its runner may use at most {} (--runner-memory-limit).",
                        human_bytes(limit)
                    ),
                    None => String::new(),
                };
                format!(
                    "{} the runner process evaluating Python UDF '{name}' crashed: {how}. Only \
                     this call failed; the runner is replaced and the worker keeps serving. \
                     Look for native code in the UDF (ctypes, extensions) or memory use.{memory}",
                    ErrorKind::UdfRaised.tag()
                )
            }
        };
        DataFusionError::Execution(message)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for this caller's turn, then takes a free runner (preferring
    /// one that holds `digest`) or the right to start one.
    fn acquire(&self, digest: &[u8; 32], cancel: Option<&CancelToken>) -> Result<Lease> {
        let mut state = self.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.queue.push_back(ticket);
        loop {
            if cancel.is_some_and(CancelToken::is_cancelled) {
                state.queue.retain(|t| *t != ticket);
                self.changed.notify_all();
                return Err(DataFusionError::Execution(
                    "the query was cancelled while waiting for a Python UDF runner".to_string(),
                ));
            }
            if state.queue.front() == Some(&ticket) {
                let lease =
                    if let Some(at) = state.idle.iter().position(|r| r.loaded.contains(digest)) {
                        Some(Lease::Idle(state.idle.swap_remove(at)))
                    } else if state.idle.len() + state.checked_out < self.config.runners {
                        Some(Lease::Start)
                    } else {
                        state.idle.pop().map(Lease::Idle)
                    };
                if let Some(lease) = lease {
                    state.queue.pop_front();
                    state.checked_out += 1;
                    // The next in line may be able to go too.
                    self.changed.notify_all();
                    return Ok(lease);
                }
            }
            let (next, _) = self
                .changed
                .wait_timeout(state, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner());
            state = next;
        }
    }

    fn give_back(&self, runner: Runner) {
        let mut state = self.lock();
        state.checked_out -= 1;
        state.idle.push(runner);
        self.changed.notify_all();
    }

    /// A runner died or was killed: start its replacement in the background
    /// (keeping its slot), so the next call does not pay for the start-up.
    fn replace_lost_runner(&'static self) {
        let spawned = std::thread::Builder::new()
            .name("dfship-runner-start".to_string())
            .spawn(move || match Runner::start(&self.config) {
                Ok(runner) => {
                    self.counters.started.fetch_add(1, Ordering::Relaxed);
                    self.give_back(runner);
                }
                Err(detail) => {
                    tracing::warn!(%detail, "cannot replace a lost UDF runner; the next call retries");
                    self.give_up_slot();
                }
            });
        if spawned.is_err() {
            self.give_up_slot();
        }
    }

    fn give_up_slot(&self) {
        let mut state = self.lock();
        state.checked_out -= 1;
        self.changed.notify_all();
    }
}

/// What a runner (or, in-process, the same Python code) reported as the
/// error users see: `class` and `text` of an ERROR message.
pub(crate) fn runner_error(
    name: &str,
    returns: &DataType,
    class: Option<RunnerErrorClass>,
    text: &str,
    memory_limit: Option<u64>,
) -> DataFusionError {
    let message = match class {
        Some(RunnerErrorClass::Raised) => {
            format!(
                "{} Python UDF '{name}' raised: {text}",
                ErrorKind::UdfRaised.tag()
            )
        }
        Some(RunnerErrorClass::ModuleMissing) => {
            return UdfPayloadError::ModuleNotFound {
                name: name.to_string(),
                module: text.to_string(),
            }
            .into()
        }
        Some(RunnerErrorClass::UnpickleFailed) => {
            return UdfPayloadError::Unpickle {
                name: name.to_string(),
                detail: text.to_string(),
            }
            .into()
        }
        Some(RunnerErrorClass::NotAnArray) => return not_an_array(name, returns, text),
        Some(RunnerErrorClass::BadResult) => format!(
            "{} Python UDF '{name}': {text}",
            ErrorKind::UdfBadResult.tag()
        ),
        Some(RunnerErrorClass::OutOfMemory) => match memory_limit {
            Some(limit) => format!(
                "{} Python UDF '{name}' ran out of memory: its runner may use at most {} \
                 (--runner-memory-limit); process smaller batches, use less memory per batch, \
                 or raise the limit ({text})",
                ErrorKind::UdfRaised.tag(),
                human_bytes(limit)
            ),
            None => format!(
                "{} Python UDF '{name}' ran out of memory ({text})",
                ErrorKind::UdfRaised.tag()
            ),
        },
        Some(RunnerErrorClass::Protocol | RunnerErrorClass::Startup) | None => format!(
            "{} the runner of Python UDF '{name}' failed: {text}",
            ErrorKind::UdfLoadFailed.tag()
        ),
    };
    DataFusionError::Execution(message)
}

/// "No deadline": a month.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(30 * 24 * 3600)
}

/// 512 MiB, 2 GiB, 1.5 GiB, 900 KiB…
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if bytes >= size {
            let value = bytes as f64 / size as f64;
            return if value.fract() == 0.0 {
                format!("{value:.0} {unit}")
            } else {
                format!("{value:.1} {unit}")
            };
        }
    }
    format!("{bytes} bytes")
}
