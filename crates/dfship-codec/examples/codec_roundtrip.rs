//! Ships a plan with Python UDFs through the codec and runs it on a context
//! that never registered them; prints payload sizes and decode timings.
//!
//! Run from the repository root after `scripts/setup.sh`:
//! `VIRTUAL_ENV=$PWD/.venv cargo run -p dfship-codec --example codec_roundtrip`

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::datatypes::DataType;
use arrow::util::pretty::pretty_format_batches;
use datafusion::error::Result;
use datafusion::logical_expr::{ScalarUDF, Volatility};
use datafusion::physical_plan::collect;
use datafusion::prelude::SessionContext;
use datafusion_proto::bytes::{
    physical_plan_from_bytes_with_extension_codec, physical_plan_to_bytes_with_extension_codec,
};
use datafusion_proto::physical_plan::PhysicalExtensionCodec;
use dfship_codec::{
    CallableCache, CodecOptions, PythonScalarUdf, PythonUdfCodec, UdfSignature, WireFormat,
};
use pyo3::prelude::*;

fn python_udf(
    name: &str,
    inputs: Vec<DataType>,
    output: DataType,
    source: &str,
) -> Result<ScalarUDF> {
    let source = std::ffi::CString::new(source).expect("no NUL in source");
    Python::attach(|py| {
        let globals = pyo3::types::PyDict::new(py);
        py.run(
            c"import pyarrow as pa\nimport pyarrow.compute as pc",
            Some(&globals),
            None,
        )?;
        let callable = py.eval(&source, Some(&globals), None)?;
        let signature = UdfSignature::new(name, inputs, output, Volatility::Immutable);
        Ok::<_, PyErr>(PythonScalarUdf::new(signature, callable))
    })
    .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?
    .map(PythonScalarUdf::into_scalar_udf)
}

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

#[tokio::main]
async fn main() -> Result<()> {
    dfship_codec::ensure_python()?;
    let coordinator = SessionContext::new();
    coordinator
        .sql("CREATE TABLE sales AS SELECT * FROM (VALUES ('apples', 3, 1.25), ('pears', 5, 0.8), ('kiwis', 12, 0.3), ('figs', 2, 2.5)) AS t(item, qty, price)")
        .await?
        .collect()
        .await?;
    let small_lambda = python_udf(
        "add_one",
        vec![DataType::Int64],
        DataType::Int64,
        "lambda q: pc.add(q, 1)",
    )?;
    coordinator.register_udf(small_lambda.clone());
    coordinator.register_udf(python_udf(
        "discounted",
        vec![DataType::Int64, DataType::Float64],
        DataType::Float64,
        "(lambda rate: lambda q, p: pc.multiply(pc.multiply(pc.cast(q, pa.float64()), p), 1 - rate))(0.1)",
    )?);
    let sql = "SELECT item, add_one(qty) AS qty_plus_one, discounted(qty, price) AS total FROM sales WHERE discounted(qty, price) > 3 ORDER BY total DESC";
    let plan = coordinator.sql(sql).await?.create_physical_plan().await?;

    println!("query: {sql}\n");
    for format in [WireFormat::Inline, WireFormat::DataFusionPython] {
        let codec = PythonUdfCodec::new(CodecOptions::default().with_write_format(format));
        let payload = codec.encode_udf(&small_lambda)?.unwrap_or_default();
        let plan_bytes = physical_plan_to_bytes_with_extension_codec(Arc::clone(&plan), &codec)?;
        println!(
            "{format:?}: `lambda q: pc.add(q, 1)` payload = {} bytes, whole plan = {} bytes",
            payload.len(),
            plan_bytes.len()
        );
    }

    // A worker: a fresh context with no UDF registered and its own cache.
    let cache = Arc::new(CallableCache::new(64 << 20));
    let codec = PythonUdfCodec::new(CodecOptions::default().with_cache(Arc::clone(&cache)));
    let bytes = physical_plan_to_bytes_with_extension_codec(Arc::clone(&plan), &codec)?;
    let worker = SessionContext::new();
    let decoded =
        physical_plan_from_bytes_with_extension_codec(&bytes, &worker.task_ctx(), &codec)?;
    let batches = collect(decoded, worker.task_ctx()).await?;
    println!(
        "\nresult on a context that never registered the UDFs:\n{}",
        pretty_format_batches(&batches)?
    );

    // Decode (no Python), then the first call: cold (unpickles) vs cached.
    let payload = PythonUdfCodec::default()
        .encode_udf(&small_lambda)?
        .unwrap_or_default();
    let args = || datafusion::logical_expr::ScalarFunctionArgs {
        args: vec![datafusion::logical_expr::ColumnarValue::Array(Arc::new(
            arrow::array::Int64Array::from(vec![1]),
        ))],
        arg_fields: vec![Arc::new(arrow::datatypes::Field::new(
            "q",
            DataType::Int64,
            true,
        ))],
        number_rows: 1,
        return_field: Arc::new(arrow::datatypes::Field::new("r", DataType::Int64, true)),
        config_options: Arc::new(Default::default()),
    };
    let rounds = 1000u32;
    let mean = |f: &mut dyn FnMut() -> Result<()>| -> Result<Duration> {
        let start = Instant::now();
        for _ in 0..rounds {
            f()?;
        }
        Ok(start.elapsed() / rounds)
    };
    small_lambda.invoke_with_args(args())?; // warm pyarrow's import path first
    let call_only = mean(&mut || small_lambda.invoke_with_args(args()).map(|_| ()))?;
    let fresh = PythonUdfCodec::new(
        CodecOptions::default().with_cache(Arc::new(CallableCache::new(64 << 20))),
    );
    let decode_only = mean(&mut || fresh.try_decode_udf("add_one", &payload).map(|_| ()))?;
    let start = Instant::now();
    fresh
        .try_decode_udf("add_one", &payload)?
        .invoke_with_args(args())?;
    let cold = start.elapsed();
    let cached = mean(&mut || {
        fresh
            .try_decode_udf("add_one", &payload)?
            .invoke_with_args(args())
            .map(|_| ())
    })?;
    println!(
        "decode of `add_one` (parse, digest check; no Python): {}\n\
         decode + first call: cold {} (runs cloudpickle.loads), cached {}; a call alone: {}\n\
         (means of {rounds}; build with --release for meaningful numbers)",
        micros(decode_only),
        micros(cold),
        micros(cached),
        micros(call_only)
    );
    Ok(())
}
