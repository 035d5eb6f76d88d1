//! `COPY … TO` a local path, written into a staging folder beside the
//! target and moved into place only when the query succeeded — without
//! following any path a UDF could have changed meanwhile.
//!
//! The coordinator is a deputy outside the runners' sandbox: while the query
//! runs, a UDF whose runner can write in the target's folder can rename the
//! staging folder, plant symlinks in it, or turn the target into a folder.
//! A commit by path (`is_dir`, `rename(staged, target.join(name))`) would
//! then move whatever the symlinks point at — the cluster key's folder, say
//! — to where the UDF can read it. So:
//!
//! - the target's folder is opened once, before the query, and every later
//!   step is relative to that descriptor (`*at` calls);
//! - the staging folder is made `0700` and held open; at commit it must still
//!   be the same folder (device and inode) at the same name;
//! - everything in it is looked at without following links
//!   (`AT_SYMLINK_NOFOLLOW`, `O_NOFOLLOW`): a symlink, FIFO, socket or device
//!   anywhere in the output fails the COPY, and nothing is moved;
//! - the target must be of the kind it was before the query (absent, a file,
//!   a folder); a change fails the COPY;
//! - a failed COPY's staging folder is removed through its descriptor,
//!   never by path.
//!
//! What it does not cover: the files DataFusion's sink writes by path while
//! the query runs. A UDF that swaps the staging folder for a symlink can make
//! the sink write the query's output elsewhere (files named like the
//! output); the commit then finds the staging folder replaced and fails.
//! Keep COPY targets in folders runners cannot write (runners as another
//! user, the default for a root worker).

use std::ffi::{CStr, CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::LogicalPlan;

/// What a path was, looked at without following a final symlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Absent,
    File,
    Folder,
    /// A symlink, FIFO, socket or device.
    Other,
}

impl Kind {
    fn describe(self) -> &'static str {
        match self {
            Self::Absent => "absent",
            Self::File => "a file",
            Self::Folder => "a folder",
            Self::Other => "a symlink or special file",
        }
    }
}

