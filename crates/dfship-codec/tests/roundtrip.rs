//! Plans calling Python UDFs survive encode → decode on a context that never
//! registered them, in both wire formats, and compute the same result.

mod common;

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields};
use common::*;
use datafusion::logical_expr::{ScalarUDF, Volatility};
use dfship_codec::wire::{dfpy::DFPY_MAGIC, inline::INLINE_MAGIC};
use dfship_codec::{CodecOptions, PythonScalarUdf, PythonUdfCodec, UdfSignature, WireFormat};
use pyo3::prelude::*;

const PA: &str = "import pyarrow as pa\nimport pyarrow.compute as pc\n";

fn codec(format: WireFormat) -> PythonUdfCodec {
    PythonUdfCodec::new(CodecOptions::default().with_write_format(format))
}

fn magic(format: WireFormat) -> &'static [u8] {
    match format {
        WireFormat::Inline => INLINE_MAGIC,
        WireFormat::DataFusionPython => DFPY_MAGIC,
    }
}

/// Runs `sql` with `udfs` registered, ships the plan through `format`, and
/// checks that the decoded plan (no UDF registered) computes the same rows
/// and schema. Returns the pretty-printed result.
async fn assert_roundtrip(udfs: Vec<ScalarUDF>, sql: &str, format: WireFormat) -> String {
    let ctx = session_with_data().await;
    for udf in udfs {
        ctx.register_udf(udf);
    }
    let plan = physical_plan(&ctx, sql).await;
    let codec = codec(format);
    let bytes = encode(Arc::clone(&plan), &codec).unwrap();
    assert!(
        find(&bytes, magic(format)).is_some(),
        "the plan carries the UDF inline"
    );
    let decoded = decode(&bytes, &codec).unwrap();
    assert_eq!(decoded.schema(), plan.schema(), "schema survives");
    let expected = pretty(&run(plan).await.unwrap());
    let actual = pretty(&run(decoded).await.unwrap());
    assert_eq!(actual, expected);
    actual
}

const FORMATS: [WireFormat; 2] = [WireFormat::Inline, WireFormat::DataFusionPython];

#[tokio::test]
async fn lambda() {
    for format in FORMATS {
        let udf = python_udf(
            "plus_one",
            vec![DataType::Int64],
            DataType::Int64,
            Volatility::Immutable,
            PA,
            "lambda a: pc.add(a, 1)",
        );
        let out = assert_roundtrip(vec![udf], "SELECT a, plus_one(a) AS p FROM v", format).await;
        assert!(out.contains("| 4 | 5 |"), "{out}");
    }
}

#[tokio::test]
async fn closure_with_captured_state() {
    let setup = format!("{PA}def make(factor, offsets):\n    def scale(a):\n        return pc.add(pc.multiply(a, factor), offsets['shift'])\n    return scale\n");
    for format in FORMATS {
        let udf = python_udf(
            "scale",
            vec![DataType::Int64],
            DataType::Int64,
            Volatility::Immutable,
            &setup,
            "make(7, {'shift': 100})",
        );
        let out = assert_roundtrip(vec![udf], "SELECT a, scale(a) AS s FROM v", format).await;
        assert!(out.contains("| 2 | 114 |"), "{out}");
    }
}

#[tokio::test]
async fn function_imported_by_reference() {
    let helpers = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python");
    // Where the UDF runs (the runners), the module is installed: on its path.
    std::env::set_var("PYTHONPATH", helpers);
    let setup =
        format!("import sys\nsys.path.insert(0, {helpers:?})\nimport dfship_test_helpers\n");
    for format in FORMATS {
        let udf = python_udf(
            "shout",
            vec![DataType::Utf8],
            DataType::Utf8,
            Volatility::Immutable,
            &setup,
            "dfship_test_helpers.shout",
        );
        let ctx = session_with_data().await;
        ctx.register_udf(udf.clone());
        let bytes = encode(
            physical_plan(&ctx, "SELECT shout(s) FROM v").await,
            &codec(format),
        )
        .unwrap();
        assert!(
            find(&bytes, b"dfship_test_helpers").is_some(),
            "travels as a module reference"
        );
        let out = assert_roundtrip(vec![udf], "SELECT s, shout(s) AS loud FROM v", format).await;
        assert!(out.contains("| beta  | BETA  |"), "{out}");
    }
}

