//! What each Python UDF cost this process, by name: calls, rows, seconds
//! spent waiting for runners (Python time plus the transfer of arguments and
//! results) and failures. Workers serve them on `/metrics`.
//!
//! Names come from plans, so the table is bounded: past [`MAX_NAMES`]
//! distinct names, further ones are counted under [`OTHER`].

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Distinct UDF names kept before new ones fold into [`OTHER`].
pub const MAX_NAMES: usize = 500;
/// Where calls of UDFs past [`MAX_NAMES`] are counted.
pub const OTHER: &str = "(other)";
/// Bytes of a UDF's name kept (longer ones are cut, with `…`): the table and
/// `/metrics` hold at most [`MAX_NAMES`] names of this length.
pub const MAX_NAME_BYTES: usize = 200;

/// `name`, cut to [`MAX_NAME_BYTES`] on a character boundary.
fn bounded(name: &str) -> std::borrow::Cow<'_, str> {
    if name.len() <= MAX_NAME_BYTES {
        return name.into();
    }
    let mut end = MAX_NAME_BYTES;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &name[..end]).into()
}

/// The totals of one UDF in this process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UdfFigures {
    /// Calls sent to runners (a batch sliced by `batch_size` counts each slice).
    pub calls: u64,
    /// Rows passed to the UDF.
    pub rows: u64,
    /// Seconds the engine waited for results (Python plus transfer).
    pub seconds: f64,
    /// Calls that failed (raised, bad result, runner lost, timed out, cancelled).
    pub failures: u64,
}

impl UdfFigures {
    /// Adds `more` to these totals.
    pub fn add(&mut self, more: &UdfFigures) {
        self.calls += more.calls;
        self.rows += more.rows;
        self.seconds += more.seconds;
        self.failures += more.failures;
    }
}

fn table() -> &'static Mutex<BTreeMap<String, UdfFigures>> {
    static TABLE: OnceLock<Mutex<BTreeMap<String, UdfFigures>>> = OnceLock::new();
    TABLE.get_or_init(Default::default)
}

/// Adds one batch's figures to `name`'s totals, and to its task's when the
/// call names one (a worker's task: see [`label_task`]).
pub(crate) fn record(
    name: &str,
    task: Option<&str>,
    calls: u64,
    rows: u64,
    waited: Duration,
    failed: bool,
) {
    let batch = UdfFigures {
        calls,
        rows,
        seconds: waited.as_secs_f64(),
        failures: u64::from(failed),
    };
    let name = &*bounded(name);
    if let Some(task) = task {
        record_for_task(task, name, &batch);
    }
    let mut table = table()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let key = if table.contains_key(name) || table.len() < MAX_NAMES {
        name
    } else {
        OTHER
    };
    table.entry(key.to_string()).or_default().add(&batch);
}

/// Which query, stage and task a worker's task is (from the coordinator's
/// request headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskLabel {
    pub query: [u8; 16],
    pub stage: u64,
    pub task: u64,
}

/// Tasks kept (live and ended) before the oldest ended ones are forgotten.
pub const MAX_TASKS: usize = 4096;

#[derive(Debug, Default)]
struct TaskFigures {
    label: Option<TaskLabel>,
    udfs: BTreeMap<String, UdfFigures>,
    ended: bool,
}

#[derive(Default)]
struct Tasks {
    by_id: std::collections::HashMap<String, TaskFigures>,
    /// Ended task ids, oldest first.
    ended: std::collections::VecDeque<String>,
}

fn tasks() -> std::sync::MutexGuard<'static, Tasks> {
    static TASKS: OnceLock<Mutex<Tasks>> = OnceLock::new();
    TASKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Names the query, stage and task of task `id`, so its figures can be
/// asked for by query ([`query_figures`]).
pub fn label_task(id: &str, label: TaskLabel) {
    let mut tasks = tasks();
    if let Some(entry) = room_for(&mut tasks, id) {
        entry.label = Some(label);
    }
}

/// The query task `id` belongs to, if it was labelled.
pub(crate) fn query_of(id: &str) -> Option<[u8; 16]> {
    tasks()
        .by_id
        .get(id)
        .and_then(|entry| entry.label)
        .map(|label| label.query)
}

/// The entry of task `id`, making room by forgetting the oldest ended
/// tasks; none when [`MAX_TASKS`] live tasks are kept already.
fn room_for<'a>(tasks: &'a mut Tasks, id: &str) -> Option<&'a mut TaskFigures> {
    if !tasks.by_id.contains_key(id) {
        while tasks.by_id.len() >= MAX_TASKS {
            let oldest = tasks.ended.pop_front()?;
            tasks.by_id.remove(&oldest);
        }
    }
    Some(tasks.by_id.entry(id.to_string()).or_default())
}

