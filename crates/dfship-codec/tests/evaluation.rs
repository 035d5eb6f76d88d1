//! How a Python UDF behaves when called: results are checked, and Python
//! exceptions become DataFusion errors that say what happened.

mod common;

use arrow::datatypes::{DataType, Field};
use common::*;
use datafusion::logical_expr::Volatility;
use dfship_codec::{PythonScalarUdf, UdfSignature};
use pyo3::prelude::*;

const PA: &str = "import pyarrow as pa\nimport pyarrow.compute as pc\n";

async fn query_error(udf: datafusion::logical_expr::ScalarUDF, sql: &str) -> String {
    let ctx = session_with_data().await;
    ctx.register_udf(udf);
    ctx.sql(sql)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap_err()
        .to_string()
}

#[tokio::test]
async fn wrong_length_names_udf_and_both_lengths() {
    let udf = python_udf(
        "too_short",
        vec![DataType::Int64],
        DataType::Int64,
        Volatility::Immutable,
        PA,
        "lambda a: a.slice(0, 1)",
    );
    let error = query_error(udf, "SELECT too_short(a) FROM v").await;
    assert!(
        error.contains("'too_short' returned 1 rows for a batch of 4"),
        "{error}"
    );
}

#[tokio::test]
async fn wrong_type_names_expected_and_actual() {
    let udf = python_udf(
        "wrong_type",
        vec![DataType::Int64],
        DataType::Int64,
        Volatility::Immutable,
        PA,
        "lambda a: pc.cast(a, pa.float64())",
    );
    let error = query_error(udf, "SELECT wrong_type(a) FROM v").await;
    assert!(
        error.contains("'wrong_type' is declared to return Int64 but returned Float64"),
        "{error}"
    );
}

#[tokio::test]
async fn non_array_results_are_refused() {
    let udf = python_udf(
        "not_array",
        vec![DataType::Int64],
        DataType::Int64,
        Volatility::Immutable,
        PA,
        "lambda a: 42",
    );
    let error = query_error(udf, "SELECT not_array(a) FROM v").await;
    assert!(
        error.contains(
            "'not_array' must return a pyarrow.Array of type Int64, but it returned a int"
        ),
        "{error}"
    );
}

#[tokio::test]
async fn nulls_from_a_non_nullable_udf_are_refused() {
    let callable = py_object(PA, "lambda a: a");
    let signature = UdfSignature::new(
        "never_null",
        vec![DataType::Int64],
        DataType::Int64,
        Volatility::Immutable,
    )
    .with_return_field(Field::new("never_null", DataType::Int64, false));
    let udf = Python::attach(|py| PythonScalarUdf::new(signature, callable.into_bound(py)))
        .unwrap()
        .into_scalar_udf();
    let error = query_error(udf, "SELECT never_null(a) FROM v").await;
    assert!(
        error.contains("'never_null' is declared non-nullable but returned 1 nulls"),
        "{error}"
    );
}

/// Arrays Python can build without validating them, each invalid in a way
/// that would be undefined behaviour in a Rust kernel: they are refused with
/// an error naming the UDF, and the next query runs.
#[tokio::test]
async fn invalid_arrow_results_are_refused_before_the_engine_reads_them() {
    let nested = DataType::Struct(vec![Field::new("x", DataType::Int64, false)].into());
    let cases = [
        (
            "bad_utf8",
            DataType::Utf8,
            "lambda a: pa.array([b'\\xff\\xfe'] * len(a), pa.binary()).view(pa.string())",
            "invalid",
        ),
        (
            "bad_offsets",
            DataType::Utf8,
            "lambda a: pa.Array.from_buffers(pa.string(), len(a), [None,              pa.py_buffer(__import__('struct').pack('<' + 'i' * (len(a) + 1), *([0, 5, 2] + [2] * (len(a) - 2)))),              pa.py_buffer(b'hello')])",
            "offset",
        ),
        (
            "bad_nested_nulls",
            nested.clone(),
            "lambda a: pa.StructArray.from_arrays([pa.array([None] * len(a), pa.int64())],              fields=[pa.field('x', pa.int64(), nullable=False)])",
            "null",
        ),
    ];
    for (name, returns, body, detail) in cases {
        let udf = python_udf(
            name,
            vec![DataType::Int64],
            returns,
            Volatility::Immutable,
            PA,
            body,
        );
        let ctx = session_with_data().await;
        ctx.register_udf(udf);
        let error = ctx
            .sql(&format!("SELECT {name}(a) FROM v"))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains(&format!(
                "[udf-bad-result] Python UDF '{name}' returned an invalid Arrow array"
            )),
            "{text}"
        );
        assert!(text.to_lowercase().contains(detail), "{name}: {text}");
        assert_eq!(
            dfship_codec::ErrorKind::of(&error),
            dfship_codec::ErrorKind::UdfBadResult
        );
        let rows = ctx
            .sql("SELECT count(*) FROM v")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert_eq!(rows[0].num_rows(), 1);
    }
}

