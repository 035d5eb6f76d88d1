//! Files UDF runners cannot touch: the cluster key (and TLS key) file,
//! closed with Landlock, whatever user the runners run as.
//!
//! A worker that is not root cannot run its UDFs as another user, and
//! user or mount namespaces that would hide the key's folder are refused by
//! Docker's and Kubernetes' default seccomp profiles. Landlock (Linux 5.13+)
//! is not: an unprivileged process may restrict itself and its children,
//! with no capability, under `no_new_privs`.
//!
//! Landlock only grants: a ruleset *handles* some access rights, which are
//! then denied everywhere except beneath the paths a rule grants them on. So
//! to close one file, each runner's ruleset grants the handled rights
//! beneath every entry of every folder on the way from `/` to the file,
//! except the entries on that way (and the file itself). It is built in
//! the worker before the runner is forked, and applied in the child between
//! fork and exec (`prctl` and `landlock_restrict_self`, both
//! async-signal-safe).
//!
//! The rights handled: reading and writing files, truncating them (ABI 3+),
//! creating and removing files and folders. So a runner cannot read the key,
//! overwrite it, or remove it (or its folder) to put another key in its place
//! for the worker's next start. Linking it elsewhere is refused by Landlock
//! itself (`REFER` is denied by any ruleset).
//!
//! **Every runner is a domain of its own**, whether or not a file is
//! hidden (a cluster key given as a variable hides none): Landlock lets a
//! process in a domain trace (`ptrace`, `/proc/<pid>/mem`) only processes in
//! the same domain or one nested in it, so runners cannot read each other's
//! memory, nor the worker's. From ABI 6 the domain is also *scoped*: a
//! runner can signal, and connect to abstract Unix sockets of, only
//! processes of its own domain (what it forked), not its siblings (the
//! runners of other queries) nor its worker.
//!
//! What it costs: an entry created, while a runner lives, directly in a
//! folder on the way to a hidden file (e.g. in `/etc` for
//! `/etc/dfship/key/cluster.key`) is closed to that runner too. Keep key files
//! in folders of their own under quiet parents, not in `/tmp` or `$HOME`.

use std::collections::HashSet;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Files this process's runners may not touch, added by
/// [`hide_from_runners`].
static HIDDEN: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Closes `files` (a cluster key file, a TLS private key) to every runner
/// process this process starts from now on (see the module docs). Files
/// add up: a process with several contexts hides all their keys.
pub fn hide_from_runners(files: impl IntoIterator<Item = PathBuf>) {
    let mut hidden = HIDDEN.lock().unwrap_or_else(|p| p.into_inner());
    for file in files {
        if !hidden.contains(&file) {
            hidden.push(file);
        }
    }
}

