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
    /// The user runners run as (`None`: this process's). A root process
    /// running UDFs as an unprivileged user keeps what only it can read
    /// (a cluster key file, its `/proc` files) out of their reach.
    pub user: Option<RunnerUser>,
}

/// A user (and group) runner processes switch to before they exec Python.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnerUser {
    pub uid: u32,
    pub gid: u32,
}

impl RunnerUser {
    /// `nobody`'s user and group (65534 where the name is unknown).
    pub fn nobody() -> Self {
        lookup_user("nobody").unwrap_or(Self {
            uid: 65534,
            gid: 65534,
        })
    }

    /// Runners' user when none is configured: for a process running as
    /// root, `nobody` if `nobody` can run `python` (every folder on its path
    /// open to other users); else this process's own user (`None`). The
    /// second value says why root keeps running UDFs, for a loud warning.
    pub fn default_for(python: &std::path::Path) -> (Option<Self>, Option<String>) {
        // SAFETY: geteuid cannot fail and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            return (None, None);
        }
        match closed_to_others(python) {
            None => (Some(Self::nobody()), None),
            Some(closed) => (
                None,
                Some(format!(
                    "UDF runners run as root, so UDFs can read everything root can (the cluster \
                     key file included): user nobody cannot run {} because {} is closed to \
                     other users. Install Python and its environment where other users can \
                     run them (e.g. /usr, /opt), or choose with --runner-user (a user, or \
                     'worker' to keep root and silence this warning)",
                    python.display(),
                    closed.display()
                )),
            ),
        }
    }

    /// A user given as a name (`nobody`), a number (`10002`, with that
    /// user's group if it has an entry, else the same number) or
    /// `UID:GID`; `worker` (or `same`) means this process's own user (`None`).
    pub fn parse(spec: &str) -> Result<Option<Self>, String> {
        let spec = spec.trim();
        if spec.is_empty() || spec == "worker" || spec == "same" {
            return Ok(None);
        }
        if let Some((uid, gid)) = spec.split_once(':') {
            let number = |text: &str| {
                text.trim().parse::<u32>().map_err(|_| {
                    format!(
                        "runner user '{spec}' is not UID:GID with two numbers, e.g. 10002:10002"
                    )
                })
            };
            return Ok(Some(Self {
                uid: number(uid)?,
                gid: number(gid)?,
            }));
        }
        if let Ok(uid) = spec.parse::<u32>() {
            let gid = lookup_uid(uid).map_or(uid, |user| user.gid);
            return Ok(Some(Self { uid, gid }));
        }
        lookup_user(spec).map(Some).ok_or_else(|| {
            format!(
                "runner user '{spec}' is not a user of this machine: give a name from \
                 /etc/passwd, a number (10002) or UID:GID, or 'worker' for the worker's own user"
            )
        })
    }
}

/// The first folder (or the file) on the way to `python`, or to the file it
/// links to, that other users cannot pass (no `o+x`; the file also `o+r`).
fn closed_to_others(python: &std::path::Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let resolved = which(python).unwrap_or_else(|| python.to_path_buf());
    let real = std::fs::canonicalize(&resolved).unwrap_or_else(|_| resolved.clone());
    for path in [&resolved, &real] {
        for ancestor in path.ancestors().skip(1) {
            if ancestor.as_os_str().is_empty() {
                continue;
            }
            let mode = std::fs::metadata(ancestor).ok()?.permissions().mode();
            if mode & 0o001 == 0 {
                return Some(ancestor.to_path_buf());
            }
        }
    }
    let mode = std::fs::metadata(&real).ok()?.permissions().mode();
    (mode & 0o005 != 0o005).then_some(real)
}

