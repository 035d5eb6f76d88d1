//! Counts rather than times: unpickles per worker process when one stage
//! plan is decoded and run for 1, 10 and 100 tasks (target: 1 per UDF), and
//! payload bytes of three kinds of UDF in our format and in datafusion-python's.
//! Prints Markdown tables (benches/run.sh copies them into the results).

use std::sync::Arc;

use arrow::datatypes::DataType;
use datafusion::logical_expr::{ScalarUDF, Volatility};
use dfship_benches::*;
use dfship_codec::{
    CallableCache, CodecOptions, PythonScalarUdf, PythonUdfCodec, UdfSignature, WireFormat,
};
use pyo3::prelude::*;

fn udf_from(name: &str, setup: &str, expression: &str) -> ScalarUDF {
    let source = std::ffi::CString::new(format!(
        "import pyarrow as pa\nimport pyarrow.compute as pc\n{setup}"
    ))
    .unwrap();
    Python::attach(|py| {
        let globals = pyo3::types::PyDict::new(py);
        py.run(&source, Some(&globals), None).unwrap();
        let callable = py
            .eval(
                &std::ffi::CString::new(expression).unwrap(),
                Some(&globals),
                None,
            )
            .unwrap();
        PythonScalarUdf::new(
            UdfSignature::new(
                name,
                vec![DataType::Int64],
                DataType::Int64,
                Volatility::Immutable,
            ),
            callable,
        )
        .unwrap()
        .into_scalar_udf()
    })
}

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    init_python();
    // Counts and times of this process's own interpreter and callable cache.
    dfship_codec::configure_python_execution(
        dfship_codec::PythonExecution::default().with_mode(dfship_codec::PythonMode::InProcess),
    )
    .expect("configure Python execution");
    let rt = runtime();
    let data = dataset(&rt);
    let task_ctx = Arc::new(datafusion::execution::TaskContext::default());

    println!("### Unpickles per worker process for one stage (10 Python UDFs)\n");
    println!("| tasks decoding the stage | unpickles | cache hits |");
    println!("|---:|---:|---:|");
    let plan = stage_plan(&rt, &data, 10);
    for tasks in [1usize, 10, 100] {
        let worker = codecs(Arc::new(CallableCache::new(64 << 20)));
        let bytes = encode(&worker, &plan);
        for _ in 0..tasks {
            run(
                &rt,
                decode(&worker, &bytes, &task_ctx).unwrap(),
                Arc::clone(&task_ctx),
            );
        }
        let stats = worker.cache.stats();
        println!(
            "| {tasks} | {} ({} per UDF) | {} |",
            stats.loads,
            stats.loads / 10,
            stats.hits
        );
    }

    println!("\n### Payload bytes per UDF\n");
    println!("| UDF | DFSHIPU (ours) | DFPYUDF v1 (datafusion-python) |");
    println!("|---|---:|---:|");
    let kinds = [
        ("small lambda `lambda a: pc.add(a, 1)`", udf_from("small", "", "lambda a: pc.add(a, 1)")),
        (
            "closure capturing a 1 MB NumPy array",
            udf_from(
                "closure",
                "import numpy as np\nweights = np.arange(131072, dtype=np.int64)\ndef make():\n    def f(a):\n        return pc.add(a, int(weights[0]))\n    return f\n",
                "make()",
            ),
        ),
        ("function imported by reference (`pyarrow.compute.abs`)", udf_from("by_reference", "", "pc.abs")),
    ];
    for (label, udf) in kinds {
        let ours = PythonUdfCodec::new(CodecOptions::default())
            .encode_udf(&udf)
            .unwrap()
            .unwrap()
            .len();
        let theirs = PythonUdfCodec::new(
            CodecOptions::default().with_write_format(WireFormat::DataFusionPython),
        )
        .encode_udf(&udf)
        .unwrap()
        .unwrap()
        .len();
        println!("| {label} | {ours} | {theirs} |");
    }
}