fn record_for_task(id: &str, name: &str, batch: &UdfFigures) {
    let mut tasks = tasks();
    let Some(entry) = room_for(&mut tasks, id) else {
        return;
    };
    // A task calls the few UDFs of its plan; a bound all the same.
    if !entry.udfs.contains_key(name) && entry.udfs.len() >= MAX_NAMES {
        return;
    }
    entry.udfs.entry(name.to_string()).or_default().add(batch);
}

/// Task `id` ended: its figures are kept (for [`query_figures`]) until
/// [`MAX_TASKS`] newer tasks push them out.
pub(crate) fn task_ended(id: &str) {
    let mut tasks = tasks();
    let newly = match tasks.by_id.get_mut(id) {
        Some(entry) if !entry.ended => {
            entry.ended = true;
            true
        }
        _ => false,
    };
    if newly {
        tasks.ended.push_back(id.to_string());
    }
}

/// Every UDF figure of the labelled tasks of `query` this process ran:
/// `(label, udf, figures)`, by stage and task.
pub fn query_figures(query: [u8; 16]) -> Vec<(TaskLabel, String, UdfFigures)> {
    let tasks = tasks();
    let mut out = Vec::new();
    for entry in tasks.by_id.values() {
        let Some(label) = entry.label.filter(|l| l.query == query) else {
            continue;
        };
        for (udf, figures) in &entry.udfs {
            out.push((label, udf.clone(), *figures));
        }
    }
    out.sort_by(|a, b| (a.0.stage, a.0.task, &a.1).cmp(&(b.0.stage, b.0.task, &b.1)));
    out
}

/// Every UDF this process called, by name.
pub fn udf_figures() -> Vec<(String, UdfFigures)> {
    let table = table()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    table.iter().map(|(k, v)| (k.clone(), *v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_s_figures_are_found_by_its_query_after_it_ended() {
        let query = [7; 16];
        let label = TaskLabel {
            query,
            stage: 2,
            task: 1,
        };
        label_task("figures-task-1", label);
        record("f", Some("figures-task-1"), 1, 10, Duration::ZERO, false);
        record("f", Some("figures-task-1"), 1, 5, Duration::ZERO, true);
        record("f", Some("figures-unlabelled"), 1, 5, Duration::ZERO, false);
        task_ended("figures-task-1");
        let found = query_figures(query);
        assert_eq!(found.len(), 1, "{found:?}");
        let (label, udf, figures) = &found[0];
        assert_eq!((label.stage, label.task, udf.as_str()), (2, 1, "f"));
        assert_eq!((figures.calls, figures.rows, figures.failures), (2, 15, 1));
        assert!(query_figures([8; 16]).is_empty());
    }

    #[test]
    fn ended_tasks_make_room_for_new_ones() {
        for i in 0..MAX_TASKS + 50 {
            let id = format!("figures-evict-{i}");
            record("g", Some(&id), 1, 1, Duration::ZERO, false);
            task_ended(&id);
        }
        assert!(tasks().by_id.len() <= MAX_TASKS);
    }

    #[test]
    fn long_names_are_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_NAME_BYTES);
        let cut = bounded(&long);
        assert!(
            cut.len() <= MAX_NAME_BYTES + '…'.len_utf8(),
            "{}",
            cut.len()
        );
        assert!(cut.ends_with('…'));
        assert_eq!(bounded("short"), "short");
    }

    #[test]
    fn names_past_the_cap_fold_into_other_and_totals_add_up() {
        record(
            "figures_test_a",
            None,
            2,
            100,
            Duration::from_millis(5),
            false,
        );
        record(
            "figures_test_a",
            None,
            1,
            50,
            Duration::from_millis(5),
            true,
        );
        let a = udf_figures()
            .into_iter()
            .find(|(name, _)| name == "figures_test_a")
            .unwrap()
            .1;
        assert_eq!((a.calls, a.rows, a.failures), (3, 150, 1));
        assert!((a.seconds - 0.010).abs() < 1e-9);
        for i in 0..MAX_NAMES + 10 {
            record(
                &format!("figures_test_{i}"),
                None,
                1,
                1,
                Duration::ZERO,
                false,
            );
        }
        let all = udf_figures();
        assert!(all.len() <= MAX_NAMES + 1, "{}", all.len());
        assert!(all.iter().any(|(name, f)| name == OTHER && f.calls >= 10));
    }
}