/// `name` found on the `PATH` when it has no `/`.
fn which(name: &std::path::Path) -> Option<PathBuf> {
    if name.components().count() > 1 || name.is_absolute() {
        return Some(name.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn lookup_user(name: &str) -> Option<RunnerUser> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: `name` is a valid C string for the call.
    passwd_entry(|entry, buffer, length, found| unsafe {
        libc::getpwnam_r(name.as_ptr(), entry, buffer, length, found)
    })
}

fn lookup_uid(uid: u32) -> Option<RunnerUser> {
    // SAFETY: plain values and the pointers `passwd_entry` hands over.
    passwd_entry(|entry, buffer, length, found| unsafe {
        libc::getpwuid_r(uid, entry, buffer, length, found)
    })
}

/// The user and group of the `/etc/passwd` entry `lookup` finds (a
/// `getpw*_r` call given the entry, a buffer, its length and the result).
fn passwd_entry(
    lookup: impl FnOnce(
        *mut libc::passwd,
        *mut libc::c_char,
        usize,
        *mut *mut libc::passwd,
    ) -> libc::c_int,
) -> Option<RunnerUser> {
    // SAFETY: all-zero is a valid `passwd` (null pointers, zero ids).
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let status = lookup(&mut entry, buffer.as_mut_ptr(), buffer.len(), &mut found);
    (status == 0 && !found.is_null()).then_some(RunnerUser {
        uid: entry.pw_uid,
        gid: entry.pw_gid,
    })
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
    /// A runner process, leader of its own process group
    /// ([`crate::confine`]): whatever it forked dies with it.
    Process(Child),
    /// An in-process runner: shutting its socket down ends it once its
    /// current call returns.
    Thread(UnixStream),
    /// A process runner already reaped (its group killed first).
    Reaped,
}

impl RunnerHandle {
    pub(crate) fn pid(&self) -> Option<u32> {
        match self {
            Self::Process(child) => Some(child.id()),
            Self::Thread(_) | Self::Reaped => None,
        }
    }

    /// Stops the runner and everything it started now (SIGKILL to its
    /// process group), or, in-process, at its next read.
    pub(crate) fn kill(&mut self) {
        match self {
            Self::Process(child) => {
                // Not reaped yet (reaping turns this into `Reaped`): the
                // group's id is still the runner's.
                crate::confine::kill_group(child.id());
                let _ = child.kill();
            }
            Self::Thread(socket) => {
                let _ = socket.shutdown(std::net::Shutdown::Both);
            }
            Self::Reaped => {}
        }
    }

    /// Waits up to `patience` for a runner that is ending, then kills it;
    /// how it ended, when known. Whatever the runner left running in its
    /// process group is killed before the runner is reaped.
    pub(crate) fn reap(&mut self, patience: Duration) -> Option<ExitStatus> {
        let Self::Process(child) = self else {
            return None;
        };
        let pid = child.id();
        let until = Instant::now() + patience;
        while Instant::now() < until && !crate::confine::has_exited(pid) {
            std::thread::sleep(Duration::from_millis(5));
        }
        crate::confine::kill_group(pid);
        let _ = child.kill();
        let status = child.wait().ok();
        *self = Self::Reaped;
        status
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

/// The Landlock ruleset of one runner: a domain of its own that closes this
/// process's secret files ([`crate::landlock::hide_from_runners`]); `None`
/// (with one warning per process) when the kernel cannot make one.
fn runner_ruleset(settings: &ProcessSettings) -> Option<crate::landlock::Ruleset> {
    let hidden = crate::landlock::hidden_files();
    match crate::landlock::Ruleset::for_runner(&hidden, &settings.python) {
        Ok(ruleset) => {
            if ruleset.abi() < 6 {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    tracing::warn!(
                        landlock_abi = ruleset.abi(),
                        "this kernel's Landlock (ABI {}) cannot scope signals: a UDF can signal                          other runners of the same user (under --runner-isolation query, those                          of other queries). Linux 6.12 or newer scopes them",
                        ruleset.abi()
                    );
                });
            }
            Some(ruleset)
        }
        Err(why) => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                let files: Vec<String> = hidden
                    .iter()
                    .map(|file| file.display().to_string())
                    .collect();
                if files.is_empty() {
                    tracing::warn!(
                        "runner isolation is weak on this kernel ({why}): runners of the same \
                         user can signal each other and what they start, and only \
                         PR_SET_DUMPABLE keeps their memory apart. Use a kernel with Landlock \
                         (Linux 5.13+; 6.12+ scopes signals), or run the worker as root so \
                         runners run as --runner-user"
                    );
                } else {
                    tracing::warn!(
                        files = %files.join(", "),
                        "UDF runners can open these files: they cannot be closed to them ({why}). \
                         A UDF could read the cluster key. Run the worker as root (runners then run \
                         as --runner-user, nobody by default, and a key file of mode 0600 is closed \
                         to them), or on a kernel with Landlock"
                    );
                }
            });
            None
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
    if let Some(user) = settings.user {
        // Another user: std drops supplementary groups, then sets the group
        // and the user, before the `pre_exec` below (whose death signal
        // must come after the user changes, which clears it). The worker's
        // folder may be closed to that user: start in /.
        command.uid(user.uid).gid(user.gid).current_dir("/");
    }
    let ruleset = runner_ruleset(settings);
    let ruleset_fd = ruleset.as_ref().map(crate::landlock::Ruleset::raw_fd);
    let session_filter = crate::confine::SessionFilter::new();
    // SAFETY: only async-signal-safe calls (setpgid, fcntl, dup2, prctl,
    // setrlimit, landlock_restrict_self) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // A process group of its own, killed whole when the runner ends.
            crate::confine::lead_own_group()?;
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
            // Last: after the user change, which std makes before this hook.
            if let Some(fd) = ruleset_fd {
                crate::landlock::restrict_self(fd)?;
            }
            // After `setpgid` above: from here on nothing can leave the group.
            if let Some(filter) = &session_filter {
                filter.install()?;
            }
            Ok(())
        });
    }
    let child = spawn_from_lasting_thread(command).map_err(|e| match settings.user {
        Some(user) => format!(
            "cannot start a UDF runner with {} as user {}:{}: {e}; that user must be able to \
             run the interpreter and read its environment (or set --runner-user, e.g. to \
             'worker' to run UDFs as the worker's own user)",
            settings.python.display(),
            user.uid,
            user.gid
        ),
        None => format!(
            "cannot start a UDF runner with {}: {e}; point --python-executable (or \
             --python-env) at a Python interpreter that has pyarrow and cloudpickle",
            settings.python.display()
        ),
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