#[tokio::test]
async fn several_arguments() {
    for format in FORMATS {
        let udf = python_udf(
            "weighted",
            vec![DataType::Int64, DataType::Float64, DataType::Utf8],
            DataType::Float64,
            Volatility::Immutable,
            PA,
            "lambda a, b, s: pc.add(pc.multiply(pc.cast(a, pa.float64()), b), pc.cast(pc.utf8_length(s), pa.float64()))",
        );
        let out = assert_roundtrip(vec![udf], "SELECT weighted(a, b, s) AS w FROM v", format).await;
        assert!(out.contains("| 6.5 "), "{out}");
    }
}

#[tokio::test]
async fn scalar_arguments_are_expanded_to_arrays() {
    for format in FORMATS {
        let udf = python_udf(
            "kind",
            vec![DataType::Int64, DataType::Utf8],
            DataType::Utf8,
            Volatility::Immutable,
            PA,
            "lambda a, tag: pc.binary_join_element_wise(pc.cast(a, pa.string()), tag, ':')",
        );
        let out = assert_roundtrip(vec![udf], "SELECT kind(a, 'x') AS k FROM v", format).await;
        assert!(out.contains("| 2:x |"), "{out}");
    }
}

#[tokio::test]
async fn every_volatility() {
    for format in FORMATS {
        for (volatility, name) in [
            (Volatility::Immutable, "vol_immutable"),
            (Volatility::Stable, "vol_stable"),
            (Volatility::Volatile, "vol_volatile"),
        ] {
            let udf = python_udf(
                name,
                vec![DataType::Int64],
                DataType::Int64,
                volatility,
                PA,
                "lambda a: pc.negate(a)",
            );
            let sql = format!("SELECT {name}(a) AS n FROM v");
            let ctx = session_with_data().await;
            ctx.register_udf(udf.clone());
            let bytes = encode(physical_plan(&ctx, &sql).await, &codec(format)).unwrap();
            let decoded = decode(&bytes, &codec(format)).unwrap();
            let found = find_udf(&decoded, name).expect("the decoded plan calls the UDF");
            assert_eq!(found.signature().volatility, volatility);
            assert_roundtrip(vec![udf], &sql, format).await;
        }
    }
}

#[tokio::test]
async fn nullable_and_non_nullable_returns() {
    for format in FORMATS {
        let callable = py_object(PA, "lambda a: pc.fill_null(a, 0)");
        let signature = UdfSignature::new(
            "zero_nulls",
            vec![DataType::Int64],
            DataType::Int64,
            Volatility::Immutable,
        )
        .with_return_field(Field::new("zero_nulls", DataType::Int64, false));
        let strict = Python::attach(|py| PythonScalarUdf::new(signature, callable.into_bound(py)))
            .unwrap()
            .into_scalar_udf();
        let nullable = python_udf(
            "keep_nulls",
            vec![DataType::Int64],
            DataType::Int64,
            Volatility::Immutable,
            PA,
            "lambda a: a",
        );
        let out = assert_roundtrip(
            vec![strict.clone(), nullable.clone()],
            "SELECT zero_nulls(a) AS z, keep_nulls(a) AS k FROM v",
            format,
        )
        .await;
        assert!(out.contains("| 0 |   |"), "{out}");

        let ctx = session_with_data().await;
        ctx.register_udf(strict);
        ctx.register_udf(nullable);
        let plan =
            physical_plan(&ctx, "SELECT zero_nulls(a) AS z, keep_nulls(a) AS k FROM v").await;
        let decoded = decode(&encode(plan, &codec(format)).unwrap(), &codec(format)).unwrap();
        let schema = decoded.schema();
        assert!(
            !schema.field(0).is_nullable(),
            "non-nullable return survives"
        );
        assert!(schema.field(1).is_nullable());
    }
}

