//! State that lives in a runner: an aggregate that spills under a small
//! memory pool still gives the right answer, and a window function of its
//! frame takes one runner call per partition, not one per row — on a local
//! session and on workers.

use std::sync::Arc;

use datafusion::arrow::array::{Float64Array, Int64Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::datasource::MemTable;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::SessionStateBuilder;
use datafusion::physical_plan::{collect, ExecutionPlan};
use datafusion::prelude::{SessionConfig, SessionContext};
use dfship_codec::{AttachWindowFrames, CodecOptions};
use dfship_distributed::{ClusterContextBuilder, InlineUdfs};
use dfship_integration_tests::*;

/// A sum that holds more than its state (as a real accumulator does): a
/// spill moves its state to disk and merges it back into fresh accumulators.
/// (An accumulator whose fresh state is not the identity of `merge` gives a
/// spill-dependent answer in DataFusion itself, as in datafusion-python.)
const TOTAL: &str = "
class Total:
    def __init__(self):
        self.total = 0.0
        self.padding = list(range(32))
    def update(self, values):
        self.total += pc.sum(values).as_py() or 0.0
    def merge(self, states):
        self.total += pc.sum(states[0]).as_py() or 0.0
    def state(self):
        return [self.total]
    def evaluate(self):
        return self.total
";

fn numbers(rows: i64, groups: i64) -> Arc<MemTable> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new("v", DataType::Float64, false),
    ]));
    let batches: Vec<RecordBatch> = (0..rows)
        .step_by(8192)
        .map(|start| {
            let ids: Vec<i64> = (start..(start + 8192).min(rows)).collect();
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    Arc::new(Int64Array::from_iter_values(ids.iter().map(|i| i % groups))),
                    Arc::new(Float64Array::from_iter_values(
                        ids.iter().map(|i| (i % 97) as f64),
                    )),
                ],
            )
            .unwrap()
        })
        .collect();
    Arc::new(MemTable::try_new(schema, vec![batches]).unwrap())
}

