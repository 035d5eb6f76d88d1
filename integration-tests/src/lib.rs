//! Test harness: Python UDFs from source, a generated Parquet dataset, and
//! clusters of real datafusion-distributed workers serving gRPC on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

use arrow::util::pretty::pretty_format_batches;
use datafusion::arrow::datatypes::{DataType, Field, Fields, TimeUnit};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{AggregateUDF, ScalarUDF, Volatility, WindowUDF};
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use dfship_codec::{
    CodecOptions, PythonAggregateUdf, PythonScalarUdf, PythonWindowUdf, UdfSignature,
};
use dfship_distributed::PythonWorkerSessionBuilder;
use pyo3::prelude::*;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// The repository's virtual environment (made by scripts/setup.sh).
pub fn venv() -> PathBuf {
    std::env::var_os("VIRTUAL_ENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv"))
}

/// Starts Python with the project's environment, once per process.
pub fn init_python() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let venv = venv();
        assert!(
            venv.join("bin/python").exists(),
            "no venv at {}; run scripts/setup.sh",
            venv.display()
        );
        dfship_codec::use_python_environment(&venv).expect("activate the venv");
        dfship_codec::ensure_python().expect("cloudpickle and pyarrow import");
    });
}

/// A Python UDF: `setup` runs first (pyarrow is imported as `pa`, its
/// compute module as `pc`), then `expression` yields the callable.
pub fn python_udf(
    name: &str,
    inputs: Vec<DataType>,
    output: DataType,
    setup: &str,
    expression: &str,
) -> ScalarUDF {
    let signature = UdfSignature::new(name, inputs, output, Volatility::Immutable);
    with_python_object(setup, expression, |object| {
        PythonScalarUdf::new(signature, object)
    })
    .expect("a callable")
    .into_scalar_udf()
}

/// A Python aggregate UDF: `expression` (after `setup`, as in [`python_udf`])
/// yields the accumulator class or factory.
pub fn python_udaf(
    name: &str,
    inputs: Vec<DataType>,
    output: DataType,
    state: Vec<DataType>,
    setup: &str,
    expression: &str,
) -> AggregateUDF {
    let signature =
        UdfSignature::new(name, inputs, output, Volatility::Immutable).with_state_types(state);
    with_python_object(setup, expression, |object| {
        PythonAggregateUdf::new(signature, object)
    })
    .expect("an accumulator factory")
    .into_aggregate_udf()
}

/// A Python window UDF: `expression` (after `setup`, as in [`python_udf`])
/// yields the evaluator class or factory.
pub fn python_udwf(
    name: &str,
    inputs: Vec<DataType>,
    output: DataType,
    setup: &str,
    expression: &str,
) -> WindowUDF {
    let signature = UdfSignature::new(name, inputs, output, Volatility::Immutable);
    with_python_object(setup, expression, |object| {
        PythonWindowUdf::new(signature, object)
    })
    .expect("an evaluator factory")
    .into_window_udf()
}

