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
//!   the list.
//!
//! The probe runs as a task on the runtime that plans queries (it is started
//! by the first `get_urls` and restarted if that runtime went away), over its
//! own connections, so it never shares a connection with query traffic.

use std::collections::HashMap;
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
}

impl Default for MembershipOptions {
    /// Probes every 2 s, each given 5 s.
    fn default() -> Self {
        Self {
            probe_interval: Duration::from_secs(2),
            probe_timeout: Duration::from_secs(5),
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

struct Inner {
    workers: Vec<Url>,
    health: Mutex<HashMap<Url, Entry>>,
    options: MembershipOptions,
    probe: Option<ProbeFn>,
    prober: Mutex<Option<tokio::task::JoinHandle<()>>>,
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
    /// and a worker once down stays down).
    pub fn new(
        workers: Vec<Url>,
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
        let now = Instant::now();
        let health = workers
            .iter()
            .map(|url| {
                (
                    url.clone(),
                    Entry {
                        health: WorkerHealth::Live,
                        since: now,
                    },
                )
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                workers,
                health: Mutex::new(health),
                options,
                probe,
                prober: Mutex::new(None),
            }),
        }
    }

    /// Every configured worker.
    pub fn workers(&self) -> &[Url] {
        &self.inner.workers
    }

    /// Each configured worker with what is believed about it, in list order.
    pub fn snapshot(&self) -> Vec<(Url, WorkerHealth)> {
        let health = self.inner.health.lock().unwrap_or_else(|e| e.into_inner());
        self.inner
            .workers
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
        let mut health = self.inner.health.lock().unwrap_or_else(|e| e.into_inner());
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
        let mut prober = self.inner.prober.lock().unwrap_or_else(|e| e.into_inner());
        if prober.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        *prober = Some(runtime.spawn(probe_loop(weak, probe)));
    }

    /// Probes every worker once, now, and waits for the answers.
    pub async fn probe_all(&self) {
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
    let probes = membership.inner.workers.iter().map(|url| {
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
        probe_round(&Membership { inner }, &probe).await;
    }
}

impl WorkerResolver for Membership {
    /// The live workers; an error naming every worker's cause when none is.
    fn get_urls(&self) -> Result<Vec<Url>> {
        self.ensure_prober();
        let live = self.live();
        if !live.is_empty() {
            return Ok(live);
        }
        let causes: Vec<String> = self
            .snapshot()
            .into_iter()
            .map(|(url, health)| match health {
                WorkerHealth::Down { cause } => format!("{url}: {cause}"),
                WorkerHealth::Live => format!("{url}: live"),
            })
            .collect();
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
        let m = Membership::new(workers.clone(), MembershipOptions::default(), None);
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
}
