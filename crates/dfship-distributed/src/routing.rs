//! Which worker runs which task.
//!
//! datafusion-distributed 4.0 routes a stage's tasks round-robin from a
//! *random* first worker. When a stage has fewer tasks than there are
//! workers, which workers take part changes from run to run, so the same
//! query can pass on one run and fail on the next when a worker is
//! misconfigured (another Python version, a missing module), and load is
//! uneven. [`RoundRobinRouting`] deals tasks round-robin from a cursor that
//! advances across stages and queries of one context, starting at the first
//! worker listed: stages are spread evenly and runs are reproducible.
//! Single-task stages are left to upstream, which may keep them on the
//! coordinator. Tasks go to the workers [`Membership`] believes alive.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use datafusion::error::{DataFusionError, Result};
use datafusion_distributed::{RouteTasksEvent, RouteTasksEventResponse, RouteTasksHandler};

use crate::membership::Membership;

/// Round-robin task routing over the live workers (see the module docs).
#[derive(Debug, Clone)]
pub struct RoundRobinRouting {
    workers: Membership,
    cursor: Arc<AtomicUsize>,
}

impl RoundRobinRouting {
    pub fn new(workers: Membership) -> Self {
        Self {
            workers,
            cursor: Arc::default(),
        }
    }
}

impl RouteTasksHandler for RoundRobinRouting {
    fn handle(&self, event: RouteTasksEvent) -> Option<Result<RouteTasksEventResponse>> {
        if event.task_count <= 1 {
            return None;
        }
        let workers = self.workers.live();
        if workers.is_empty() {
            return Some(Err(DataFusionError::Execution(format!(
                "{} no live worker to route a stage's tasks to: every worker was lost while \
                 this query was planned",
                dfship_codec::ErrorKind::WorkerLost.tag()
            ))));
        }
        let start = self.cursor.fetch_add(event.task_count, Ordering::Relaxed);
        let urls = (0..event.task_count)
            .map(|i| workers[(start + i) % workers.len()].clone())
            .collect();
        Some(Ok(RouteTasksEventResponse::new(urls)))
    }
}
