//! Python UDFs registered only on the coordinator run on 3 real workers
//! (gRPC on 127.0.0.1) in every position of a distributed plan, with results
//! equal to single-node DataFusion.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, TimeUnit};
use datafusion::logical_expr::ScalarUDF;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_distributed::display_plan_ascii;
use dfship_codec::{CallableCache, CodecOptions};
use dfship_distributed::{ClusterContextBuilder, InlineUdfs};
use dfship_integration_tests::*;

fn udfs() -> Vec<ScalarUDF> {
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

const MATRIX: &[(&str, &str)] = &[
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

async fn single_node(dir: &std::path::Path) -> SessionContext {
    let ctx = SessionContext::new_with_config(
        SessionConfig::new().set_bool("datafusion.execution.parquet.pushdown_filters", true),
    );
    register_dataset(&ctx, dir).await.unwrap();
    for udf in udfs() {
        ctx.register_udf(udf);
    }
    ctx
}

fn coordinator(urls: &[String], inline: InlineUdfs) -> SessionContext {
    let config = SessionConfig::new()
        .with_target_partitions(3)
        .set_bool("datafusion.execution.parquet.pushdown_filters", true);
    let ctx = ClusterContextBuilder::new(urls)
        .unwrap()
        .with_config(config)
        .with_inline_udfs(inline)
        .with_file_scan_bytes_per_partition(1)
        .build()
        .unwrap();
    for udf in udfs() {
        ctx.register_udf(udf); // only the coordinator knows them
    }
    ctx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_query_matrix_matches_single_node() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path()).await.unwrap();
    let worker_cache = Arc::new(CallableCache::new(64));
    let cluster = InProcessCluster::start(3, worker_builder(Arc::clone(&worker_cache))).await;
    let inline = InlineUdfs::new(CodecOptions::default());
    let distributed = coordinator(&cluster.urls, inline.clone());
    register_dataset(&distributed, dir.path()).await.unwrap();
    let local = single_node(dir.path()).await;

    let mut report = Vec::new();
    for (name, sql) in MATRIX {
        let plan = distributed
            .sql(sql)
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        let shown = display_plan_ascii(plan.as_ref(), false);
        assert!(
            shown.contains("Stage"),
            "{name}: the plan is distributed:\n{shown}"
        );
        let before = inline.encoder().stats();

        let expected = sorted_rows(&local, sql).await.unwrap();
        let actual = sorted_rows(&distributed, sql)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!expected.is_empty(), "{name}: the query returns rows");
        assert_eq!(actual, expected, "{name}");
        let after = inline.encoder().stats();
        let (plans, udfs) = (
            after.plans - before.plans,
            after.inline_udfs - before.inline_udfs,
        );
        assert!(
            plans > 0 && udfs > 0,
            "{name}: stage plans were shipped with inline UDFs: {after:?}"
        );
        report.push(format!(
            "{name}: {plans} stage plans shipped carrying {udfs} inline UDF calls, {} rows",
            expected.len()
        ));
    }
    println!("{}", report.join("\n"));
    let stats = worker_cache.stats();
    assert!(
        stats.loads > 0,
        "workers unpickled the callables they were sent: {stats:?}"
    );
    assert!(
        stats.hits > stats.loads,
        "and reused them across tasks: {stats:?}"
    );
    println!("worker callable cache: {stats:?}");
}
