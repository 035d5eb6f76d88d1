//! Which workers a coordinator plans on: a live view of its worker list.
//!
//! datafusion-distributed 4.0 asks a `WorkerResolver` for worker URLs once per
//! query plan (`get_urls`, synchronous) and routes each stage's tasks over
//! them. [`Membership`] answers with the workers it believes alive:
//!
//! - a worker is **down** when a query lost it (the retry loop in
//!   `crate::retry` reports the URL an error names) or when a probe fails;
//! - a background **probe** (`GetWorkerInfo`, the cheapest RPC a worker
//!   serves, signed with the cluster key like every other RPC) asks every
//!   worker every `probe_interval`; a down worker that answers is **live**
//!   again and takes work from the next query planned;
//! - a query planned while a worker is down never waits for it: it is not in
//!   the list;
//! - the list itself may change: a [`WorkerSource`] is a URL, a DNS name
//!   (`dns://NAME:PORT`: every A/AAAA record, resolved again every
//!   `resolve_interval`, since `get_urls` cannot wait for a resolver) or a
//!   file of entries (`file:///PATH`, read again when it changes). A worker
//!   that appears is planned on from the next query; one that disappears is
//!   not.
//!
//! The probe runs as a task on the runtime that plans queries (it is started
//! by the first `get_urls` and restarted if that runtime went away), over its
//! own connections, so it never shares a connection with query traffic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use datafusion::error::{DataFusionError, Result};
use datafusion_distributed::{ChannelResolver, GetWorkerInfoRequest, WorkerResolver};
use dfship_codec::ErrorKind;
use url::Url;

/// How a coordinator learns which workers are alive.
#[derive(Debug, Clone)]
pub struct MembershipOptions {
    /// How often every worker is probed.
    pub probe_interval: Duration,
    /// How long a probe may take before the worker counts as down.
    pub probe_timeout: Duration,
    /// How often `dns://` sources are resolved again.
    pub resolve_interval: Duration,
}

impl Default for MembershipOptions {
    /// Probes every 2 s, each given 5 s; names resolved every 5 s.
    fn default() -> Self {
        Self {
            probe_interval: Duration::from_secs(2),
            probe_timeout: Duration::from_secs(5),
            resolve_interval: Duration::from_secs(5),
        }
    }
}

/// What the coordinator believes about one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerHealth {
    /// Answers probes; planned on.
    Live,
    /// Lost by a query or failed a probe: not planned on until a probe
    /// succeeds. `cause` says what happened.
    Down { cause: String },
}

#[derive(Debug)]
struct Entry {
    health: WorkerHealth,
    since: Instant,
}

/// Probes one worker; `Err` holds why it is not usable.
type ProbeFn = Arc<
    dyn Fn(Url) -> futures::future::BoxFuture<'static, std::result::Result<(), String>>
        + Send
        + Sync,
>;

/// Where worker URLs come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerSource {
    /// One worker.
    Url(Url),
    /// Every address `host` resolves to, each as `http://ADDRESS:port`.
    Dns { host: String, port: u16 },
    /// A file of sources, one per line (`#` starts a comment).
    File(PathBuf),
}

impl WorkerSource {
    /// `http(s)://HOST:PORT`, `dns://NAME:PORT` or `file:///PATH`.
    pub fn parse(text: &str) -> Result<Self> {
        let text = text.trim();
        let bad = |why: String| {
            DataFusionError::Configuration(format!(
                "'{text}' is not a worker ({why}); write http://HOST:PORT, dns://NAME:PORT or \
                 file:///PATH"
            ))
        };
        let url = Url::parse(text).map_err(|e| bad(e.to_string()))?;
        match url.scheme() {
            "http" | "https" => Ok(Self::Url(url)),
            "dns" => {
                let host = url
                    .host_str()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| bad("no name to resolve".into()))?;
                let port = url
                    .port()
                    .ok_or_else(|| bad("no port: the workers' port is not in DNS".into()))?;
                Ok(Self::Dns {
                    host: host.to_string(),
                    port,
                })
            }
            "file" => url
                .to_file_path()
                .map(Self::File)
                .map_err(|_| bad("not a local path".into())),
            other => Err(bad(format!("unknown scheme '{other}'"))),
        }
    }
}

impl std::fmt::Display for WorkerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Url(url) => write!(f, "{url}"),
            Self::Dns { host, port } => write!(f, "dns://{host}:{port}"),
            Self::File(path) => write!(f, "file://{}", path.display()),
        }
    }
}

