//! Starting runners: an ordinary Python interpreter running the embedded
//! runner source as a child process (the default), or the same source
//! served on a thread of this process's own interpreter (in-process mode).
//! Either way the runner speaks the protocol over one end of a Unix socket
//! pair; the pool keeps the other.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The runner's source: a worker's Python environment needs only pyarrow
/// and cloudpickle, not the dfship package.
pub const RUNNER_SOURCE: &str = include_str!("../runner/dfship_runner.py");

/// Serves the runner protocol on a socket in this process's interpreter,
/// returning when the pool closes it (in-process mode; see [`Launcher`]).
pub type InProcessRunner = Arc<dyn Fn(UnixStream) -> Result<(), String> + Send + Sync>;

/// How a pool starts its runners.
#[derive(Clone)]
pub enum Launcher {
    /// `python -c RUNNER_SOURCE` with the pool's end of the socket as
    /// descriptor 3, killed with its parent, optionally memory-limited.
    Process(ProcessSettings),
    /// A thread of this process runs the function, which serves the runner
    /// source in the embedded interpreter. One GIL; no timeout (a thread
    /// cannot be killed), no isolation.
    InProcess(InProcessRunner),
}

impl std::fmt::Debug for Launcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Process(settings) => f.debug_tuple("Process").field(settings).finish(),
            Self::InProcess(_) => f.write_str("InProcess"),
        }
    }
}

/// A runner process's interpreter and limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSettings {
    /// The interpreter (whose environment has pyarrow and cloudpickle).
    pub python: PathBuf,
    /// `RLIMIT_DATA` of each runner, in bytes.
    pub memory_limit: Option<u64>,
    /// Environment variables the runner must not inherit.
    pub env_remove: Vec<OsString>,
}

impl Launcher {
    pub(crate) fn can_kill(&self) -> bool {
        matches!(self, Self::Process(_))
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Process(settings) => settings.python.display().to_string(),
            Self::InProcess(_) => "this process's interpreter".to_string(),
        }
    }
}

/// A started runner, before its READY.
pub(crate) struct Launched {
    pub socket: UnixStream,
    pub handle: RunnerHandle,
}

/// What the pool holds of a runner besides its socket: a way to stop it and
/// to learn how it ended.
pub(crate) enum RunnerHandle {
    Process(Child),
    /// An in-process runner: shutting its socket down ends it once its
    /// current call returns.
    Thread(UnixStream),
}

impl RunnerHandle {
    pub(crate) fn pid(&self) -> Option<u32> {
        match self {
            Self::Process(child) => Some(child.id()),
            Self::Thread(_) => None,
        }
    }

    /// Stops the runner now (SIGKILL), or, in-process, at its next read.
    pub(crate) fn kill(&mut self) {
        match self {
            Self::Process(child) => {
                let _ = child.kill();
            }
            Self::Thread(socket) => {
                let _ = socket.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Waits up to `patience` for a runner that is ending, then kills it;
    /// how it ended, when known.
    pub(crate) fn reap(&mut self, patience: Duration) -> Option<ExitStatus> {
        let Self::Process(child) = self else {
            return None;
        };
        let until = Instant::now() + patience;
        while Instant::now() < until {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => break,
            }
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

/// Starts one runner (blocking: spawning runs on a lasting thread).
pub(crate) fn launch(launcher: &Launcher) -> Result<Launched, String> {
    let (parent, runner_end) = UnixStream::pair()
        .map_err(|e| format!("cannot create a socket pair for a UDF runner: {e}"))?;
    match launcher {
        Launcher::Process(settings) => {
            let child = spawn_process(settings, runner_end)?;
            Ok(Launched {
                socket: parent,
                handle: RunnerHandle::Process(child),
            })
        }
        Launcher::InProcess(serve) => {
            let stopper = parent
                .try_clone()
                .map_err(|e| format!("cannot share a UDF runner's socket: {e}"))?;
            let serve = Arc::clone(serve);
            std::thread::Builder::new()
                .name("dfship-python-runner".to_string())
                .spawn(move || {
                    if let Err(detail) = serve(runner_end) {
                        tracing::warn!(%detail, "an in-process UDF runner stopped");
                    }
                })
                .map_err(|e| format!("cannot start an in-process UDF runner thread: {e}"))?;
            Ok(Launched {
                socket: parent,
                handle: RunnerHandle::Thread(stopper),
            })
        }
    }
}

fn spawn_process(settings: &ProcessSettings, runner_end: UnixStream) -> Result<Child, String> {
    let child_fd = runner_end.as_raw_fd();
    let memory_limit = settings.memory_limit;
    let mut command = Command::new(&settings.python);
    command
        .arg("-c")
        .arg(RUNNER_SOURCE)
        .stdin(Stdio::null())
        // A UDF's prints go to this process's log, never to its stdout
        // (which scripts read for a worker's address).
        .stdout(Stdio::from(
            std::io::stderr()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| format!("cannot share stderr with a UDF runner: {e}"))?,
        ));
    for name in &settings.env_remove {
        command.env_remove(name);
    }
    // SAFETY: only async-signal-safe calls (fcntl, dup2, prctl, setrlimit)
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
            settings.python.display()
        )
    })?;
    drop(runner_end);
    Ok(child)
}

/// Forks and execs `command` on one thread that lives as long as the
/// process: `PR_SET_PDEATHSIG` fires when the *thread* that forked a child
/// exits, and the threads that ask for runners come and go.
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

/// "it exited with code 3", "it was killed by signal 11 (SIGSEGV, …)", …
pub fn describe_exit(status: Option<ExitStatus>) -> String {
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
