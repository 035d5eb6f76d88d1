//! How far a running query has got: tasks done out of the total of every
//! stage the workers run, and the rows those tasks have produced.
//!
//! Built on datafusion-distributed 4.0's `ObservabilityService`, which every
//! dfship worker serves beside its worker service (behind the same cluster
//! key check): `GetTaskProgress` lists the tasks a worker holds now, with
//! their query id, stage, task number and output rows so far. A task stays
//! in that list from the moment its plan arrives until the worker drops it
//! when its output is consumed, so the watcher here counts a task *done*
//! once it has been seen and is gone again; tasks that start and end
//! between two polls are counted done when the query ends. The stages and
//! their task counts come from the coordinator's own distributed plan (the
//! [`NetworkBoundary`] nodes), the query id from the same place; the
//! coordinator's own final stage is not listed (it is the caller's stream).

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
    /// Rows the stage's tasks produced so far (as far as the workers told).
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
    callback: ProgressCallback,
    task: tokio::task::JoinHandle<()>,
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
        let task = tokio::spawn(poll(
            query,
            workers,
            channels,
            interval,
            Arc::clone(&seen),
            Arc::clone(&callback),
        ));
        Self {
            seen,
            callback,
            task,
        }
    }

    /// Stops polling; with `succeeded`, reports every task done.
    pub fn finish(self, succeeded: bool) {
        self.task.abort();
        if succeeded {
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
    query: Uuid,
    workers: Vec<Url>,
    channels: InlineUdfChannelResolver,
    interval: Duration,
    seen: Arc<std::sync::Mutex<Seen>>,
    callback: ProgressCallback,
) {
    let query_bytes = query.as_bytes().to_vec();
    let mut last = lock(&seen).view(false);
    loop {
        tokio::time::sleep(interval).await;
        let mut running = BTreeSet::new();
        let mut rows = HashMap::new();
        for url in &workers {
            // A worker that does not answer (lost, draining) just shows no
            // tasks this round: the query's own error handling deals with it.
            let Ok(mut client) = channels.observability_client(url).await else {
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
                rows.insert(id, task.output_rows);
            }
        }
        let view = {
            let mut seen = lock(&seen);
            for (id, count) in rows {
                if seen.stages.contains_key(&id.0) {
                    let entry = seen.tasks.entry(id).or_default();
                    *entry = (*entry).max(count);
                }
            }
            seen.running = running;
            seen.view(false)
        };
        if view != last {
            callback(&view);
            last = view;
        }
    }
}