fn c_name(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn stat_at(dir: RawFd, name: &CStr) -> io::Result<Option<libc::stat>> {
    // SAFETY: all-zero is a valid stat; fstatat fills it.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated name and a valid out pointer.
    let done = unsafe { libc::fstatat(dir, name.as_ptr(), &mut stat, libc::AT_SYMLINK_NOFOLLOW) };
    if done == 0 {
        return Ok(Some(stat));
    }
    let error = io::Error::last_os_error();
    if error.kind() == io::ErrorKind::NotFound {
        Ok(None)
    } else {
        Err(error)
    }
}

fn kind_of(stat: Option<&libc::stat>) -> Kind {
    match stat.map(|s| s.st_mode & libc::S_IFMT) {
        None => Kind::Absent,
        Some(libc::S_IFREG) => Kind::File,
        Some(libc::S_IFDIR) => Kind::Folder,
        Some(_) => Kind::Other,
    }
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: as in `stat_at`.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and out pointer.
    if unsafe { libc::fstat(fd, &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat)
}

fn open_folder_at(dir: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: a NUL-terminated name; the descriptor is owned below.
    let fd = unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just opened.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The names in the folder `dir` (without `.` and `..`).
fn names_in(dir: RawFd) -> io::Result<Vec<OsString>> {
    // A descriptor of its own: readdir consumes it.
    // SAFETY: duplicating a valid descriptor.
    let copy = unsafe { libc::fcntl(dir, libc::F_DUPFD_CLOEXEC, 0) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `copy` is ours; fdopendir takes it over (closedir closes it).
    let stream = unsafe { libc::fdopendir(copy) };
    if stream.is_null() {
        let error = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `copy` is still ours.
        unsafe { libc::close(copy) };
        return Err(error);
    }
    // SAFETY: a fresh stream at its start.
    unsafe { libc::rewinddir(stream) };
    let mut names = Vec::new();
    loop {
        // SAFETY: a valid stream; the entry is read before the next call.
        let entry = unsafe { libc::readdir(stream) };
        if entry.is_null() {
            break;
        }
        // SAFETY: d_name is NUL-terminated.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        let bytes = name.to_bytes();
        if bytes != b"." && bytes != b".." {
            names.push(OsString::from_vec(bytes.to_vec()));
        }
    }
    // SAFETY: the stream was opened above and is closed once.
    unsafe { libc::closedir(stream) };
    Ok(names)
}

/// Fails on the first entry beneath `dir` that is neither a file nor a folder.
fn check_tree(dir: RawFd, shown: &Path) -> std::result::Result<(), String> {
    for name in names_in(dir).map_err(|e| format!("cannot list {}: {e}", shown.display()))? {
        let c = c_name(&name).map_err(|e| e.to_string())?;
        let path = shown.join(&name);
        let stat =
            stat_at(dir, &c).map_err(|e| format!("cannot look at {}: {e}", path.display()))?;
        match kind_of(stat.as_ref()) {
            Kind::File | Kind::Absent => {}
            Kind::Folder => {
                let sub = open_folder_at(dir, &c)
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                check_tree(sub.as_raw_fd(), &path)?;
            }
            Kind::Other => {
                return Err(format!(
                    "{} is a symlink or special file, which a COPY never writes (a UDF may \
                     have put it there)",
                    path.display()
                ))
            }
        }
    }
    Ok(())
}

/// Removes everything beneath `dir`, following no link.
fn empty_tree(dir: RawFd) -> io::Result<()> {
    for name in names_in(dir)? {
        let c = c_name(&name)?;
        let folder = kind_of(stat_at(dir, &c)?.as_ref()) == Kind::Folder;
        if folder {
            let sub = open_folder_at(dir, &c)?;
            empty_tree(sub.as_raw_fd())?;
        }
        let flags = if folder { libc::AT_REMOVEDIR } else { 0 };
        // SAFETY: a NUL-terminated name relative to a valid descriptor.
        if unsafe { libc::unlinkat(dir, c.as_ptr(), flags) } != 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::NotFound {
                return Err(error);
            }
        }
    }
    Ok(())
}

fn rename_at(from_dir: RawFd, from: &CStr, to_dir: RawFd, to: &CStr) -> io::Result<()> {
    // SAFETY: NUL-terminated names relative to valid descriptors.
    if unsafe { libc::renameat(from_dir, from.as_ptr(), to_dir, to.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A `COPY` to a local path, redirected into a staging folder beside the
/// target until the query succeeds (see the module docs).
pub(crate) struct StagedCopy {
    /// The plan, writing into the staging folder.
    pub plan: LogicalPlan,
    /// The target's folder, opened before the query.
    parent: OwnedFd,
    staging_name: CString,
    /// The staging folder, opened when it was made.
    staging: OwnedFd,
    staging_id: (u64, u64),
    name: CString,
    /// What the target was before the query.
    target_kind: Kind,
    /// For messages only.
    staged_path: PathBuf,
    target: PathBuf,
}

impl StagedCopy {
    /// A staged copy of `plan` when it is a `COPY` to a local path.
    pub(crate) fn prepare(plan: &LogicalPlan) -> Result<Option<Self>> {
        let LogicalPlan::Copy(copy) = plan else {
            return Ok(None);
        };
        let Some(target) = local_path(&copy.output_url) else {
            return Ok(None);
        };
        let directory = copy.output_url.ends_with('/');
        let name = target.file_name().ok_or_else(|| {
            DataFusionError::Plan(format!(
                "COPY needs a file or directory name to write to, not '{}'",
                copy.output_url
            ))
        })?;
        let parent_path = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let fail = |what: &str, e: io::Error| {
            DataFusionError::Execution(format!(
                "COPY cannot {what} {}: {e}; check that the folder exists and this process \
                 may write in it",
                parent_path.display()
            ))
        };
        let parent_c = c_name(parent_path.as_os_str()).map_err(|e| fail("open", e))?;
        // The user's own path, resolved once, before any UDF runs.
        // SAFETY: a NUL-terminated path; the descriptor is owned below.
        let fd = unsafe {
            libc::open(
                parent_c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(fail("open", io::Error::last_os_error()));
        }
        // SAFETY: just opened.
        let parent = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = c_name(name).map_err(|e| fail("name a file in", e))?;
        let target_kind = kind_of(
            stat_at(parent.as_raw_fd(), &name)
                .map_err(|e| fail("look at the target in", e))?
                .as_ref(),
        );
        if target_kind == Kind::Other {
            return Err(DataFusionError::Plan(format!(
                "COPY target {} is a symlink or special file: give the path of the file or \
                 folder it should write (the real one, not a link to it)",
                target.display()
            )));
        }
        let staging_text = format!(".dfship-staging-{}", uuid::Uuid::new_v4().simple());
        let staging_name = c_name(OsStr::new(&staging_text)).map_err(|e| fail("name", e))?;
        // SAFETY: a NUL-terminated name relative to a valid descriptor.
        if unsafe { libc::mkdirat(parent.as_raw_fd(), staging_name.as_ptr(), 0o700) } != 0 {
            return Err(fail(
                "make its staging folder in",
                io::Error::last_os_error(),
            ));
        }
        let staging = open_folder_at(parent.as_raw_fd(), &staging_name)
            .map_err(|e| fail("open its staging folder in", e))?;
        let stat =
            fstat(staging.as_raw_fd()).map_err(|e| fail("look at its staging folder in", e))?;
        let staged_path = parent_path
            .join(&staging_text)
            .join(OsStr::from_bytes(name.as_bytes()));
        let mut output_url = staged_path.to_string_lossy().into_owned();
        if directory {
            output_url.push('/');
        }
        let mut copy = copy.clone();
        copy.output_url = output_url;
        Ok(Some(Self {
            plan: LogicalPlan::Copy(copy),
            parent,
            staging_name,
            staging,
            staging_id: (stat.st_dev, stat.st_ino),
            name,
            target_kind,
            staged_path,
            target,
        }))
    }

    /// Whether the staging folder is still ours, at its name.
    fn staging_in_place(&self) -> bool {
        matches!(
            stat_at(self.parent.as_raw_fd(), &self.staging_name),
            Ok(Some(stat)) if (stat.st_dev, stat.st_ino) == self.staging_id
                && kind_of(Some(&stat)) == Kind::Folder
        )
    }

    /// Moves what the query wrote into place, or fails having moved nothing.
    pub(crate) fn commit(self) -> Result<()> {
        let refused = |why: String, cleaned: &str| {
            DataFusionError::Execution(format!(
                "COPY to {} was not committed: {why}. Nothing was moved into place ({cleaned}); \
                 run the COPY again, and keep its target in a folder UDF runners cannot write",
                self.target.display()
            ))
        };
        if !self.staging_in_place() {
            // Not ours any more: leave what is there alone.
            return Err(refused(
                "its staging folder was moved or replaced while the query ran (by a UDF?)"
                    .to_string(),
                "what is now at its name was left alone",
            ));
        }
        let result = self.move_into_place();
        match result {
            Ok(()) => {
                self.remove_staging();
                Ok(())
            }
            Err(Refusal::Unsafe(why)) => {
                self.remove_staging();
                Err(refused(why, "the staged output was removed"))
            }
            Err(Refusal::Failed(why)) => Err(DataFusionError::Execution(format!(
                "COPY wrote its output to {} but could not move it to {}: {why}; move it by \
                 hand",
                self.staged_path.display(),
                self.target.display()
            ))),
        }
    }

    fn move_into_place(&self) -> std::result::Result<(), Refusal> {
        let staging = self.staging.as_raw_fd();
        let parent = self.parent.as_raw_fd();
        let staged = stat_at(staging, &self.name).map_err(|e| Refusal::Failed(e.to_string()))?;
        let staged_kind = kind_of(staged.as_ref());
        let now = stat_at(parent, &self.name).map_err(|e| Refusal::Failed(e.to_string()))?;
        let target_kind = kind_of(now.as_ref());
        if target_kind != self.target_kind {
            return Err(Refusal::Unsafe(format!(
                "the target changed while the query ran: it was {} and is now {}",
                self.target_kind.describe(),
                target_kind.describe()
            )));
        }
        match staged_kind {
            Kind::Absent => Ok(()),
            Kind::Other => Err(Refusal::Unsafe(format!(
                "{} is a symlink or special file, which a COPY never writes (a UDF may have \
                 put it there)",
                self.staged_path.display()
            ))),
            Kind::Folder => {
                let folder = open_folder_at(staging, &self.name)
                    .map_err(|e| Refusal::Failed(e.to_string()))?;
                check_tree(folder.as_raw_fd(), &self.staged_path).map_err(Refusal::Unsafe)?;
                if target_kind == Kind::Folder {
                    // Into an existing folder: each entry, as DataFusion would.
                    let into = open_folder_at(parent, &self.name)
                        .map_err(|e| Refusal::Failed(e.to_string()))?;
                    for entry in
                        names_in(folder.as_raw_fd()).map_err(|e| Refusal::Failed(e.to_string()))?
                    {
                        let entry = c_name(&entry).map_err(|e| Refusal::Failed(e.to_string()))?;
                        rename_at(folder.as_raw_fd(), &entry, into.as_raw_fd(), &entry)
                            .map_err(|e| Refusal::Failed(e.to_string()))?;
                    }
                    Ok(())
                } else {
                    rename_at(staging, &self.name, parent, &self.name)
                        .map_err(|e| Refusal::Failed(e.to_string()))
                }
            }
            Kind::File => rename_at(staging, &self.name, parent, &self.name)
                .map_err(|e| Refusal::Failed(e.to_string())),
        }
    }

    /// Removes what the failed attempts wrote.
    pub(crate) fn discard(self) {
        if self.staging_in_place() {
            self.remove_staging();
        }
    }

    /// Empties the staging folder through its descriptor, then removes it
    /// if it is still ours.
    fn remove_staging(&self) {
        if let Err(e) = empty_tree(self.staging.as_raw_fd()) {
            tracing::warn!(staging = %self.staged_path.display(), error = %e,
                "could not remove what a COPY left in its staging folder");
            return;
        }
        if self.staging_in_place() {
            // SAFETY: a NUL-terminated name relative to a valid descriptor.
            unsafe {
                libc::unlinkat(
                    self.parent.as_raw_fd(),
                    self.staging_name.as_ptr(),
                    libc::AT_REMOVEDIR,
                )
            };
        }
    }
}

enum Refusal {
    /// Something a COPY never makes: nothing may be moved.
    Unsafe(String),
    /// An error moving legitimate output: it stays staged.
    Failed(String),
}

/// The local path of a COPY target (`/a/b`, `a/b`, `file:///a/b`).
pub(crate) fn local_path(url: &str) -> Option<PathBuf> {
    if let Some(path) = url.strip_prefix("file://") {
        return Some(PathBuf::from(path));
    }
    if url.contains("://") {
        return None;
    }
    Some(Path::new(url.trim_end_matches('/')).to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    /// A folder holding a key, an output folder, and a staged COPY of one
    /// CSV row to `out/result.csv` that has run (its output staged).
    async fn staged_run(base: &Path) -> (PathBuf, PathBuf, StagedCopy) {
        let key_folder = base.join("key");
        std::fs::create_dir_all(&key_folder).unwrap();
        std::fs::write(key_folder.join("cluster.key"), "the cluster key").unwrap();
        let out = base.join("out");
        std::fs::create_dir_all(&out).unwrap();
        let ctx = SessionContext::new();
        let sql = format!(
            "COPY (SELECT 1 AS x) TO '{}' STORED AS CSV",
            out.join("result.csv").display()
        );
        let plan = ctx.sql(&sql).await.unwrap().logical_plan().clone();
        let staged = StagedCopy::prepare(&plan)
            .unwrap()
            .expect("a local COPY is staged");
        ctx.execute_logical_plan(staged.plan.clone())
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        (key_folder, out, staged)
    }

    fn staging_folder(out: &Path) -> PathBuf {
        std::fs::read_dir(out)
            .unwrap()
            .flatten()
            .map(|entry| entry.path())
            .find(|path| {
                path.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(".dfship-staging-")
            })
            .expect("a staging folder")
    }

    fn assert_key_untouched(key_folder: &Path, out: &Path) {
        assert_eq!(
            std::fs::read_to_string(key_folder.join("cluster.key")).unwrap(),
            "the cluster key"
        );
        let moved: Vec<_> = walk(out)
            .into_iter()
            .filter(|path| path.file_name().is_some_and(|n| n == "cluster.key"))
            .collect();
        assert!(moved.is_empty(), "the key was moved to {moved:?}");
    }

    fn walk(folder: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(folder).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                found.extend(walk(&path));
            }
            found.push(path);
        }
        found
    }

    #[tokio::test]
    async fn a_staging_folder_swapped_for_one_holding_a_symlink_to_the_keys_folder_moves_nothing() {
        let base = tempfile::tempdir().unwrap();
        let (key_folder, out, staged) = staged_run(base.path()).await;
        // What a UDF did while the query ran: the staging folder moved away,
        // one of the same name holding `result.csv` -> the key's folder, and
        // the target made a folder (so a path-following commit moves each
        // entry of the key's folder into it).
        let staging = staging_folder(&out);
        std::fs::rename(&staging, out.join("moved")).unwrap();
        std::fs::create_dir(&staging).unwrap();
        std::os::unix::fs::symlink(&key_folder, staging.join("result.csv")).unwrap();
        std::fs::create_dir(out.join("result.csv")).unwrap();

        let error = staged.commit().unwrap_err().to_string();
        assert!(
            error.contains("not committed") && error.contains("moved or replaced"),
            "{error}"
        );
        assert_key_untouched(&key_folder, &out);
        // What is at the staging name is not ours: left alone, not followed.
        assert!(std::fs::symlink_metadata(staging.join("result.csv"))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[tokio::test]
    async fn a_symlink_planted_in_the_staging_folder_or_a_changed_target_fails_the_copy() {
        let base = tempfile::tempdir().unwrap();
        // The staged output itself replaced by a symlink to the key's folder.
        let (key_folder, out, staged) = staged_run(base.path()).await;
        let staging = staging_folder(&out);
        std::fs::remove_file(staging.join("result.csv")).unwrap();
        std::os::unix::fs::symlink(&key_folder, staging.join("result.csv")).unwrap();
        let error = staged.commit().unwrap_err().to_string();
        assert!(error.contains("symlink"), "{error}");
        assert_key_untouched(&key_folder, &out);
        assert!(!staging.exists(), "the staging folder is removed");
        assert!(!out.join("result.csv").exists());

        // The target turned into a folder while the query ran.
        let base = tempfile::tempdir().unwrap();
        let (key_folder, out, staged) = staged_run(base.path()).await;
        std::fs::create_dir(out.join("result.csv")).unwrap();
        let error = staged.commit().unwrap_err().to_string();
        assert!(error.contains("was absent and is now a folder"), "{error}");
        assert_key_untouched(&key_folder, &out);

        // Untouched: the output lands where asked, the staging folder goes.
        let base = tempfile::tempdir().unwrap();
        let (_, out, staged) = staged_run(base.path()).await;
        staged.commit().unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("result.csv")).unwrap(),
            "x\n1\n"
        );
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    }

    #[test]
    fn local_copy_targets() {
        assert_eq!(local_path("/tmp/x/"), Some(PathBuf::from("/tmp/x")));
        assert_eq!(
            local_path("file:///tmp/y.parquet"),
            Some(PathBuf::from("/tmp/y.parquet"))
        );
        assert_eq!(local_path("s3://bucket/key"), None);
    }
}
