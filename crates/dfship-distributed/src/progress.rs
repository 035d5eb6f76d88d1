//! How far a running query has got: the tasks of every stage the workers
//! run (running, done, total) and the rows their Python UDFs have processed.
//!
//! Built on datafusion-distributed 4.0's `ObservabilityService`, which every
//! dfship worker serves beside its worker service (behind the same cluster
//! key check): `GetTaskProgress` lists the tasks a worker holds now, with
//! their query id, stage and task number. The watcher counts a task *done*
//! once it has been seen and is gone again, and every task done when the
//! query ends. In 4.0 a worker keeps a query's tasks until the coordinator
//! closes the query, so mid-query tasks show as running and *done* reaches
//! the total at the end; and its `output_rows` reads the plan as decoded,
//! not the one executing, so it stays 0. Rows therefore come from dfship's
//! own per-task UDF figures (the payload service's `UdfFigures`), which
//! rise while Python UDFs run. The stages and their task counts come from
//! the coordinator's own distributed plan (the [`NetworkBoundary`] nodes),
//! the query id from the same place; the coordinator's own final stage is
//! not listed (it is the caller's stream).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use datafusion::physical_plan::ExecutionPlan;
use datafusion_distributed::grpc::GetTaskProgressRequest;
use datafusion_distributed::{NetworkBoundaryExt, Stage};
use url::Url;
use uuid::Uuid;

use crate::channel::InlineUdfChannelResolver;

/// One stage's progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageProgress {
    /// The stage number, as `explain` shows it.
    pub stage: usize,
    /// Its tasks.
    pub tasks: usize,
    /// Tasks finished.
    pub done: usize,
    /// Tasks a worker holds now.
    pub running: usize,
    /// Rows the stage's Python UDFs have processed so far (per task, the
    /// most rows any of its scalar UDFs saw; 0 for stages without one).
    pub rows: u64,
}

/// A query's progress: every stage the workers run, by stage number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryProgress {
    pub stages: Vec<StageProgress>,
    /// True once the query has ended (then every task counts as done).
    pub finished: bool,
}

impl QueryProgress {
    /// Tasks done and tasks in all, over every stage.
    pub fn tasks(&self) -> (usize, usize) {
        self.stages
            .iter()
            .fold((0, 0), |(done, all), s| (done + s.done, all + s.tasks))
    }
}

/// Called with each new view of a query's progress (from a tokio task: keep it short).
pub type ProgressCallback = Arc<dyn Fn(&QueryProgress) + Send + Sync>;

/// The query id and `(stage, tasks)` of every stage under a network
/// boundary of `plan` (a planned distributed query).
pub fn stages_of(plan: &Arc<dyn ExecutionPlan>) -> Option<(Uuid, BTreeMap<usize, usize>)> {
    fn walk(
        plan: &Arc<dyn ExecutionPlan>,
        query: &mut Option<Uuid>,
        stages: &mut BTreeMap<usize, usize>,
    ) {
        if let Some(boundary) = plan.as_network_boundary() {
            let stage = boundary.input_stage();
            query.get_or_insert(stage.query_id());
            stages.insert(stage.num(), stage.task_count());
            if let Stage::Local(local) = stage {
                walk(&local.plan, query, stages);
            }
        }
        for child in plan.children() {
            walk(child, query, stages);
        }
    }
    let mut query = None;
    let mut stages = BTreeMap::new();
    walk(plan, &mut query, &mut stages);
    query.map(|query| (query, stages))
}

/// What the watcher has seen of one query.
struct Seen {
    stages: BTreeMap<usize, usize>,
    /// (stage, task) seen at least once, with the most rows reported.
    tasks: HashMap<(usize, usize), u64>,
    /// (stage, task) held by a worker in the last round.
    running: BTreeSet<(usize, usize)>,
}

impl Seen {
    fn view(&self, finished: bool) -> QueryProgress {
        let stages = self
            .stages
            .iter()
            .map(|(&stage, &tasks)| {
                let of_stage = |&&(s, _): &&(usize, usize)| s == stage;
                let seen = self.tasks.keys().filter(of_stage).count();
                let running = self.running.iter().filter(of_stage).count();
                let rows = self
                    .tasks
                    .iter()
                    .filter(|((s, _), _)| *s == stage)
                    .map(|(_, rows)| rows)
                    .sum();
                StageProgress {
                    stage,
                    tasks,
                    done: if finished {
                        tasks
                    } else {
                        (seen - running).min(tasks)
                    },
                    running: if finished { 0 } else { running },
                    rows,
                }
            })
            .collect();
        QueryProgress { stages, finished }
    }
}