/// The files [`hide_from_runners`] was given.
pub fn hidden_files() -> Vec<PathBuf> {
    HIDDEN.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

const CREATE_RULESET: libc::c_long = 444;
const ADD_RULE: libc::c_long = 445;
const RESTRICT_SELF: libc::c_long = 446;
const CREATE_RULESET_VERSION: u32 = 1;
const RULE_PATH_BENEATH: libc::c_int = 1;

const WRITE_FILE: u64 = 1 << 1;
const READ_FILE: u64 = 1 << 2;
const REMOVE_DIR: u64 = 1 << 4;
const REMOVE_FILE: u64 = 1 << 5;
const MAKE_CHAR: u64 = 1 << 6;
const MAKE_DIR: u64 = 1 << 7;
const MAKE_REG: u64 = 1 << 8;
const MAKE_SOCK: u64 = 1 << 9;
const MAKE_FIFO: u64 = 1 << 10;
const MAKE_BLOCK: u64 = 1 << 11;
const MAKE_SYM: u64 = 1 << 12;
const TRUNCATE: u64 = 1 << 14;

const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
const SCOPE_SIGNAL: u64 = 1 << 1;

/// The ruleset attribute of ABI 6+ (`handled_access_net` from ABI 4,
/// `scoped` from ABI 6); older kernels are given its first field only.
#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// The Landlock ABI version this kernel offers, if any.
pub fn abi_version() -> Option<i64> {
    // SAFETY: the documented way to ask for the version (no attribute).
    let version = unsafe {
        libc::syscall(
            CREATE_RULESET,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    (version > 0).then_some(version)
}

/// A Landlock ruleset that closes some files and leaves the rest open.
#[derive(Debug)]
pub struct Ruleset {
    fd: OwnedFd,
    abi: i64,
}

impl Ruleset {
    /// The ruleset of one runner: a domain of its own (see the module docs)
    /// that closes each of `files` (made canonical here), scoped from ABI 6.
    /// Fails when the kernel has no Landlock, or when `must_open` (the
    /// interpreter) would be closed too.
    pub fn for_runner(files: &[PathBuf], must_open: &Path) -> Result<Self, String> {
        let abi = abi_version().ok_or_else(|| {
            "this kernel offers no Landlock (Linux 5.13 or newer with the landlock LSM enabled)"
                .to_string()
        })?;
        let file_rights = READ_FILE | WRITE_FILE | if abi >= 3 { TRUNCATE } else { 0 };
        // Everything that makes or removes an entry, so that nothing can be
        // put beside or in place of a hidden file (a symlink, a FIFO, a
        // socket) either. Devices need a capability runners lack: handled,
        // never granted.
        let entry_rights =
            REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SYM | MAKE_FIFO | MAKE_SOCK;
        let handled = if files.is_empty() {
            // No file to close: the domain alone is what is wanted. It must
            // handle something; making devices is refused to runners anyway.
            MAKE_CHAR | MAKE_BLOCK
        } else {
            file_rights | entry_rights | MAKE_CHAR | MAKE_BLOCK
        };
        let scoped = if abi >= 6 {
            SCOPE_SIGNAL | SCOPE_ABSTRACT_UNIX_SOCKET
        } else {
            0
        };
        let mut hidden = HashSet::new();
        let mut on_the_way = HashSet::new();
        for file in files {
            let file = file
                .canonicalize()
                .map_err(|e| format!("cannot resolve {}: {e}", file.display()))?;
            on_the_way.extend(file.ancestors().skip(1).map(Path::to_path_buf));
            hidden.insert(file);
        }
        let interpreter = must_open
            .canonicalize()
            .unwrap_or_else(|_| must_open.to_path_buf());
        if hidden.contains(&interpreter) {
            return Err(format!(
                "{} is the Python interpreter itself",
                interpreter.display()
            ));
        }
        let attr = RulesetAttr {
            handled_access_fs: handled,
            handled_access_net: 0,
            scoped,
        };
        // ABI 1 to 3 know the first field only, 4 and 5 the first two.
        let size = match abi {
            ..=3 => std::mem::size_of::<u64>(),
            4 | 5 => 2 * std::mem::size_of::<u64>(),
            _ => std::mem::size_of::<RulesetAttr>(),
        };
        // SAFETY: a valid attribute at least `size` bytes long.
        let fd = unsafe { libc::syscall(CREATE_RULESET, &attr as *const RulesetAttr, size, 0u32) };
        if fd < 0 {
            return Err(format!(
                "cannot create a Landlock ruleset: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: a descriptor the kernel just returned (close-on-exec).
        let ruleset = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        for folder in &on_the_way {
            let Ok(entries) = std::fs::read_dir(folder) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if on_the_way.contains(&path) || hidden.contains(&path) {
                    continue;
                }
                let Ok(kind) = entry.file_type() else {
                    continue;
                };
                if kind.is_symlink() {
                    // Opening through it is checked where it leads.
                    continue;
                }
                let rights = if kind.is_dir() {
                    file_rights | entry_rights
                } else {
                    file_rights
                };
                // Best effort per entry: one that vanished or cannot be
                // opened stays closed, the others open.
                let _ = add_rule(&ruleset, &path, rights);
            }
        }
        Ok(Self { fd: ruleset, abi })
    }

    /// The Landlock ABI the ruleset was made for (6+: scoped).
    pub fn abi(&self) -> i64 {
        self.abi
    }

    /// The descriptor to hand to [`restrict_self`] in the child.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn add_rule(ruleset: &OwnedFd, path: &Path, rights: u64) -> std::io::Result<()> {
    let name = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: a NUL-terminated path; the descriptor is closed below.
    let fd = unsafe {
        libc::open(
            name.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: just opened.
    let parent = unsafe { OwnedFd::from_raw_fd(fd) };
    let attr = PathBeneathAttr {
        allowed_access: rights,
        parent_fd: parent.as_raw_fd(),
    };
    // SAFETY: a valid rule for a valid ruleset descriptor.
    let added = unsafe {
        libc::syscall(
            ADD_RULE,
            ruleset.as_raw_fd(),
            RULE_PATH_BENEATH,
            &attr as *const PathBeneathAttr,
            0u32,
        )
    };
    if added < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Applies the ruleset `fd` to the calling process (and what it will exec).
///
/// # Safety
/// Only async-signal-safe calls: fit for between fork and exec.
pub unsafe fn restrict_self(fd: RawFd) -> std::io::Result<()> {
    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if libc::syscall(RESTRICT_SELF, fd, 0u32) != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Runs `sh -c script` under a ruleset hiding `files`; its exit code.
    fn sh_under(files: &[PathBuf], script: &str) -> i32 {
        let ruleset = Ruleset::for_runner(files, Path::new("/bin/sh")).unwrap();
        let fd = ruleset.raw_fd();
        let mut command = Command::new("/bin/sh");
        command.arg("-c").arg(script);
        // SAFETY: restrict_self is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || restrict_self(fd));
        }
        command.status().unwrap().code().unwrap_or(-1)
    }

    #[test]
    fn a_hidden_file_cannot_be_read_written_or_replaced_and_the_rest_stays_open() {
        if abi_version().is_none() {
            eprintln!("no Landlock on this kernel: nothing to test");
            return;
        }
        let base = std::env::temp_dir().join(format!("dfship-landlock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let keys = base.join("keys");
        std::fs::create_dir_all(&keys).unwrap();
        let key = keys.join("cluster.key");
        std::fs::write(&key, "secret").unwrap();
        std::fs::write(keys.join("other"), "open").unwrap();
        std::fs::create_dir_all(base.join("data")).unwrap();
        let hidden = std::slice::from_ref(&key);
        let q = |path: &Path| path.display().to_string();
        assert_ne!(sh_under(hidden, &format!("cat {} >/dev/null", q(&key))), 0);
        assert_ne!(sh_under(hidden, &format!("echo x > {}", q(&key))), 0);
        assert_ne!(sh_under(hidden, &format!("rm -f {}", q(&key))), 0);
        assert_ne!(
            sh_under(
                hidden,
                &format!("mv {} {}", q(&keys), q(&base.join("moved")))
            ),
            0
        );
        assert_ne!(
            sh_under(
                hidden,
                &format!("ln {} {}", q(&key), q(&base.join("data/link")))
            ),
            0
        );
        // Everything else: a sibling, other folders, new files beneath them.
        assert_eq!(
            sh_under(
                hidden,
                &format!("cat {} >/dev/null", q(&keys.join("other")))
            ),
            0
        );
        let scratch = base.join("data/new");
        assert_eq!(
            sh_under(
                hidden,
                &format!("echo y > {0} && cat {0} >/dev/null", q(&scratch))
            ),
            0
        );
        assert_eq!(sh_under(hidden, "cat /etc/hostname >/dev/null"), 0);
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "secret");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn the_interpreter_cannot_be_hidden() {
        if abi_version().is_none() {
            return;
        }
        let error =
            Ruleset::for_runner(&[PathBuf::from("/bin/sh")], Path::new("/bin/sh")).unwrap_err();
        assert!(error.contains("interpreter"), "{error}");
    }
}
