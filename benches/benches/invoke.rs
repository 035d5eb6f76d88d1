//! Per-batch cost of calling a Python UDF (`lambda a: pc.add(a, 1)`) against
//! the same function as a native Rust UDF (arrow's `add`), for batches of
//! 1 k to 64 k rows, in the Python mode named by `DFSHIP_BENCH_PYTHON_MODE`:
//! `pool` (a runner process: Arrow IPC over a Unix socket both ways) or
//! `in-process` (this process's interpreter: zero-copy through the C Data
//! Interface). `benches/run.sh` runs it once per mode, side by side.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array};
use arrow::datatypes::{DataType, Field};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use datafusion::config::ConfigOptions;
use datafusion::logical_expr::{
    create_udf, ColumnarValue, ScalarFunctionArgs, ScalarUDF, Volatility,
};
use dfship_benches::init_python;
use dfship_integration_tests::python_udf;

fn native_plus_one() -> ScalarUDF {
    create_udf(
        "native_plus_one",
        vec![DataType::Int64],
        DataType::Int64,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let one = arrow::array::Scalar::new(Int64Array::from(vec![1]));
            Ok(ColumnarValue::Array(arrow::compute::kernels::numeric::add(
                &arrays[0], &one,
            )?))
        }),
    )
}

fn call(udf: &ScalarUDF, input: &ArrayRef) -> usize {
    let field = Arc::new(Field::new("a", DataType::Int64, true));
    let result = udf
        .invoke_with_args(ScalarFunctionArgs {
            args: vec![ColumnarValue::Array(Arc::clone(input))],
            arg_fields: vec![Arc::clone(&field)],
            number_rows: input.len(),
            return_field: field,
            config_options: Arc::new(ConfigOptions::default()),
        })
        .unwrap();
    match result {
        ColumnarValue::Array(array) => array.len(),
        ColumnarValue::Scalar(_) => 1,
    }
}

fn bench(c: &mut Criterion) {
    init_python();
    let mode = std::env::var("DFSHIP_BENCH_PYTHON_MODE").unwrap_or_else(|_| "pool".to_string());
    dfship_codec::configure_python_execution(
        dfship_codec::PythonExecution::default()
            .with_mode(
                mode.parse()
                    .expect("DFSHIP_BENCH_PYTHON_MODE is pool or in-process"),
            )
            .with_runners(1),
    )
    .expect("configure Python execution");
    let python = python_udf(
        "py_plus_one",
        vec![DataType::Int64],
        DataType::Int64,
        "",
        "lambda a: pc.add(a, 1)",
    );
    let native = native_plus_one();
    let mut group = c.benchmark_group(format!("invoke_{}", mode.replace('-', "_")));
    for rows in [1024usize, 8192, 65536] {
        let input: ArrayRef = Arc::new(Int64Array::from_iter_values(0..rows as i64));
        group.throughput(Throughput::Elements(rows as u64));
        group.bench_with_input(BenchmarkId::new("python", rows), &input, |b, input| {
            b.iter(|| call(&python, input))
        });
        group.bench_with_input(BenchmarkId::new("native", rows), &input, |b, input| {
            b.iter(|| call(&native, input))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