/// Polls `workers` every `interval` for the tasks of `query` and calls
/// `callback` whenever the view changes, until dropped; [`Self::finish`]
/// reports the final view.
pub struct ProgressWatcher {
    seen: Arc<std::sync::Mutex<Seen>>,
    poller: Arc<Poller>,
    callback: ProgressCallback,
    task: tokio::task::JoinHandle<()>,
}

/// Where and what to ask.
struct Poller {
    query: Uuid,
    workers: Vec<Url>,
    channels: InlineUdfChannelResolver,
}

impl ProgressWatcher {
    pub fn start(
        query: Uuid,
        stages: BTreeMap<usize, usize>,
        workers: Vec<Url>,
        channels: InlineUdfChannelResolver,
        interval: Duration,
        callback: ProgressCallback,
    ) -> Self {
        let seen = Arc::new(std::sync::Mutex::new(Seen {
            stages,
            tasks: HashMap::new(),
            running: BTreeSet::new(),
        }));
        callback(&lock(&seen).view(false));
        let poller = Arc::new(Poller {
            query,
            workers,
            channels,
        });
        let task = tokio::spawn(poll(
            Arc::clone(&poller),
            interval,
            Arc::clone(&seen),
            Arc::clone(&callback),
        ));
        Self {
            seen,
            poller,
            callback,
            task,
        }
    }

    /// Stops polling; with `succeeded`, asks the workers once more (the
    /// rows of the last moments) and reports every task done.
    pub async fn finish(self, succeeded: bool) {
        self.task.abort();
        if succeeded {
            poll_round(&self.poller, &self.seen).await;
            (self.callback)(&lock(&self.seen).view(true));
        }
    }
}

impl Drop for ProgressWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(seen: &std::sync::Mutex<Seen>) -> std::sync::MutexGuard<'_, Seen> {
    seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn poll(
    poller: Arc<Poller>,
    interval: Duration,
    seen: Arc<std::sync::Mutex<Seen>>,
    callback: ProgressCallback,
) {
    let mut last = lock(&seen).view(false);
    loop {
        tokio::time::sleep(interval).await;
        let view = poll_round(&poller, &seen).await;
        if view != last {
            callback(&view);
            last = view;
        }
    }
}

/// Asks every worker once and folds the answers into `seen`.
async fn poll_round(poller: &Poller, seen: &std::sync::Mutex<Seen>) -> QueryProgress {
    let query_bytes = poller.query.as_bytes().to_vec();
    let mut running = BTreeSet::new();
    let mut rows = HashMap::new();
    for url in &poller.workers {
        // A worker that does not answer (lost, draining) just shows no
        // tasks this round: the query's own error handling deals with it.
        let Ok(mut client) = poller.channels.observability_client(url).await else {
            continue;
        };
        let Ok(reply) = client.get_task_progress(GetTaskProgressRequest {}).await else {
            continue;
        };
        for task in reply.into_inner().tasks {
            let Some(key) = task.task_key else { continue };
            if key.query_id != query_bytes {
                continue;
            }
            let id = (key.stage_id as usize, key.task_number as usize);
            running.insert(id);
            rows.entry(id).or_insert(0);
        }
        // Rows so far: what the task's Python UDFs have processed (the
        // workers' own `output_rows` stay 0 in datafusion-distributed 4.0).
        let Ok(channel) = poller.channels.raw_channel(url).await else {
            continue;
        };
        if let Ok(figures) = crate::payloads::fetch_udf_figures(channel, poller.query).await {
            for f in figures {
                let id = (f.stage as usize, f.task as usize);
                let entry = rows.entry(id).or_insert(0);
                *entry = (*entry).max(f.rows);
            }
        }
    }
    let mut seen = lock(seen);
    for (id, count) in rows {
        if seen.stages.contains_key(&id.0) {
            let entry = seen.tasks.entry(id).or_default();
            *entry = (*entry).max(count);
        }
    }
    // Only what GetTaskProgress listed is running; a task known only from
    // its figures has been seen.
    seen.running = running;
    seen.view(false)
}
