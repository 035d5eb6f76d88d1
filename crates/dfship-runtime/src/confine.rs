//! What keeps everything a runner starts inside it: a process group of its
//! own, killed whole when the runner ends, and a seccomp filter that
//! refuses `setsid` and `setpgid`, so that nothing a UDF forks (a
//! double-forked daemon included) can leave that group.
//!
//! The group is made between fork and exec (`setpgid(0, 0)`, the runner
//! leads it); the filter is installed last there, after `no_new_privs`
//! (which Landlock sets too). Both are inherited by everything the runner
//! forks. The pool kills the group (`kill(-pgid, SIGKILL)`) before it reaps
//! the runner, while the runner's pid cannot yet be reused, whether the
//! runner retired, timed out, broke the protocol or died.
//!
//! What it does not cover: a worker killed with SIGKILL takes its runners
//! with it (`PR_SET_PDEATHSIG`), but not what they forked; those end with
//! the container or the service's cgroup.
//!
//! The cost: a UDF cannot start a process in a session of its own
//! (`subprocess.Popen(start_new_session=True)`, `os.setsid()`: they fail
//! with `EPERM`).

use std::io;

/// `AUDIT_ARCH_*` of the architecture this was built for.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// x86-64's x32 system calls carry this bit in their number.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;

fn statement(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// The seccomp program that refuses new sessions and process groups (and
/// every system call of another architecture, which would bypass it).
/// Built before fork: installing it allocates nothing.
pub(crate) struct SessionFilter {
    program: Vec<libc::sock_filter>,
}

impl SessionFilter {
    /// The filter for this architecture (`None` on others: the process
    /// group alone then holds what is not detached on purpose).
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    pub(crate) fn new() -> Option<Self> {
        use libc::{BPF_ABS, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W};
        let refuse = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
        let allow = libc::SECCOMP_RET_ALLOW;
        let mut program = vec![
            statement(BPF_LD | BPF_W | BPF_ABS, SECCOMP_DATA_ARCH),
            // Our architecture: go on; another: refused.
            jump(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH, 1, 0),
            statement(BPF_RET | BPF_K, refuse),
            statement(BPF_LD | BPF_W | BPF_ABS, SECCOMP_DATA_NR),
        ];
        #[cfg(target_arch = "x86_64")]
        {
            const BPF_JGE: u32 = 0x30;
            // x32 numbers: refused (the next statement but one).
            program.push(jump(BPF_JMP | BPF_JGE | BPF_K, X32_SYSCALL_BIT, 3, 0));
        }
        program.extend([
            jump(BPF_JMP | BPF_JEQ | BPF_K, libc::SYS_setsid as u32, 2, 0),
            jump(BPF_JMP | BPF_JEQ | BPF_K, libc::SYS_setpgid as u32, 1, 0),
            statement(BPF_RET | BPF_K, allow),
            statement(BPF_RET | BPF_K, refuse),
        ]);
        Some(Self { program })
    }

    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    pub(crate) fn new() -> Option<Self> {
        None
    }

    /// Installs the filter in the calling process (and what it forks and
    /// execs).
    ///
    /// # Safety
    /// Only async-signal-safe calls: fit for between fork and exec.
    pub(crate) unsafe fn install(&self) -> io::Result<()> {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        let program = libc::sock_fprog {
            len: self.program.len() as u16,
            filter: self.program.as_ptr() as *mut libc::sock_filter,
        };
        if libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &program as *const libc::sock_fprog,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Makes the calling process the leader of a new process group.
///
/// # Safety
/// Async-signal-safe: fit for between fork and exec.
pub(crate) unsafe fn lead_own_group() -> io::Result<()> {
    if libc::setpgid(0, 0) != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// SIGKILL to every process of the group `leader` leads. Call it only while
/// the leader is not yet reaped (its pid, and so the group's, cannot have
/// been reused).
pub(crate) fn kill_group(leader: u32) {
    let Ok(pid) = libc::pid_t::try_from(leader) else {
        return;
    };
    if pid > 1 {
        // SAFETY: a plain system call; ESRCH (no such group) is fine.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
}

/// Whether the child `pid` has ended, without reaping it (so its pid stays
/// taken until the caller reaps it).
pub(crate) fn has_exited(pid: u32) -> bool {
    // SAFETY: all-zero is a valid siginfo_t; waitid writes into it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer; WNOWAIT leaves the child waitable.
    let done = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: si_pid is set by waitid when a child was found.
    done == 0 && unsafe { info.si_pid() } != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    #[test]
    fn a_filtered_process_cannot_start_a_session_or_group_and_everything_else_runs() {
        let filter = SessionFilter::new().expect("a filter for this architecture");
        let mut command = Command::new("/bin/sh");
        command.arg("-c").arg(
            "python3 -c 'import os,sys\n\
             for f in (os.setsid, lambda: os.setpgid(0, 0)):\n\
             \ttry:\n\t\tf(); sys.exit(3)\n\
             \texcept PermissionError: pass\n\
             print(os.getpid() > 0)'",
        );
        // SAFETY: only async-signal-safe calls.
        unsafe {
            command.pre_exec(move || {
                lead_own_group()?;
                filter.install()
            });
        }
        let output = command.output().unwrap();
        assert!(
            output.status.success(),
            "{:?} {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "True");
    }
}