/// What the sources gave last time, and when names were last resolved.
#[derive(Debug, Default)]
struct Resolved {
    /// Per source: its URLs, or why it gave none.
    by_source: Vec<std::result::Result<Vec<Url>, String>>,
    files: HashMap<PathBuf, Option<std::time::SystemTime>>,
    names_at: Option<Instant>,
}

struct Inner {
    sources: Vec<WorkerSource>,
    resolved: Mutex<Resolved>,
    workers: Mutex<Vec<Url>>,
    health: Mutex<HashMap<Url, Entry>>,
    options: MembershipOptions,
    probe: Option<ProbeFn>,
    prober: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Whether a probe round has finished.
    probed: std::sync::atomic::AtomicBool,
}

/// The live view of a coordinator's workers (see the module docs). Cheap to
/// clone; every clone shares the view.
#[derive(Clone)]
pub struct Membership {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("workers", &self.snapshot())
            .finish()
    }
}

impl Membership {
    /// Every worker starts live; with `channels`, a background probe keeps
    /// the view true (without, only failures reported by queries change it,
    /// and a worker once down stays down). Sources are read once here (a
    /// name that does not resolve yet gives no worker until it does).
    pub fn new(
        sources: Vec<WorkerSource>,
        options: MembershipOptions,
        channels: Option<Arc<dyn ChannelResolver + Send + Sync>>,
    ) -> Self {
        let probe = channels.map(|channels| -> ProbeFn {
            Arc::new(move |url: Url| {
                let channels = Arc::clone(&channels);
                Box::pin(async move {
                    let mut client = channels
                        .get_worker_client_for_url(&url)
                        .await
                        .map_err(|e| e.to_string())?;
                    client
                        .get_worker_info(GetWorkerInfoRequest {})
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                })
            })
        });
        let membership = Self {
            inner: Arc::new(Inner {
                sources,
                resolved: Mutex::default(),
                workers: Mutex::default(),
                health: Mutex::default(),
                options,
                probe,
                prober: Mutex::new(None),
                probed: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        membership.refresh_blocking();
        membership
    }

    /// Fixed worker URLs.
    pub fn of_urls(urls: Vec<Url>, options: MembershipOptions) -> Self {
        Self::new(
            urls.into_iter().map(WorkerSource::Url).collect(),
            options,
            None,
        )
    }

    /// Every worker the sources give now.
    pub fn workers(&self) -> Vec<Url> {
        lock(&self.inner.workers).clone()
    }

    /// Reads the sources, resolving names with the blocking resolver (at
    /// construction, before any runtime may be at hand).
    fn refresh_blocking(&self) {
        let mut resolved = lock(&self.inner.resolved);
        resolved.by_source = self
            .inner
            .sources
            .iter()
            .map(|source| read_source(source, &mut resolved.files, &resolve_blocking))
            .collect();
        resolved.names_at = Some(Instant::now());
        self.adopt(&resolved);
    }

    /// Reads changed files, and resolves names when `resolve_interval` has
    /// passed; called by the probe before each round.
    async fn refresh(&self) {
        let due = lock(&self.inner.resolved)
            .names_at
            .is_none_or(|at| at.elapsed() >= self.inner.options.resolve_interval);
        let mut names: HashMap<(String, u16), std::result::Result<Vec<Url>, String>> =
            HashMap::new();
        if due {
            for (host, port) in self.inner.sources.iter().flat_map(source_names) {
                let found = resolve(&host, port).await;
                names.insert((host, port), found);
            }
        }
        let mut resolved = lock(&self.inner.resolved);
        let mut files = std::mem::take(&mut resolved.files);
        let previous = std::mem::take(&mut resolved.by_source);
        resolved.by_source = self
            .inner
            .sources
            .iter()
            .zip(previous)
            .map(|(source, before)| match source {
                WorkerSource::Url(url) => Ok(vec![url.clone()]),
                WorkerSource::Dns { host, port } => {
                    names.remove(&(host.clone(), *port)).unwrap_or(before)
                }
                WorkerSource::File(path) => {
                    let changed = files.get(path).cloned().flatten() != modified(path);
                    if changed {
                        read_source(source, &mut files, &|host, port| {
                            names
                                .get(&(host.to_string(), port))
                                .cloned()
                                .unwrap_or_else(|| resolve_blocking(host, port))
                        })
                    } else {
                        before
                    }
                }
            })
            .collect();
        resolved.files = files;
        if due {
            resolved.names_at = Some(Instant::now());
        }
        self.adopt(&resolved);
    }

    /// Makes what the sources gave the worker list: new workers start live,
    /// workers no source gives any more are forgotten.
    fn adopt(&self, resolved: &Resolved) {
        let mut urls: Vec<Url> = Vec::new();
        for url in resolved.by_source.iter().flatten().flatten() {
            if !urls.contains(url) {
                urls.push(url.clone());
            }
        }
        let mut health = lock(&self.inner.health);
        let mut workers = lock(&self.inner.workers);
        if *workers != urls {
            let joined: Vec<&Url> = urls.iter().filter(|u| !workers.contains(u)).collect();
            let left: Vec<&Url> = workers.iter().filter(|u| !urls.contains(u)).collect();
            if !workers.is_empty() || !joined.is_empty() {
                tracing::info!(?joined, ?left, "worker list changed");
            }
        }
        health.retain(|url, _| urls.contains(url));
        for url in &urls {
            health.entry(url.clone()).or_insert_with(|| Entry {
                health: WorkerHealth::Live,
                since: Instant::now(),
            });
        }
        *workers = urls;
    }

    /// Why each source that gave no worker gave none.
    fn source_errors(&self) -> Vec<String> {
        let resolved = lock(&self.inner.resolved);
        self.inner
            .sources
            .iter()
            .zip(&resolved.by_source)
            .filter_map(|(source, result)| match result {
                Err(why) => Some(format!("{source}: {why}")),
                Ok(urls) if urls.is_empty() => Some(format!("{source}: gave no worker")),
                Ok(_) => None,
            })
            .collect()
    }

    /// Each configured worker with what is believed about it, in list order.
    pub fn snapshot(&self) -> Vec<(Url, WorkerHealth)> {
        let health = lock(&self.inner.health);
        self.workers()
            .iter()
            .map(|url| {
                let state = health
                    .get(url)
                    .map(|e| e.health.clone())
                    .unwrap_or(WorkerHealth::Live);
                (url.clone(), state)
            })
            .collect()
    }

    /// The workers to plan on, in list order.
    pub fn live(&self) -> Vec<Url> {
        self.snapshot()
            .into_iter()
            .filter(|(_, health)| *health == WorkerHealth::Live)
            .map(|(url, _)| url)
            .collect()
    }

    /// A query lost `url` because of `cause`: plan without it until it
    /// answers a probe again. Unknown URLs (a peer's peer) are ignored.
    pub fn report_lost(&self, url: &Url, cause: &str) {
        self.set(url, Err(cause.to_string()));
    }

    fn set(&self, url: &Url, result: std::result::Result<(), String>) {
        let mut health = lock(&self.inner.health);
        let Some(entry) = health.get_mut(url) else {
            return;
        };
        let next = match result {
            Ok(()) => WorkerHealth::Live,
            Err(cause) => WorkerHealth::Down { cause },
        };
        let changed = std::mem::discriminant(&entry.health) != std::mem::discriminant(&next);
        if changed {
            match &next {
                WorkerHealth::Live => tracing::info!(
                    worker = %url,
                    down_for = ?entry.since.elapsed(),
                    "worker answers again: planned on from the next query"
                ),
                WorkerHealth::Down { cause } => tracing::warn!(
                    worker = %url,
                    %cause,
                    "worker down: not planned on until it answers a probe"
                ),
            }
            entry.since = Instant::now();
        }
        entry.health = next;
    }

    /// Starts the probe on the current runtime unless it runs already.
    fn ensure_prober(&self) {
        let Some(probe) = self.inner.probe.clone() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut prober = lock(&self.inner.prober);
        if prober.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        *prober = Some(runtime.spawn(probe_loop(weak, probe)));
    }

    /// Probes every worker once unless a probe round has finished already:
    /// the first query of a coordinator then plans only on workers that
    /// answer (a worker down or misconfigured from the start is not
    /// mistaken for one lost mid-query).
    pub async fn ensure_probed(&self) {
        if !self.inner.probed.load(std::sync::atomic::Ordering::Acquire) {
            self.probe_all().await;
        }
    }

    /// Reads the sources and probes every worker once, now.
    pub async fn probe_all(&self) {
        self.refresh().await;
        if let Some(probe) = self.inner.probe.clone() {
            probe_round(self, &probe).await;
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.prober.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

async fn probe_round(membership: &Membership, probe: &ProbeFn) {
    let timeout = membership.inner.options.probe_timeout;
    let probes = membership.workers().into_iter().map(|url| {
        let probe = Arc::clone(probe);
        let url = url.clone();
        async move {
            let result = match tokio::time::timeout(timeout, probe(url.clone())).await {
                Ok(result) => result,
                Err(_) => Err(format!("did not answer a probe within {timeout:?}")),
            };
            (url, result)
        }
    });
    for (url, result) in futures::future::join_all(probes).await {
        membership.set(&url, result);
    }
    membership
        .inner
        .probed
        .store(true, std::sync::atomic::Ordering::Release);
}

/// Probes every interval (the first round one interval after the first
/// query: workers start live) until the membership is dropped.
async fn probe_loop(inner: Weak<Inner>, probe: ProbeFn) {
    loop {
        let Some(interval) = inner.upgrade().map(|i| i.options.probe_interval) else {
            return;
        };
        tokio::time::sleep(interval).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let membership = Membership { inner };
        membership.refresh().await;
        probe_round(&membership, &probe).await;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The names a source resolves (a file's are read with it).
fn source_names(source: &WorkerSource) -> Vec<(String, u16)> {
    match source {
        WorkerSource::Dns { host, port } => vec![(host.clone(), *port)],
        _ => Vec::new(),
    }
}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// A source's URLs, or why it gave none.
type Found = std::result::Result<Vec<Url>, String>;

/// The URLs of one source; `resolve` answers names.
fn read_source(
    source: &WorkerSource,
    files: &mut HashMap<PathBuf, Option<std::time::SystemTime>>,
    resolve: &dyn Fn(&str, u16) -> Found,
) -> Found {
    match source {
        WorkerSource::Url(url) => Ok(vec![url.clone()]),
        WorkerSource::Dns { host, port } => resolve(host, *port),
        WorkerSource::File(path) => {
            files.insert(path.clone(), modified(path));
            check_list_permissions(path)?;
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the worker list: {e}"))?;
            let mut urls = Vec::new();
            for line in text.lines() {
                let line = line.split('#').next().unwrap_or_default().trim();
                if line.is_empty() {
                    continue;
                }
                match WorkerSource::parse(line).map_err(|e| e.to_string())? {
                    WorkerSource::File(_) => {
                        return Err(format!("'{line}': a worker list cannot name another file"))
                    }
                    inner => urls.extend(read_source(&inner, files, resolve)?),
                }
            }
            Ok(urls)
        }
    }
}

/// Refuses a worker list other users may write: whoever writes it chooses
/// where this coordinator sends its plans.
fn check_list_permissions(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| format!("cannot read the worker list: {e}"))?
        .permissions()
        .mode();
    if mode & 0o022 != 0 {
        return Err(format!(
            "the worker list {} may be written by other users (mode {:o}): whoever writes it \
             chooses where this coordinator sends its queries; make it writable by its owner \
             only (chmod go-w {})",
            path.display(),
            mode & 0o777,
            path.display()
        ));
    }
    Ok(())
}

fn address_url(address: std::net::SocketAddr) -> Option<Url> {
    Url::parse(&format!("http://{address}")).ok()
}

fn sorted_urls(addresses: impl Iterator<Item = std::net::SocketAddr>) -> Vec<Url> {
    let mut addresses: Vec<_> = addresses.collect();
    addresses.sort();
    addresses.dedup();
    addresses.into_iter().filter_map(address_url).collect()
}

fn resolve_blocking(host: &str, port: u16) -> std::result::Result<Vec<Url>, String> {
    use std::net::ToSocketAddrs;
    (host, port)
        .to_socket_addrs()
        .map(sorted_urls)
        .map_err(|e| format!("does not resolve: {e}"))
}

async fn resolve(host: &str, port: u16) -> std::result::Result<Vec<Url>, String> {
    tokio::net::lookup_host((host, port))
        .await
        .map(sorted_urls)
        .map_err(|e| format!("does not resolve: {e}"))
}

impl WorkerResolver for Membership {
    /// The live workers; an error naming every worker's cause when none is.
    fn get_urls(&self) -> Result<Vec<Url>> {
        self.ensure_prober();
        let live = self.live();
        if !live.is_empty() {
            return Ok(live);
        }
        let mut causes: Vec<String> = self
            .snapshot()
            .into_iter()
            .map(|(url, health)| match health {
                WorkerHealth::Down { cause } => format!("{url}: {cause}"),
                WorkerHealth::Live => format!("{url}: live"),
            })
            .collect();
        causes.extend(self.source_errors());
        // Workers that refuse this coordinator's key are up: that is a
        // setting to fix, not a loss to wait out or retry.
        let refused = ErrorKind::Unauthenticated.tag();
        if !causes.is_empty() && causes.iter().all(|cause| cause.contains(&refused)) {
            return Err(DataFusionError::Execution(format!(
                "{refused} no worker accepts this coordinator's requests: {}",
                causes.join("; ")
            )));
        }
        Err(DataFusionError::Execution(format!(
            "{} no live worker to plan on: {}; start the workers (or fix the network to them): \
             they are taken back as soon as they answer a probe",
            ErrorKind::WorkerLost.tag(),
            causes.join("; ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(n: usize) -> Vec<Url> {
        (0..n)
            .map(|i| Url::parse(&format!("http://127.0.0.1:{}", 7000 + i)).unwrap())
            .collect()
    }

    #[test]
    fn lost_workers_leave_the_plan_and_all_lost_is_an_error_naming_each() {
        let workers = urls(3);
        let m = Membership::of_urls(workers.clone(), MembershipOptions::default());
        assert_eq!(m.live(), workers);
        m.report_lost(&workers[1], "connection reset");
        assert_eq!(
            m.get_urls().unwrap(),
            vec![workers[0].clone(), workers[2].clone()]
        );
        m.report_lost(&Url::parse("http://elsewhere:1").unwrap(), "x");
        m.report_lost(&workers[0], "gone");
        m.report_lost(&workers[2], "refused");
        let error = m.get_urls().unwrap_err().to_string();
        for (url, cause) in workers.iter().zip(["gone", "connection reset", "refused"]) {
            assert!(error.contains(&format!("{url}: {cause}")), "{error}");
        }
        m.set(&workers[1], Ok(()));
        assert_eq!(m.get_urls().unwrap(), vec![workers[1].clone()]);
    }

    #[test]
    fn sources_parse_and_refuse_what_they_cannot_use() {
        assert_eq!(
            WorkerSource::parse("dns://workers:50051").unwrap(),
            WorkerSource::Dns {
                host: "workers".into(),
                port: 50051
            }
        );
        assert_eq!(
            WorkerSource::parse("file:///etc/dfship/workers").unwrap(),
            WorkerSource::File(PathBuf::from("/etc/dfship/workers"))
        );
        for bad in ["dns://workers", "ftp://x:1", "10.0.0.1:5", "dns://:5"] {
            let error = WorkerSource::parse(bad).unwrap_err().to_string();
            assert!(error.contains("dns://NAME:PORT"), "{bad}: {error}");
        }
    }

    /// Sets `path`'s modification time `seconds` from now: a change a
    /// refresh sees whatever the clock's resolution.
    fn modified_in(path: &Path, seconds: u64) {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(std::time::SystemTime::now() + Duration::from_secs(seconds))
            .unwrap();
    }

    #[tokio::test]
    async fn a_worker_file_is_read_again_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("workers");
        std::fs::write(&path, "# the cluster\nhttp://a:1\ndns://localhost:7\n").unwrap();
        let m = Membership::new(
            vec![WorkerSource::File(path.clone())],
            MembershipOptions::default(),
            None,
        );
        let hosts: Vec<String> = m.workers().iter().map(|u| u.to_string()).collect();
        assert_eq!(hosts[0], "http://a:1/");
        assert!(hosts.iter().any(|h| h.ends_with(":7/")), "{hosts:?}");
        m.report_lost(&Url::parse("http://a:1").unwrap(), "gone");
        // A later modification time, whatever the clock's resolution.
        std::fs::write(&path, "http://b:2\nhttp://a:1\n").unwrap();
        modified_in(&path, 5);
        m.refresh().await;
        assert_eq!(
            m.live(),
            vec![Url::parse("http://b:2").unwrap()],
            "b joined; a stays down"
        );
        std::fs::write(&path, "").unwrap();
        modified_in(&path, 10);
        m.refresh().await;
        let error = m.get_urls().unwrap_err().to_string();
        assert!(error.contains("gave no worker"), "{error}");
    }

    #[tokio::test]
    async fn a_worker_list_other_users_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("workers");
        std::fs::write(&path, "http://a:1\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let m = Membership::new(
            vec![WorkerSource::File(path.clone())],
            MembershipOptions::default(),
            None,
        );
        let error = m.get_urls().unwrap_err().to_string();
        assert!(error.contains("chmod go-w"), "{error}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        modified_in(&path, 5);
        m.refresh().await;
        assert_eq!(m.live(), vec![Url::parse("http://a:1").unwrap()]);
    }
}
