//! Python aggregate and window UDFs known only to the coordinator run on 3
//! worker processes (runner pools, gRPC on 127.0.0.1) with the results of the
//! same UDFs on a single-node DataFusion; partial aggregates cross stages as
//! Arrow states; bad accumulators and evaluators give clear errors and the
//! workers keep serving. One cluster for the whole file.

use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_distributed::display_plan_ascii;
use dfship_integration_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_runner_pools() {
    run_on_three_workers(&["--python-runners", "1"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_the_workers_own_interpreters() {
    run_on_three_workers(&["--python-mode", "in-process"]).await;
}

/// The distributed plan of `sql`, as text (stages and tasks).
async fn distributed_plan(ctx: &SessionContext, sql: &str) -> String {
    let plan = match ctx.sql(sql).await {
        Ok(df) => df.create_physical_plan().await,
        Err(e) => Err(e),
    }
    .unwrap_or_else(|e| panic!("{sql}: {e}"));
    display_plan_ascii(plan.as_ref(), false)
}

async fn run_on_three_workers(worker_args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path()).await.unwrap();
    let cluster = SpawnedCluster::start(3, worker_args);
    let distributed = triple_context(&cluster.urls, Default::default(), dir.path()).await;
    register_aggregate_window_udfs(&distributed);
    let local = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(3));
    register_dataset(&local, dir.path()).await.unwrap();
    register_aggregate_window_udfs(&local);

    for (name, sql) in AGGREGATE_WINDOW_MATRIX {
        let shown = distributed_plan(&distributed, sql).await;
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
    let shown = distributed_plan(&distributed, sql).await;
    assert!(
        shown.contains("mode=Partial") && shown.contains("mode=Final"),
        "partial and final aggregation:\n{shown}"
    );

    for (sql, udf, needle) in AGGREGATE_WINDOW_FAILURES {
        let error = query_error(&distributed, sql).await.to_string();
        assert!(error.contains(needle), "{sql}: {error}");
        assert!(
            error.contains(&format!("'{udf}'")),
            "the error names the UDF: {error}"
        );
        // The same workers answer the next query correctly.
        let sql = AGGREGATE_WINDOW_MATRIX[0].1;
        assert_eq!(
            sorted_rows(&distributed, sql).await.unwrap(),
            sorted_rows(&local, sql).await.unwrap()
        );
    }
}

/// An accumulator that crashes its runner and one that never returns cost one
/// query each: the error says what happened, the runner is replaced, and the
/// same workers then answer an aggregate query correctly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashing_or_endless_accumulator_costs_only_its_query() {
    use datafusion::arrow::datatypes::DataType;

    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path()).await.unwrap();
    let cluster = SpawnedCluster::start(2, &["--python-runners", "1", "--udf-timeout", "2"]);
    let distributed = triple_context(&cluster.urls, Default::default(), dir.path()).await;
    register_aggregate_window_udfs(&distributed);
    let local = SessionContext::new();
    register_dataset(&local, dir.path()).await.unwrap();
    register_aggregate_window_udfs(&local);
    let setup = "import os\n\
class Crash:\n    def update(self, v):\n        os.abort()\n    def merge(self, s):\n        pass\n    def state(self):\n        return [0]\n    def evaluate(self):\n        return 0\n\
class Endless(Crash):\n    def update(self, v):\n        while True:\n            pass\n";
    for (name, class, needle) in [
        ("py_crash", "Crash", "crashed"),
        ("py_endless", "Endless", "--udf-timeout"),
    ] {
        distributed.register_udaf(python_udaf(
            name,
            vec![DataType::Int64],
            DataType::Int64,
            vec![DataType::Int64],
            setup,
            class,
        ));
        let sql = format!("SELECT category, {name}(id) FROM facts GROUP BY category");
        let error = query_error(&distributed, &sql).await.to_string();
        assert!(
            error.contains(needle) && error.contains(&format!("'{name}'")),
            "{name}: {error}"
        );
        let sql = AGGREGATE_WINDOW_MATRIX[0].1;
        assert_eq!(
            sorted_rows(&distributed, sql).await.unwrap(),
            sorted_rows(&local, sql).await.unwrap(),
            "the workers serve on after {name}"
        );
    }
}
