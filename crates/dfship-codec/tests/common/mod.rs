//! Shared helpers for the codec's integration tests: the project's Python
//! environment, Python UDFs built from source text, and plan round-trips.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, Once};

use arrow::array::RecordBatch;
use arrow::datatypes::DataType;
use arrow::util::pretty::pretty_format_batches;
use datafusion::error::Result;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{ScalarUDF, Volatility};
use datafusion::physical_plan::{collect, ExecutionPlan};
use datafusion::prelude::SessionContext;
use datafusion_proto::bytes::{
    physical_plan_from_bytes_with_extension_codec, physical_plan_to_bytes_with_extension_codec,
};
use dfship_codec::{PythonScalarUdf, PythonUdfCodec, UdfSignature};
use pyo3::prelude::*;

/// The repository's virtual environment, made by `scripts/setup.sh`.
pub fn venv() -> PathBuf {
    std::env::var_os("VIRTUAL_ENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv"))
}

/// Starts Python with the project's environment (once per process).
pub fn init_python() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let venv = venv();
        assert!(
            venv.join("bin/python").exists(),
            "no Python environment at {}; run scripts/setup.sh first",
            venv.display()
        );
        dfship_codec::use_python_environment(&venv).expect("activate the venv");
        dfship_codec::ensure_python().expect("cloudpickle and pyarrow import");
    });
}

/// Runs this test process's Python UDFs in-process (nextest runs each test
/// in its own process, so this affects one test).
pub fn in_process() {
    dfship_codec::configure_python_execution(
        dfship_codec::PythonExecution::default().with_mode(dfship_codec::PythonMode::InProcess),
    )
    .expect("the first configuration of this test process");
}

/// Evaluates a Python expression (after running `setup`, if any, in the same namespace).
pub fn py_object(setup: &str, expression: &str) -> Py<PyAny> {
    init_python();
    Python::attach(|py| {
        let globals = pyo3::types::PyDict::new(py);
        let setup = std::ffi::CString::new(setup).unwrap();
        py.run(&setup, Some(&globals), None).expect("setup runs");
        let expression = std::ffi::CString::new(expression).unwrap();
        py.eval(&expression, Some(&globals), None)
            .expect("expression evaluates")
            .unbind()
    })
}

/// A Python UDF from source: `setup` runs first, `expression` yields the callable.
pub fn python_udf(
    name: &str,
    inputs: Vec<DataType>,
    output: DataType,
    volatility: Volatility,
    setup: &str,
    expression: &str,
) -> ScalarUDF {
    let callable = py_object(setup, expression);
    let signature = UdfSignature::new(name, inputs, output, volatility);
    Python::attach(|py| PythonScalarUdf::new(signature, callable.into_bound(py)))
        .expect("a callable")
        .into_scalar_udf()
}

/// A Python aggregate UDF from source: `expression` yields the accumulator factory.
pub fn python_udaf(
    name: &str,
    inputs: Vec<DataType>,
    output: DataType,
    state: Vec<DataType>,
    setup: &str,
    expression: &str,
) -> datafusion::logical_expr::AggregateUDF {
    let factory = py_object(setup, expression);
    let signature =
        UdfSignature::new(name, inputs, output, Volatility::Immutable).with_state_types(state);
    Python::attach(|py| dfship_codec::PythonAggregateUdf::new(signature, factory.into_bound(py)))
        .expect("an accumulator factory")
        .into_aggregate_udf()
}

/// A Python window UDF from source: `expression` yields the evaluator factory.
pub fn python_udwf(
    name: &str,
    inputs: Vec<DataType>,
    output: DataType,
    setup: &str,
    expression: &str,
) -> datafusion::logical_expr::WindowUDF {
    let factory = py_object(setup, expression);
    let signature = UdfSignature::new(name, inputs, output, Volatility::Immutable);
    Python::attach(|py| dfship_codec::PythonWindowUdf::new(signature, factory.into_bound(py)))
        .expect("an evaluator factory")
        .into_window_udf()
}

/// A session with table `t` (ints with a null, floats, strings, int lists).
pub async fn session_with_data() -> SessionContext {
    let ctx = SessionContext::new();
    ctx.sql(
        "CREATE TABLE t AS VALUES \
         (1, 1.5, 'alpha', [1, 2]), (2, -2.0, 'beta', [3]), (NULL, 0.25, 'gamma', []), \
         (4, 8.0, NULL, [4, 5, 6])",
    )
    .await
    .unwrap()
    .collect()
    .await
    .unwrap();
    ctx.sql(
        "CREATE VIEW v AS SELECT column1 AS a, column2 AS b, column3 AS s, column4 AS l FROM t",
    )
    .await
    .unwrap();
    ctx
}

pub async fn physical_plan(ctx: &SessionContext, sql: &str) -> Arc<dyn ExecutionPlan> {
    ctx.sql(sql)
        .await
        .unwrap()
        .create_physical_plan()
        .await
        .unwrap()
}

pub fn encode(plan: Arc<dyn ExecutionPlan>, codec: &PythonUdfCodec) -> Result<Vec<u8>> {
    physical_plan_to_bytes_with_extension_codec(plan, codec).map(|b| b.to_vec())
}

/// Decodes on a fresh context that registered no UDF.
pub fn decode(bytes: &[u8], codec: &PythonUdfCodec) -> Result<Arc<dyn ExecutionPlan>> {
    let task_ctx: Arc<TaskContext> = SessionContext::new().task_ctx();
    physical_plan_from_bytes_with_extension_codec(bytes, &task_ctx, codec)
}

pub async fn run(plan: Arc<dyn ExecutionPlan>) -> Result<Vec<RecordBatch>> {
    collect(plan, SessionContext::new().task_ctx()).await
}

pub fn pretty(batches: &[RecordBatch]) -> String {
    pretty_format_batches(batches).unwrap().to_string()
}

/// The byte offset of `needle` in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