#[tokio::test]
async fn python_exceptions_carry_type_message_and_traceback() {
    let setup = format!("{PA}def inner(a):\n    raise ValueError(f'bad input of length {{len(a)}}')\ndef explode(a):\n    return inner(a)\n");
    let udf = python_udf(
        "explode",
        vec![DataType::Int64],
        DataType::Int64,
        Volatility::Immutable,
        &setup,
        "explode",
    );
    let ctx = session_with_data().await;
    ctx.register_udf(udf);
    let error = ctx
        .sql("SELECT explode(a) FROM v")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("Python UDF 'explode' raised: ValueError: bad input of length 4"),
        "{error}"
    );
    assert!(
        error.contains("Traceback") && error.contains("in inner"),
        "{error}"
    );

    // The interpreter and the session are fine afterwards.
    ctx.register_udf(python_udf(
        "fine_after",
        vec![DataType::Int64],
        DataType::Int64,
        Volatility::Immutable,
        PA,
        "lambda a: pc.add(a, 1)",
    ));
    let ok = ctx
        .sql("SELECT fine_after(a) FROM v")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(ok.iter().map(|b| b.num_rows()).sum::<usize>(), 4);
}

#[test]
fn non_callables_are_refused_at_creation() {
    let object = py_object("", "42");
    let signature = UdfSignature::new(
        "not_callable",
        vec![],
        DataType::Int64,
        Volatility::Immutable,
    );
    let error = Python::attach(|py| PythonScalarUdf::new(signature, object.into_bound(py)))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("must be given a callable, got an object of type int"),
        "{error}"
    );
}

#[test]
fn arguments_reach_python_with_their_fields() {
    // A UUID column (an extension type over 16-byte binary) arrives as
    // pyarrow UUIDs, as datafusion-python hands it over.
    use arrow::array::{Array, FixedSizeBinaryArray, Int64Array};
    use std::sync::Arc;
    let udf = python_udf(
        "uuid_version",
        vec![DataType::FixedSizeBinary(16)],
        DataType::Int64,
        Volatility::Stable,
        PA,
        "lambda u: pa.array([x.version for x in u.to_pylist()], pa.int64())",
    );
    let v4 = [
        0x3a, 0x1f, 0x2b, 0x4c, 0x5d, 0x6e, 0x4f, 0x70, 0x81, 0x92, 0xa3, 0xb4, 0xc5, 0xd6, 0xe7,
        0xf8,
    ];
    let input = Arc::new(FixedSizeBinaryArray::try_from_iter(vec![v4, v4].into_iter()).unwrap());
    let field = Field::new("u", DataType::FixedSizeBinary(16), true)
        .with_metadata([("ARROW:extension:name".to_string(), "arrow.uuid".to_string())].into());
    let out = udf
        .invoke_with_args(datafusion::logical_expr::ScalarFunctionArgs {
            args: vec![datafusion::logical_expr::ColumnarValue::Array(input)],
            arg_fields: vec![Arc::new(field)],
            number_rows: 2,
            return_field: Arc::new(Field::new("r", DataType::Int64, true)),
            config_options: Arc::new(Default::default()),
        })
        .unwrap();
    let datafusion::logical_expr::ColumnarValue::Array(out) = out else {
        panic!("an array")
    };
    let out = out.as_any().downcast_ref::<Int64Array>().unwrap();
    assert_eq!(out.values().to_vec(), vec![4, 4]);
}