#[tokio::test]
async fn list_and_struct_returns() {
    let list = DataType::List(Arc::new(Field::new("item", DataType::Int64, true)));
    let point = DataType::Struct(Fields::from(vec![
        Field::new("x", DataType::Int64, true),
        Field::new("y", DataType::Float64, true),
    ]));
    for format in FORMATS {
        let repeat = python_udf("repeat_twice", vec![DataType::Int64], list.clone(), Volatility::Immutable, PA,
            "lambda a: pa.array([None if v is None else [v, v] for v in a.to_pylist()], pa.list_(pa.int64()))");
        let to_point = python_udf(
            "to_point",
            vec![DataType::Int64, DataType::Float64],
            point.clone(),
            Volatility::Immutable,
            PA,
            "lambda a, b: pa.StructArray.from_arrays([a, b], names=['x', 'y'])",
        );
        let list_len = python_udf(
            "list_len",
            vec![list.clone()],
            DataType::Int32,
            Volatility::Immutable,
            PA,
            "lambda l: pc.list_value_length(l)",
        );
        let out = assert_roundtrip(
            vec![repeat, to_point, list_len],
            "SELECT repeat_twice(a) AS r, to_point(a, b) AS p, list_len(l) AS n FROM v",
            format,
        )
        .await;
        assert!(out.contains("[2, 2]"), "{out}");
        assert!(out.contains("{x: 4, y: 8.0}"), "{out}");
    }
}

#[tokio::test]
async fn other_udfs_travel_by_name() {
    use datafusion::logical_expr::{create_udf, ColumnarValue};
    let native = create_udf(
        "native_identity",
        vec![DataType::Int64],
        DataType::Int64,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| Ok(args[0].clone())),
    );
    let ctx = session_with_data().await;
    ctx.register_udf(native.clone());
    let plan = physical_plan(&ctx, "SELECT native_identity(a) FROM v").await;
    let codec = codec(WireFormat::Inline);
    let bytes = encode(plan, &codec).unwrap();
    assert!(find(&bytes, INLINE_MAGIC).is_none() && find(&bytes, DFPY_MAGIC).is_none());
    let error = decode(&bytes, &codec).unwrap_err().to_string();
    assert!(error.contains("native_identity"), "{error}");

    // With the UDF registered on the receiving side, by-name resolution works.
    let receiver = SessionContextWith::udf(native);
    let decoded = datafusion_proto::bytes::physical_plan_from_bytes_with_extension_codec(
        &bytes,
        &receiver.task_ctx(),
        &codec,
    )
    .unwrap();
    assert_eq!(
        run(decoded)
            .await
            .unwrap()
            .iter()
            .map(|b| b.num_rows())
            .sum::<usize>(),
        4
    );
}

struct SessionContextWith;
impl SessionContextWith {
    fn udf(udf: ScalarUDF) -> datafusion::prelude::SessionContext {
        let ctx = datafusion::prelude::SessionContext::new();
        ctx.register_udf(udf);
        ctx
    }
}

fn find_udf(
    plan: &Arc<dyn datafusion::physical_plan::ExecutionPlan>,
    name: &str,
) -> Option<Arc<ScalarUDF>> {
    use datafusion::physical_expr::ScalarFunctionExpr;
    use datafusion::physical_plan::projection::ProjectionExec;
    if let Some(projection) = plan.downcast_ref::<ProjectionExec>() {
        for expr in projection.expr() {
            if let Some(f) = expr.expr.downcast_ref::<ScalarFunctionExpr>() {
                if f.name() == name {
                    return Some(Arc::new(f.fun().clone()));
                }
            }
        }
    }
    plan.children()
        .into_iter()
        .find_map(|child| find_udf(child, name))
}
