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

fn table() -> &'static Mutex<BTreeMap<String, UdfFigures>> {
    static TABLE: OnceLock<Mutex<BTreeMap<String, UdfFigures>>> = OnceLock::new();
    TABLE.get_or_init(Default::default)
}

/// Adds one batch's figures to `name`'s totals.
pub(crate) fn record(name: &str, calls: u64, rows: u64, waited: Duration, failed: bool) {
    let mut table = table()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let key = if table.contains_key(name) || table.len() < MAX_NAMES {
        name
    } else {
        OTHER
    };
    let entry = table.entry(key.to_string()).or_default();
    entry.calls += calls;
    entry.rows += rows;
    entry.seconds += waited.as_secs_f64();
    entry.failures += u64::from(failed);
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
    fn names_past_the_cap_fold_into_other_and_totals_add_up() {
        record("figures_test_a", 2, 100, Duration::from_millis(5), false);
        record("figures_test_a", 1, 50, Duration::from_millis(5), true);
        let a = udf_figures()
            .into_iter()
            .find(|(name, _)| name == "figures_test_a")
            .unwrap()
            .1;
        assert_eq!((a.calls, a.rows, a.failures), (3, 150, 1));
        assert!((a.seconds - 0.010).abs() < 1e-9);
        for i in 0..MAX_NAMES + 10 {
            record(&format!("figures_test_{i}"), 1, 1, Duration::ZERO, false);
        }
        let all = udf_figures();
        assert!(all.len() <= MAX_NAMES + 1, "{}", all.len());
        assert!(all.iter().any(|(name, f)| name == OTHER && f.calls >= 10));
    }
}