fn with_python_object<T>(
    setup: &str,
    expression: &str,
    make: impl FnOnce(Bound<'_, PyAny>) -> T,
) -> T {
    init_python();
    let source = format!("import pyarrow as pa\nimport pyarrow.compute as pc\n{setup}");
    Python::attach(|py| {
        let globals = pyo3::types::PyDict::new(py);
        py.run(
            &std::ffi::CString::new(source).unwrap(),
            Some(&globals),
            None,
        )
        .expect("setup runs");
        let object = py
            .eval(
                &std::ffi::CString::new(expression).unwrap(),
                Some(&globals),
                None,
            )
            .expect("expression evaluates");
        make(object)
    })
}

/// How many Parquet files `facts` is written as.
pub const FACT_FILES: usize = 12;

/// Writes the test dataset under `dir`: `facts` (12 Parquet files, 4800 rows
/// of ints with nulls, strings, doubles, timestamps and lists) and `dim`.
pub async fn write_dataset(dir: &Path) -> Result<()> {
    let ctx = SessionContext::new();
    for part in 0..FACT_FILES {
        let (from, to) = (part * 400 + 1, (part + 1) * 400);
        let path = dir.join("facts").join(format!("part-{part}.parquet"));
        ctx.sql(&format!(
            "COPY (SELECT v AS id, \
                CASE WHEN v % 5 = 0 THEN NULL ELSE v % 7 END AS k, \
                'cat_' || CAST(v % 4 AS VARCHAR) AS category, \
                CAST(v AS DOUBLE) / 3.0 AS value, \
                to_timestamp(1700000000 + v * 3600) AS ts, \
                make_array(v % 3, v % 5) AS tags \
              FROM generate_series({from}, {to}) AS t(v)) \
             TO '{}' STORED AS PARQUET",
            path.display()
        ))
        .await?
        .collect()
        .await?;
    }
    ctx.sql(&format!(
        "COPY (SELECT * FROM (VALUES ('cat_0', 'CAT_0', 10), ('cat_1', 'CAT_1', 11), ('cat_2', 'CAT_2', 12), ('cat_3', 'CAT_3', 13)) \
           AS d(category, ucat, weight)) TO '{}' STORED AS PARQUET",
        dir.join("dim").join("dim.parquet").display()
    ))
    .await?
    .collect()
    .await?;
    Ok(())
}

pub async fn register_dataset(ctx: &SessionContext, dir: &Path) -> Result<()> {
    for table in ["facts", "dim"] {
        ctx.register_parquet(
            table,
            dir.join(table).to_str().unwrap(),
            ParquetReadOptions::default(),
        )
        .await?;
    }
    Ok(())
}

/// The error a query ends with; panics if it plans badly or succeeds.
pub async fn query_error(ctx: &SessionContext, sql: &str) -> DataFusionError {
    let df = ctx
        .sql(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql} should plan: {e}"));
    match df.collect().await {
        Ok(_) => panic!("{sql} should fail"),
        Err(error) => error,
    }
}

/// Rows of a query, pretty-printed and sorted, for order-insensitive comparison.
pub async fn sorted_rows(ctx: &SessionContext, sql: &str) -> Result<Vec<String>> {
    let batches = ctx.sql(sql).await?.collect().await?;
    let text = pretty_format_batches(&batches)?.to_string();
    let mut lines: Vec<String> = text
        .lines()
        .skip(3)
        .filter(|l| !l.starts_with('+'))
        .map(str::to_string)
        .collect();
    lines.sort();
    Ok(lines)
}

/// The rows of `batches`, each as its cells' text joined by `|`, sorted
/// (independent of column names and widths).
pub fn sorted_batch_rows(batches: &[arrow::array::RecordBatch]) -> Result<Vec<String>> {
    let mut rows = Vec::new();
    for batch in batches {
        for row in 0..batch.num_rows() {
            let cells = batch
                .columns()
                .iter()
                .map(|column| arrow::util::display::array_value_to_string(column, row))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            rows.push(cells.join("|"));
        }
    }
    rows.sort();
    Ok(rows)
}

/// Workers serving gRPC on 127.0.0.1 inside this process, each building
/// its sessions with `builder` (no UDF registered unless `builder` has it).
pub struct InProcessCluster {
    pub urls: Vec<String>,
    _servers: JoinSet<()>,
}

impl InProcessCluster {
    pub async fn start(workers: usize, builder: PythonWorkerSessionBuilder) -> Self {
        let mut servers = JoinSet::new();
        let mut urls = Vec::new();
        for _ in 0..workers {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind 127.0.0.1");
            urls.push(format!(
                "http://127.0.0.1:{}",
                listener.local_addr().unwrap().port()
            ));
            let builder = builder.clone();
            servers.spawn(async move {
                dfship_distributed::serve_worker(builder, listener, std::future::pending())
                    .await
                    .expect("the worker serves");
            });
        }
        Self {
            urls,
            _servers: servers,
        }
    }
}

/// A coordinator for `urls` with the dataset in `dir` registered and the
/// Python UDF `py_triple` (3 × its argument), known only to it; file scans
/// spread over every worker.
pub async fn triple_context(urls: &[String], options: CodecOptions, dir: &Path) -> SessionContext {
    let ctx = dfship_distributed::ClusterContextBuilder::new(urls)
        .expect("worker URLs")
        .with_config(datafusion::prelude::SessionConfig::new().with_target_partitions(4))
        .with_codec_options(options)
        .with_file_scan_bytes_per_partition(1)
        .build()
        .expect("a coordinator context");
    register_dataset(&ctx, dir).await.expect("the dataset");
    ctx.register_udf(python_udf(
        "py_triple",
        vec![DataType::Int64],
        DataType::Int64,
        "",
        "lambda a: pc.multiply(a, 3)",
    ));
    ctx
}

/// A worker session builder with default codec options and `cache` for unpickled callables.
pub fn worker_builder(cache: Arc<dfship_codec::CallableCache>) -> PythonWorkerSessionBuilder {
    PythonWorkerSessionBuilder::new(CodecOptions::default().with_cache(cache))
}

/// The Python UDFs of the query matrix.
pub fn matrix_udfs() -> Vec<ScalarUDF> {
    let list = DataType::List(Arc::new(Field::new("item", DataType::Int64, true)));
    let point = DataType::Struct(Fields::from(vec![
        Field::new("x", DataType::Int64, true),
        Field::new("half", DataType::Float64, true),
    ]));
    vec![
        python_udf("py_double", vec![DataType::Int64], DataType::Int64, "", "lambda a: pc.multiply(a, 2)"),
        python_udf("py_is_even", vec![DataType::Int64], DataType::Boolean, "", "lambda a: pc.equal(pc.bit_wise_and(a, 1), 0)"),
        python_udf(
            "py_bucket",
            vec![DataType::Int64],
            DataType::Utf8,
            "names = {0: 'zero', 1: 'one', 2: 'two'}\ndef bucket(a):\n    return pa.array([None if v is None else names.get(v % 3, 'other') for v in a.to_pylist()], pa.string())\n",
            "bucket",
        ),
        python_udf("py_upper", vec![DataType::Utf8], DataType::Utf8, "", "lambda s: pc.utf8_upper(s)"),
        python_udf("py_hour", vec![DataType::Timestamp(TimeUnit::Nanosecond, None)], DataType::Int64, "", "lambda t: pc.hour(t)"),
        python_udf("py_tags_len", vec![list], DataType::Int32, "", "lambda l: pc.list_value_length(l)"),
        python_udf("py_scale", vec![DataType::Float64, DataType::Int64], DataType::Float64, "", "lambda v, k: pc.multiply(v, pc.cast(k, pa.float64()))"),
        python_udf("py_point", vec![DataType::Int64], point, "", "lambda a: pa.StructArray.from_arrays([a, pc.divide(pc.cast(a, pa.float64()), 2.0)], names=['x', 'half'])"),
    ]
}

/// Queries with Python UDFs in every position of a distributed plan.
pub const MATRIX: &[(&str, &str)] = &[
    ("projection", "SELECT id, py_double(id) AS d FROM facts"),
    ("filter", "SELECT id FROM facts WHERE py_is_even(id) AND id < 500"),
    ("parquet_pushdown", "SELECT id, value FROM facts WHERE py_double(id) > 7900"),
    ("aggregate_argument", "SELECT category, sum(py_double(id)) AS s, max(py_scale(value, k)) AS m FROM facts GROUP BY category"),
    ("group_by_key", "SELECT py_bucket(k) AS b, count(*) AS c FROM facts GROUP BY py_bucket(k)"),
    ("join_key", "SELECT f.id, d.weight FROM facts f JOIN dim d ON py_upper(f.category) = d.ucat WHERE f.id % 97 = 0"),
    ("join_filter", "SELECT f.id, d.ucat FROM facts f JOIN dim d ON f.category = d.category AND py_is_even(f.id + d.weight) WHERE f.id < 300"),
    ("order_by", "SELECT id, category FROM facts ORDER BY py_double(id) DESC, id LIMIT 15"),
    ("window_argument", "SELECT id, sum(py_double(id)) OVER (PARTITION BY category ORDER BY id) AS running FROM facts WHERE id < 200"),
    ("case_branches", "SELECT id, CASE WHEN py_is_even(id) THEN py_upper(category) ELSE py_bucket(id) END AS c FROM facts WHERE id < 100"),
    ("nested_calls", "SELECT id, py_double(py_double(py_double(id))) AS d FROM facts WHERE id < 100"),
    ("nulls", "SELECT id, k, py_bucket(k) AS b, py_double(k) AS d FROM facts WHERE id < 60"),
    ("strings_timestamps_lists_structs", "SELECT id, py_upper(category) AS u, py_hour(ts) AS h, py_tags_len(tags) AS n, py_point(id) AS p FROM facts WHERE id % 50 = 0"),
    ("several_stages", "SELECT py_upper(c) AS c, s FROM (SELECT category AS c, sum(py_double(id)) AS s FROM facts WHERE py_is_even(id) GROUP BY category) t WHERE py_is_even(s)"),
];

/// `dfship-worker` processes on 127.0.0.1, killed when dropped.
pub struct SpawnedCluster {
    pub urls: Vec<String>,
    children: Vec<std::process::Child>,
    args: Vec<String>,
}

/// The worker binary: `$DFSHIP_WORKER_BIN`, else the workspace's debug build.
pub fn worker_binary() -> PathBuf {
    let path = std::env::var_os("DFSHIP_WORKER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/dfship-worker")
        });
    assert!(
        path.exists(),
        "no worker binary at {}; build it with `cargo build -p dfship-worker`",
        path.display()
    );
    path
}