fn spills(plan: &Arc<dyn ExecutionPlan>) -> usize {
    let own = plan
        .metrics()
        .and_then(|m| m.spill_count())
        .unwrap_or_default();
    own + plan.children().iter().map(|c| spills(c)).sum::<usize>()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_that_spills_under_a_small_memory_pool_gives_the_right_answer() {
    let (rows, groups) = (200_000, 40_000);
    let expected_ctx = SessionContext::new();
    expected_ctx
        .register_table("t", numbers(rows, groups))
        .unwrap();
    let expected = expected_ctx
        .sql("SELECT k, sum(v) AS s FROM t GROUP BY k")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let expected = sorted_batch_rows(&expected).unwrap();

    // 4 MiB for the whole query: the runner reports what its 40,000
    // accumulators hold, so the aggregate must spill their states to disk.
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_limit(4 << 20, 1.0)
        .build_arc()
        .unwrap();
    let ctx =
        SessionContext::new_with_config_rt(SessionConfig::new().with_target_partitions(1), runtime);
    ctx.register_table("t", numbers(rows, groups)).unwrap();
    ctx.register_udaf(python_udaf(
        "total",
        vec![DataType::Float64],
        DataType::Float64,
        vec![DataType::Float64],
        TOTAL,
        "Total",
    ));
    let sql = "SELECT k, total(v) AS s FROM t GROUP BY k";
    let plan = ctx
        .sql(sql)
        .await
        .unwrap()
        .create_physical_plan()
        .await
        .unwrap();
    let batches = collect(Arc::clone(&plan), ctx.task_ctx()).await.unwrap();
    assert!(spills(&plan) > 0, "the aggregate spilled");
    assert_eq!(sorted_batch_rows(&batches).unwrap(), expected);
}

/// `evaluate(values, range)` over each row's frame: the frame's sum. Each
/// evaluator (one per runner call) notes itself in `LOG` when set.
fn frame_sum(log: Option<&std::path::Path>) -> String {
    format!(
        "
LOG = {log:?}
class FrameSum:
    def __init__(self):
        if LOG:
            with open(LOG, 'a') as out:
                out.write('evaluator\\n')
    def uses_window_frame(self):
        return True
    def evaluate(self, values, eval_range):
        start, end = eval_range
        return pc.sum(values[0].slice(start, end - start)).as_py() or 0.0
",
        log = log.map(|p| p.display().to_string()).unwrap_or_default()
    )
}

const WINDOW_SQL: &str = "SELECT k, v, frame_sum(v) OVER (PARTITION BY k % 2 ORDER BY v ROWS BETWEEN 5 PRECEDING AND CURRENT ROW) AS w FROM t";
const WINDOW_EXPECTED: &str = "SELECT k, v, sum(v) OVER (PARTITION BY k % 2 ORDER BY v ROWS BETWEEN 5 PRECEDING AND CURRENT ROW) AS w FROM t";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_function_of_its_frame_takes_one_call_per_partition() {
    let plain = SessionContext::new();
    plain.register_table("t", numbers(4000, 1000)).unwrap();
    let expected = sorted_rows(&plain, WINDOW_EXPECTED).await.unwrap();

    let state = SessionStateBuilder::new()
        .with_default_features()
        .with_physical_optimizer_rule(Arc::new(AttachWindowFrames))
        .build();
    let ctx = SessionContext::new_with_state(state);
    ctx.register_table("t", numbers(4000, 1000)).unwrap();
    ctx.register_udwf(python_udwf(
        "frame_sum",
        vec![DataType::Float64],
        DataType::Float64,
        &frame_sum(None),
        "FrameSum",
    ));
    let before = dfship_codec::runner_pool_stats().map_or(0, |s| s.calls);
    assert_eq!(sorted_rows(&ctx, WINDOW_SQL).await.unwrap(), expected);
    let calls = dfship_codec::runner_pool_stats().unwrap().calls - before;
    // Two partitions (k % 2) of 2,000 rows: their frames, plus asking the flags.
    assert!(calls <= 4, "{calls} runner calls for 4,000 rows");

    // Without its frame (no rule), every row is a call of its own: still right.
    let slow = SessionContext::new();
    slow.register_table("t", numbers(600, 100)).unwrap();
    slow.register_udwf(python_udwf(
        "frame_sum",
        vec![DataType::Float64],
        DataType::Float64,
        &frame_sum(None),
        "FrameSum",
    ));
    let before = dfship_codec::runner_pool_stats().unwrap().calls;
    let plain_small = SessionContext::new();
    plain_small.register_table("t", numbers(600, 100)).unwrap();
    assert_eq!(
        sorted_rows(&slow, WINDOW_SQL).await.unwrap(),
        sorted_rows(&plain_small, WINDOW_EXPECTED).await.unwrap()
    );
    let calls = dfship_codec::runner_pool_stats().unwrap().calls - before;
    assert!(calls >= 600, "a row at a time: {calls}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_fetch_every_frame_of_a_partition_in_one_call() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path()).await.unwrap();
    let log = dir.path().join("evaluators.log");
    let cluster = SpawnedCluster::start(2, &["--python-runners", "1"]);
    let ctx = ClusterContextBuilder::new(&cluster.urls)
        .unwrap()
        .with_inline_udfs(InlineUdfs::new(CodecOptions::default()))
        .with_file_scan_bytes_per_partition(1)
        .build()
        .unwrap();
    register_dataset(&ctx, dir.path()).await.unwrap();
    ctx.register_udwf(python_udwf(
        "frame_sum",
        vec![DataType::Float64],
        DataType::Float64,
        &frame_sum(Some(&log)),
        "FrameSum",
    ));
    let local = SessionContext::new();
    register_dataset(&local, dir.path()).await.unwrap();
    let sql = "SELECT id, round(frame_sum(value) OVER (PARTITION BY category ORDER BY id ROWS BETWEEN 3 PRECEDING AND 1 FOLLOWING), 6) AS w FROM facts";
    let expected = "SELECT id, round(sum(value) OVER (PARTITION BY category ORDER BY id ROWS BETWEEN 3 PRECEDING AND 1 FOLLOWING), 6) AS w FROM facts";
    assert_eq!(
        sorted_rows(&ctx, sql).await.unwrap(),
        sorted_rows(&local, expected).await.unwrap()
    );
    // 4,800 rows in 4 partitions (categories): one evaluator per partition
    // and a few to ask the flags, not one per row.
    let evaluators = std::fs::read_to_string(&log).unwrap().lines().count();
    assert!((4..=12).contains(&evaluators), "{evaluators} runner calls");
}
