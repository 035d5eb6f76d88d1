//! One runner process: an ordinary Python interpreter running
//! `dfship/_runner.py`, connected to this process by a Unix socket pair it
//! inherits as file descriptor 3 (and nothing else).
//!
//! A runner runs user code, so this side treats it as untrusted and fragile:
//! every read has a size bound; a read that outlives the call's deadline, or
//! hits end of file, ends with the runner killed and reaped, and the error
//! says how it ended (exit code or signal).

use std::collections::HashSet;
use std::io::ErrorKind as IoErrorKind;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::execution::protocol::{self, Message, MAX_RUNNER_MESSAGE};
use crate::execution::PythonExecution;
use crate::pickled::PicklerVersions;

/// The runner's source, embedded so a worker's Python environment needs only
/// pyarrow and cloudpickle, not the dfship package.
pub(crate) const RUNNER_SOURCE: &str = include_str!("../../../../python/dfship/_runner.py");

/// How long a fresh runner may take to import pyarrow and cloudpickle.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Why talking to a runner failed.
#[derive(Debug)]
pub(crate) enum RunnerFailure {
    /// The runner did not answer before the deadline; it has been killed.
    TimedOut,
    /// The runner died (or closed its socket); how it ended, when known.
    Died(Option<ExitStatus>),
    /// The runner sent something this side cannot accept; it has been killed.
    Protocol(String),
    /// The call was cancelled; the runner has been killed.
    Cancelled,
}

pub(crate) struct Runner {
    child: Child,
    socket: UnixStream,
    pub(crate) versions: PicklerVersions,
    pub(crate) pid: u32,
    /// Digests of the callables this runner holds.
    pub(crate) loaded: HashSet<[u8; 32]>,
    pub(crate) loaded_bytes: usize,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("pid", &self.pid)
            .field("loaded", &self.loaded.len())
            .finish_non_exhaustive()
    }
}

impl Runner {
    /// Starts a runner and waits for its READY message.
    pub(crate) fn start(config: &PythonExecution) -> Result<Self, String> {
        let (parent, child_end) = UnixStream::pair()
            .map_err(|e| format!("cannot create a socket pair for a UDF runner: {e}"))?;
        let child_fd = child_end.as_raw_fd();
        let memory_limit = config.runner_memory_limit;
        let mut command = Command::new(&config.python);
        command
            .arg("-c")
            .arg(RUNNER_SOURCE)
            .stdin(Stdio::null())
            // A UDF's prints go to this process's log, never to its stdout
            // (which scripts read for the worker's address).
            .stdout(Stdio::from(
                std::io::stderr()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| format!("cannot share stderr with a UDF runner: {e}"))?,
            ))
            .env_remove(crate::auth::CLUSTER_KEY_ENV);
        // SAFETY: only async-signal-safe calls (dup2, prctl, setrlimit)
        // between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // The runner's end becomes descriptor 3 and survives exec
                // (dup2 clears close-on-exec; on 3 already, clear it by hand).
                let moved = if child_fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(child_fd, 3)
                };
                if moved < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // A runner never outlives its parent. (The signal follows the
                // death of the thread that forked, hence `spawn_from_lasting_thread`.)
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if let Some(bytes) = memory_limit {
                    let limit = libc::rlimit {
                        rlim_cur: bytes as libc::rlim_t,
                        rlim_max: bytes as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_DATA, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = spawn_from_lasting_thread(command).map_err(|e| {
            format!(
                "cannot start a UDF runner with {}: {e}; point --python-executable (or \
                 --python-env) at a Python interpreter that has pyarrow and cloudpickle",
                config.python.display()
            )
        })?;
        drop(child_end);
        let pid = child.id();
        let mut runner = Self {
            child,
            socket: parent,
            versions: PicklerVersions {
                python_major: 0,
                python_minor: 0,
                cloudpickle_major: 0,
            },
            pid,
            loaded: HashSet::new(),
            loaded_bytes: 0,
        };
        let ready = runner
            .receive(Instant::now() + STARTUP_TIMEOUT, &|| false)
            .map_err(|failure| {
                format!(
                    "a UDF runner ({}) did not start: {}",
                    config.python.display(),
                    runner.describe_failure(&failure)
                )
            })?;
        match ready.kind {
            protocol::READY if ready.body.len() == 7 => {
                runner.versions = PicklerVersions {
                    python_major: ready.body[0],
                    python_minor: ready.body[1],
                    cloudpickle_major: ready.body[2],
                };
                Ok(runner)
            }
            protocol::ERROR => {
                let text = String::from_utf8_lossy(ready.body.get(1..).unwrap_or_default());
                runner.kill();
                Err(format!(
                    "a UDF runner cannot start in the Python environment of {}: {text}; \
                     install pyarrow and cloudpickle there, or point --python-executable \
                     (or --python-env) at an interpreter that has them",
                    config.python.display()
                ))
            }
            other => {
                runner.kill();
                Err(format!(
                    "a UDF runner sent message kind {other} instead of READY; is {} a \
                     compatible Python interpreter?",
                    config.python.display()
                ))
            }
        }
    }

    /// Sends one message.
    pub(crate) fn send(&mut self, kind: u8, parts: &[&[u8]]) -> Result<(), RunnerFailure> {
        match protocol::write_message(&mut self.socket, kind, parts) {
            Ok(()) => Ok(()),
            Err(_) => Err(RunnerFailure::Died(self.reap(Duration::from_secs(2)))),
        }
    }

    /// Receives one message, waiting until `deadline` at most; `cancelled`
    /// is polled while waiting. A runner that times out or is cancelled is
    /// killed, so the socket it holds can never deliver a stale answer.
    pub(crate) fn receive(
        &mut self,
        deadline: Instant,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Message, RunnerFailure> {
        // Wake up at least this often to look at `cancelled`.
        const POLL: Duration = Duration::from_millis(100);
        loop {
            let now = Instant::now();
            if cancelled() {
                self.kill();
                return Err(RunnerFailure::Cancelled);
            }
            if now >= deadline {
                self.kill();
                return Err(RunnerFailure::TimedOut);
            }
            let wait = (deadline - now).min(POLL);
            // Wait for the socket to become readable (a message, or end of
            // file), so a timeout never leaves half a message consumed.
            let mut ready = libc::pollfd {
                fd: self.socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let polled =
                unsafe { libc::poll(&mut ready, 1, wait.as_millis().max(1) as libc::c_int) };
            match polled {
                0 => continue,
                n if n > 0 => break,
                _ if std::io::Error::last_os_error().kind() == IoErrorKind::Interrupted => continue,
                _ => return Err(RunnerFailure::Died(self.reap(Duration::from_secs(2)))),
            }
        }
        // A message has started: the rest must follow promptly.
        let _ = self.socket.set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(30)),
        ));
        match protocol::read_message(&mut self.socket, MAX_RUNNER_MESSAGE) {
            Ok(message) => Ok(message),
            Err(e) if e.kind() == IoErrorKind::InvalidData => {
                self.kill();
                Err(RunnerFailure::Protocol(e.to_string()))
            }
            Err(_) => Err(RunnerFailure::Died(self.reap(Duration::from_secs(2)))),
        }
    }

    /// Kills the runner (SIGKILL) and reaps it.
    pub(crate) fn kill(&mut self) -> Option<ExitStatus> {
        let _ = self.child.kill();
        self.child.wait().ok()
    }

    /// Waits up to `patience` for a runner that is ending, then kills it.
    fn reap(&mut self, patience: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + patience;
        while Instant::now() < until {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(_) => break,
            }
        }
        self.kill()
    }

    /// How a failure ended the runner, in words.
    pub(crate) fn describe_failure(&self, failure: &RunnerFailure) -> String {
        match failure {
            RunnerFailure::TimedOut => "it did not answer in time and was killed".to_string(),
            RunnerFailure::Cancelled => "the query was cancelled".to_string(),
            RunnerFailure::Protocol(detail) => format!("it broke the runner protocol ({detail})"),
            RunnerFailure::Died(status) => describe_exit(*status),
        }
    }
}