impl SpawnedCluster {
    /// Starts `workers` processes with `args` appended to the defaults, and
    /// waits (up to 60 s each) for them to announce their address.
    pub fn start(workers: usize, args: &[&str]) -> Self {
        let mut cluster = Self {
            urls: Vec::new(),
            children: Vec::new(),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        for _ in 0..workers {
            let (child, url) = cluster.spawn("0");
            cluster.children.push(child);
            cluster.urls.push(url);
        }
        cluster
    }

    /// One worker on `port`, and the address it announced.
    fn spawn(&self, port: &str) -> (std::process::Child, String) {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(worker_binary())
            .args(["--port", port, "--python-env"])
            .arg(venv())
            .args(&self.args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn dfship-worker");
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("dfship-worker listening on ") {
                    let _ = sender.send(url.to_string());
                }
            }
        });
        let url = receiver
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the worker announces its address within 60 s");
        (child, url)
    }

    /// Kills worker `index` (SIGKILL) and starts a new process on the same
    /// address: same URL, a new incarnation.
    pub fn restart(&mut self, index: usize) {
        let _ = self.children[index].kill();
        let _ = self.children[index].wait();
        let port = self.urls[index]
            .rsplit(':')
            .next()
            .expect("a URL with a port")
            .to_string();
        let (child, url) = self.spawn(&port);
        assert_eq!(url, self.urls[index], "the worker came back on its address");
        self.children[index] = child;
    }

    /// The OS process ids, for fault injection.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|c| c.id()).collect()
    }

    /// The runner processes of each worker (its child processes), by pid.
    pub fn runner_pids(&self) -> Vec<Vec<u32>> {
        self.pids().into_iter().map(child_pids).collect()
    }
}

