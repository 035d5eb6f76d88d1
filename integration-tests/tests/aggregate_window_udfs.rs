//! Python aggregate and window UDFs known only to the coordinator run on 3
//! worker processes (runner pools, gRPC on 127.0.0.1) with the results of the
//! same UDFs on a single-node DataFusion; partial aggregates cross stages as
//! Arrow states; bad accumulators and evaluators give clear errors and the
//! workers keep serving. One cluster for the whole file.

use datafusion::arrow::datatypes::DataType;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_distributed::display_plan_ascii;
use dfship_integration_tests::*;

const SETUP: &str = r#"
class WeightedMean:
    """Multi-field state: weighted sum and weight; NULL inputs are skipped."""
    def __init__(self):
        self.total = 0.0
        self.weight = 0.0
    def update(self, values, weights):
        mask = pc.and_(pc.is_valid(values), pc.is_valid(weights))
        values, weights = pc.filter(values, mask), pc.filter(weights, mask)
        self.total += pc.sum(pc.multiply(values, weights)).as_py() or 0.0
        self.weight += pc.sum(weights).as_py() or 0.0
    def merge(self, states):
        self.total += pc.sum(states[0]).as_py() or 0.0
        self.weight += pc.sum(states[1]).as_py() or 0.0
    def state(self):
        return [pa.scalar(self.total), pa.scalar(self.weight)]
    def evaluate(self):
        return self.total / self.weight if self.weight else None

class CountOdd:
    """One-field state; counts odd values."""
    def __init__(self):
        self.n = 0
    def update(self, values):
        self.n += pc.sum(pc.equal(pc.bit_wise_and(values, 1), 1)).as_py() or 0
    def merge(self, states):
        self.n += pc.sum(states[0]).as_py() or 0
    def state(self):
        return [self.n]
    def evaluate(self):
        return self.n

class RunningSum:
    def evaluate_all(self, values, num_rows):
        return pc.cumulative_sum(pc.fill_null(values[0], 0))

class FrameMean:
    def uses_window_frame(self):
        return True
    def evaluate(self, values, eval_range):
        start, end = eval_range
        frame = values[0].slice(start, end - start)
        return pc.mean(frame).as_py()

class DenseRankTimesTen:
    def include_rank(self):
        return True
    def evaluate_all_with_rank(self, num_rows, ranks):
        out = []
        for i, (start, end) in enumerate(ranks):
            out.extend([(i + 1) * 10] * (end - start))
        return pa.array(out, pa.int64())

class BadState(CountOdd):
    def state(self):
        return [self.n, self.n]

class RaisingMerge(CountOdd):
    def merge(self, states):
        raise ValueError("merge is broken on purpose")

class ShortWindow:
    def evaluate_all(self, values, num_rows):
        return pa.array([1.0] * (num_rows + 1))
"#;

fn register(ctx: &SessionContext) {
    let f64_ = DataType::Float64;
    let i64_ = DataType::Int64;
    ctx.register_udaf(python_udaf(
        "py_wmean",
        vec![f64_.clone(), f64_.clone()],
        f64_.clone(),
        vec![f64_.clone(), f64_.clone()],
        SETUP,
        "WeightedMean",
    ));
    ctx.register_udaf(python_udaf(
        "py_count_odd",
        vec![i64_.clone()],
        i64_.clone(),
        vec![i64_.clone()],
        SETUP,
        "CountOdd",
    ));
    ctx.register_udwf(python_udwf(
        "py_running",
        vec![f64_.clone()],
        f64_.clone(),
        SETUP,
        "RunningSum",
    ));
    ctx.register_udwf(python_udwf(
        "py_frame_mean",
        vec![f64_.clone()],
        f64_.clone(),
        SETUP,
        "FrameMean",
    ));
    ctx.register_udwf(python_udwf(
        "py_rank10",
        vec![],
        i64_.clone(),
        SETUP,
        "DenseRankTimesTen",
    ));
    ctx.register_udaf(python_udaf(
        "py_bad_state",
        vec![i64_.clone()],
        i64_.clone(),
        vec![i64_.clone()],
        SETUP,
        "BadState",
    ));
    ctx.register_udaf(python_udaf(
        "py_raising_merge",
        vec![i64_.clone()],
        i64_.clone(),
        vec![i64_.clone()],
        SETUP,
        "RaisingMerge",
    ));
    ctx.register_udwf(python_udwf(
        "py_short",
        vec![f64_.clone()],
        f64_,
        SETUP,
        "ShortWindow",
    ));
}