/// Forks and execs `command` on one thread that lives as long as the
/// process: `PR_SET_PDEATHSIG` fires when the *thread* that forked a child
/// exits, and the threads that start runners (tokio's blocking threads, a
/// replacement thread) come and go.
fn spawn_from_lasting_thread(command: Command) -> std::io::Result<Child> {
    type Request = (Command, std::sync::mpsc::SyncSender<std::io::Result<Child>>);
    static SPAWNER: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Request>>> =
        std::sync::OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (requests, queue) = std::sync::mpsc::channel::<Request>();
        let started = std::thread::Builder::new()
            .name("dfship-runner-spawner".to_string())
            .spawn(move || {
                for (mut command, reply) in queue {
                    let _ = reply.send(command.spawn());
                }
            });
        if let Err(e) = started {
            tracing::warn!(error = %e, "cannot start the runner spawner thread");
        }
        std::sync::Mutex::new(requests)
    });
    let (reply, answer) = std::sync::mpsc::sync_channel(1);
    spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((command, reply))
        .map_err(|_| std::io::Error::other("the runner spawner thread has stopped"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the runner spawner thread has stopped"))?
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.kill();
    }
}

/// "exited with code 3", "was killed by signal 11 (SIGSEGV)", …
pub(crate) fn describe_exit(status: Option<ExitStatus>) -> String {
    let Some(status) = status else {
        return "it ended in an unknown way".to_string();
    };
    if let Some(code) = status.code() {
        return format!("it exited with code {code}");
    }
    match status.signal() {
        Some(signal) => format!(
            "it was killed by signal {signal} ({}){}",
            signal_name(signal),
            if signal == libc::SIGKILL {
                " — by the out-of-memory killer, or an operator"
            } else {
                ""
            }
        ),
        None => "it ended in an unknown way".to_string(),
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGSEGV => "SIGSEGV, a segmentation fault",
        libc::SIGABRT => "SIGABRT, an abort",
        libc::SIGBUS => "SIGBUS, a bus error",
        libc::SIGFPE => "SIGFPE, an arithmetic fault",
        libc::SIGILL => "SIGILL, an illegal instruction",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}