impl Drop for SpawnedCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The FFI example UDF as a worker flag value: `<lib>.so:symbol`.
pub fn ffi_example_spec() -> String {
    let library =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/libdfship_ffi_example.so");
    assert!(
        library.exists(),
        "no {}; build it with `cargo build -p dfship-ffi-example`",
        library.display()
    );
    format!("{}:dfship_ffi_scalar_udf", library.display())
}

/// The processes whose parent is `parent` (from /proc).
pub fn child_pids(parent: u32) -> Vec<u32> {
    let mut children = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return children;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse::<u32>().ok());
        if ppid == Some(parent) {
            children.push(pid);
        }
    }
    children.sort_unstable();
    children
}

/// Accumulators and evaluators of the aggregate/window tests (and some broken ones).
const AGGREGATE_WINDOW_SETUP: &str = r#"
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

class WrongType(CountOdd):
    def evaluate(self):
        return "not a number"

class BrokenFactory:
    def __init__(self):
        raise RuntimeError("no accumulator today")

class NotAnArray:
    def evaluate_all(self, values, num_rows):
        return [1.0] * num_rows
"#;

/// Registers the Python aggregate and window UDFs of
/// [`AGGREGATE_WINDOW_MATRIX`] (and those of [`AGGREGATE_WINDOW_FAILURES`],
/// which fail on purpose).
pub fn register_aggregate_window_udfs(ctx: &SessionContext) {
    let f64_ = DataType::Float64;
    let i64_ = DataType::Int64;
    ctx.register_udaf(python_udaf(
        "py_wmean",
        vec![f64_.clone(), f64_.clone()],
        f64_.clone(),
        vec![f64_.clone(), f64_.clone()],
        AGGREGATE_WINDOW_SETUP,
        "WeightedMean",
    ));
    ctx.register_udaf(python_udaf(
        "py_count_odd",
        vec![i64_.clone()],
        i64_.clone(),
        vec![i64_.clone()],
        AGGREGATE_WINDOW_SETUP,
        "CountOdd",
    ));
    ctx.register_udwf(python_udwf(
        "py_running",
        vec![f64_.clone()],
        f64_.clone(),
        AGGREGATE_WINDOW_SETUP,
        "RunningSum",
    ));
    ctx.register_udwf(python_udwf(
        "py_frame_mean",
        vec![f64_.clone()],
        f64_.clone(),
        AGGREGATE_WINDOW_SETUP,
        "FrameMean",
    ));
    ctx.register_udwf(python_udwf(
        "py_rank10",
        vec![],
        i64_.clone(),
        AGGREGATE_WINDOW_SETUP,
        "DenseRankTimesTen",
    ));
    ctx.register_udaf(python_udaf(
        "py_bad_state",
        vec![i64_.clone()],
        i64_.clone(),
        vec![i64_.clone()],
        AGGREGATE_WINDOW_SETUP,
        "BadState",
    ));
    ctx.register_udaf(python_udaf(
        "py_raising_merge",
        vec![i64_.clone()],
        i64_.clone(),
        vec![i64_.clone()],
        AGGREGATE_WINDOW_SETUP,
        "RaisingMerge",
    ));
    ctx.register_udaf(python_udaf(
        "py_wrong_type",
        vec![i64_.clone()],
        i64_.clone(),
        vec![i64_.clone()],
        AGGREGATE_WINDOW_SETUP,
        "WrongType",
    ));
    ctx.register_udaf(python_udaf(
        "py_broken_factory",
        vec![i64_.clone()],
        i64_.clone(),
        vec![i64_.clone()],
        AGGREGATE_WINDOW_SETUP,
        "BrokenFactory",
    ));
    ctx.register_udwf(python_udwf(
        "py_not_an_array",
        vec![f64_.clone()],
        f64_.clone(),
        AGGREGATE_WINDOW_SETUP,
        "NotAnArray",
    ));
    ctx.register_udwf(python_udwf(
        "py_short",
        vec![f64_.clone()],
        f64_,
        AGGREGATE_WINDOW_SETUP,
        "ShortWindow",
    ));
}