const MATRIX: &[(&str, &str)] = &[
    (
        "group_by_with_nulls",
        "SELECT k, round(py_wmean(value, CAST(k AS DOUBLE)), 6) AS m, py_count_odd(id) AS o \
         FROM facts GROUP BY k",
    ),
    (
        "empty_groups",
        "SELECT category, py_count_odd(id) AS o, round(py_wmean(value, CAST(k AS DOUBLE)), 6) AS m \
         FROM facts WHERE k IS NULL AND id % 2 = 0 GROUP BY category",
    ),
    (
        "whole_table",
        "SELECT round(py_wmean(value, CAST(id AS DOUBLE)), 6) AS m, py_count_odd(id) AS o FROM facts",
    ),
    (
        "whole_table_no_rows",
        "SELECT py_count_odd(id) AS o, py_wmean(value, value) AS m FROM facts WHERE id < 0",
    ),
    (
        "having",
        "SELECT category, py_count_odd(id) AS o FROM facts GROUP BY category \
         HAVING py_count_odd(id) > 599",
    ),
    (
        "window_partition_order",
        "SELECT id, round(py_running(value) OVER (PARTITION BY category ORDER BY id), 6) AS r \
         FROM facts WHERE id < 300",
    ),
    (
        "window_bounded_frame",
        "SELECT id, round(py_frame_mean(value) OVER (PARTITION BY k ORDER BY id \
         ROWS BETWEEN 2 PRECEDING AND 1 FOLLOWING), 6) AS r FROM facts WHERE id < 200",
    ),
    (
        "window_rank",
        "SELECT id, py_rank10() OVER (PARTITION BY category ORDER BY k) AS r \
         FROM facts WHERE id < 120",
    ),
    (
        "aggregate_as_window",
        "SELECT id, py_count_odd(id) OVER (PARTITION BY category ORDER BY id) AS r \
         FROM facts WHERE id < 150",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aggregate_and_window_udfs_run_on_three_workers() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path()).await.unwrap();
    let cluster = SpawnedCluster::start(3, &["--python-runners", "1"]);
    let distributed = triple_context(&cluster.urls, Default::default(), dir.path()).await;
    register(&distributed);
    let local = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(3));
    register_dataset(&local, dir.path()).await.unwrap();
    register(&local);

    for (name, sql) in MATRIX {
        let plan = distributed
            .sql(sql)
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let shown = display_plan_ascii(plan.as_ref(), false);
        assert!(shown.contains("Stage"), "{name}: distributed:\n{shown}");
        let expected = sorted_rows(&local, sql).await.unwrap();
        let actual = sorted_rows(&distributed, sql)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}\n{shown}"));
        assert_eq!(actual, expected, "{name}\n{shown}");
    }

    // Partial aggregation on the workers, final on the coordinator or
    // another worker: the state fields cross a stage boundary.
    let sql = "SELECT category, py_wmean(value, value) AS m FROM facts GROUP BY category";
    let plan = distributed
        .sql(sql)
        .await
        .unwrap()
        .create_physical_plan()
        .await
        .unwrap();
    let shown = display_plan_ascii(plan.as_ref(), false);
    assert!(
        shown.contains("mode=Partial") && shown.contains("mode=Final"),
        "partial and final aggregation:\n{shown}"
    );

    let errors = [
        (
            "SELECT category, py_bad_state(id) FROM facts GROUP BY category",
            "state() returned 2 values, but the aggregate declares 1 state fields",
        ),
        (
            "SELECT py_raising_merge(id) FROM facts",
            "merge is broken on purpose",
        ),
        (
            "SELECT id, py_short(value) OVER (PARTITION BY category) FROM facts",
            "rows for a batch of",
        ),
    ];
    for (sql, needle) in errors {
        let error = query_error(&distributed, sql).await.to_string();
        assert!(error.contains(needle), "{sql}: {error}");
        assert!(
            error.contains("py_bad_state")
                || error.contains("py_raising_merge")
                || error.contains("py_short"),
            "the error names the UDF: {error}"
        );
        // The same workers answer the next query correctly.
        let sql = MATRIX[0].1;
        assert_eq!(
            sorted_rows(&distributed, sql).await.unwrap(),
            sorted_rows(&local, sql).await.unwrap()
        );
    }
}
