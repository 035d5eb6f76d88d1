//! FFI UDFs travel by name next to inline Python UDFs: every worker process
//! loads the FFI library itself, and a worker without it says how to fix that.

use arrow::datatypes::DataType;
use datafusion::prelude::{SessionConfig, SessionContext};
use dfship_codec::CodecOptions;
use dfship_distributed::{load_ffi_udf, ClusterContextBuilder, InlineUdfs};
use dfship_integration_tests::*;
use pyo3::prelude::*;

async fn coordinator(urls: &[String], inline: InlineUdfs, dir: &std::path::Path) -> SessionContext {
    let ctx = ClusterContextBuilder::new(urls)
        .unwrap()
        .with_config(SessionConfig::new().with_target_partitions(2 * urls.len()))
        .with_inline_udfs(inline)
        .with_udf(load_ffi_udf(&ffi_example_spec()).unwrap())
        .with_python_udf(python_udf(
            "py_upper",
            vec![DataType::Utf8],
            DataType::Utf8,
            "",
            "lambda s: pc.utf8_upper(s)",
        ))
        .with_file_scan_bytes_per_partition(1)
        .build()
        .unwrap();
    register_dataset(&ctx, dir).await.unwrap();
    ctx
}

const MIXED: &str =
    "SELECT category, fnv1a_hash(py_upper(category)) AS h, count(*) AS c FROM facts \
                     GROUP BY category, fnv1a_hash(py_upper(category))";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inline_python_and_ffi_by_name_on_three_workers() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path()).await.unwrap();
    let spec = ffi_example_spec();
    let cluster = SpawnedCluster::start(3, &["--ffi-udf", &spec]);
    let inline = InlineUdfs::new(CodecOptions::default());
    let distributed = coordinator(&cluster.urls, inline.clone(), dir.path()).await;

    let local = SessionContext::new();
    register_dataset(&local, dir.path()).await.unwrap();
    local.register_udf(load_ffi_udf(&spec).unwrap().as_ref().clone());
    local.register_udf(python_udf(
        "py_upper",
        vec![DataType::Utf8],
        DataType::Utf8,
        "",
        "lambda s: pc.utf8_upper(s)",
    ));

    let expected = sorted_rows(&local, MIXED).await.unwrap();
    assert_eq!(expected.len(), 4);
    assert!(
        expected[0].contains(&dfship_ffi_example::fnv1a(b"CAT_0").to_string()),
        "{expected:?}"
    );
    assert_eq!(sorted_rows(&distributed, MIXED).await.unwrap(), expected);

    // Only the Python UDF was written inline; the FFI UDF went by name.
    let before = inline.encoder().stats();
    sorted_rows(
        &distributed,
        "SELECT fnv1a_hash(category) AS h FROM facts WHERE id < 10",
    )
    .await
    .unwrap();
    let after = inline.encoder().stats();
    assert!(after.plans > before.plans);
    assert_eq!(
        after.inline_udfs, before.inline_udfs,
        "an FFI UDF never travels inline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_without_the_ffi_udf_says_how_to_register_it() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path()).await.unwrap();
    let cluster = SpawnedCluster::start(2, &[]);
    let ctx = coordinator(
        &cluster.urls,
        InlineUdfs::new(CodecOptions::default()),
        dir.path(),
    )
    .await;
    let error = query_error(&ctx, MIXED).await.to_string();
    assert!(
        error.contains("has no scalar function 'fnv1a_hash'"),
        "{error}"
    );
    assert!(error.contains("--ffi-udf"), "{error}");
    assert!(
        cluster
            .urls
            .iter()
            .any(|url| error.contains(url.trim_end_matches('/'))),
        "names the worker: {error}"
    );
}

#[test]
fn ffi_udfs_load_from_python_capsules() {
    init_python();
    Python::attach(|py| {
        let capsule = pyo3::types::PyCapsule::new_with_value(
            py,
            dfship_ffi_example::dfship_ffi_scalar_udf(),
            dfship_distributed::SCALAR_UDF_CAPSULE,
        )
        .unwrap();
        let module = pyo3::types::PyModule::new(py, "dfship_capsule_test").unwrap();
        let namespace = py
            .import("types")
            .unwrap()
            .getattr("SimpleNamespace")
            .unwrap()
            .call0()
            .unwrap();
        let export = py
            .eval(c"lambda capsule: (lambda: capsule)", None, None)
            .unwrap()
            .call1((capsule,))
            .unwrap();
        namespace
            .setattr("__datafusion_scalar_udf__", export)
            .unwrap();
        module.setattr("hashing", namespace).unwrap();
        py.import("sys")
            .unwrap()
            .getattr("modules")
            .unwrap()
            .set_item("dfship_capsule_test", module)
            .unwrap();
    });
    let udf = load_ffi_udf("dfship_capsule_test:hashing").unwrap();
    assert_eq!(udf.name(), "fnv1a_hash");
    let error = load_ffi_udf("dfship_capsule_test:missing")
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("cannot load FFI UDF 'dfship_capsule_test:missing'"),
        "{error}"
    );
    let error = load_ffi_udf("/nonexistent/libnothing.so:sym")
        .unwrap_err()
        .to_string();
    assert!(error.contains("cannot open the shared library"), "{error}");
}
