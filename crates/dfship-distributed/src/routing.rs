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
//! coordinator.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use datafusion::error::{DataFusionError, Result};
use datafusion_distributed::{RouteTasksEvent, RouteTasksEventResponse, RouteTasksHandler};
use url::Url;

/// Round-robin task routing over a fixed worker list (see the module docs).
#[derive(Debug, Clone)]
pub struct RoundRobinRouting {
    workers: Arc<[Url]>,
    cursor: Arc<AtomicUsize>,
}

impl RoundRobinRouting {
    pub fn new(workers: Vec<Url>) -> Self {
        Self {
            workers: workers.into(),
            cursor: Arc::default(),
        }
    }
}

impl RouteTasksHandler for RoundRobinRouting {
    fn handle(&self, event: RouteTasksEvent) -> Option<Result<RouteTasksEventResponse>> {
        if event.task_count <= 1 {
            return None;
        }
        if self.workers.is_empty() {
            return Some(Err(DataFusionError::Configuration(
                "no worker URLs to route tasks to".to_string(),
            )));
        }
        let start = self.cursor.fetch_add(event.task_count, Ordering::Relaxed);
        let urls = (0..event.task_count)
            .map(|i| self.workers[(start + i) % self.workers.len()].clone())
            .collect();
        Some(Ok(RouteTasksEventResponse::new(urls)))
    }
}