/// Queries with Python aggregate and window UDFs: NULLs, empty groups,
/// whole table, HAVING, PARTITION BY/ORDER BY, a bounded frame, ranks, an
/// aggregate used as a window function.
pub const AGGREGATE_WINDOW_MATRIX: &[(&str, &str)] = &[
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

/// Queries whose aggregate or window UDF misbehaves, the UDF's name, and a
/// phrase the error must contain.
pub const AGGREGATE_WINDOW_FAILURES: &[(&str, &str, &str)] = &[
    (
        "SELECT category, py_bad_state(id) FROM facts GROUP BY category",
        "py_bad_state",
        "state() returned 2 values, but the aggregate declares 1 state fields",
    ),
    (
        "SELECT py_raising_merge(id) FROM facts",
        "py_raising_merge",
        "merge is broken on purpose",
    ),
    (
        "SELECT id, py_short(value) OVER (PARTITION BY category) FROM facts",
        "py_short",
        "rows for a batch of",
    ),
    (
        "SELECT category, py_wrong_type(id) FROM facts GROUP BY category",
        "py_wrong_type",
        "evaluate() returned 'not a number', which is not of its declared type int64",
    ),
    (
        "SELECT py_broken_factory(id) FROM facts",
        "py_broken_factory",
        "the accumulator factory raised RuntimeError: no accumulator today",
    ),
    (
        "SELECT id, py_not_an_array(value) OVER (PARTITION BY k) FROM facts",
        "py_not_an_array",
        "evaluate_all() must return a pyarrow.Array (e.g. pa.array(values, type=...)), but it returned a list",
    ),
];
