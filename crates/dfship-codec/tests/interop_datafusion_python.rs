//! Interoperability with the real `datafusion==55.0.0` package from PyPI, in
//! both directions, through its DFPYUDF payload format.

mod common;

use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::DataType;
use common::*;
use datafusion::logical_expr::Volatility;
use dfship_codec::wire::dfpy::{DFPY_AGGREGATE_MAGIC, DFPY_MAGIC, DFPY_WINDOW_MAGIC};
use dfship_codec::{CodecOptions, PythonUdfCodec, WireFormat};

fn venv_python(script: &str, dir: &Path) -> String {
    let output = Command::new(venv().join("bin/python"))
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/python")
                .join(script),
        )
        .arg(dir)
        .output()
        .expect("the venv's python runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn read_ipc(path: &Path) -> Vec<RecordBatch> {
    arrow::ipc::reader::FileReader::try_new(File::open(path).unwrap(), None)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test]
async fn plans_from_datafusion_python_run_here() {
    init_python();
    let dir = tempfile::tempdir().unwrap();
    let log = venv_python("dfpy_export.py", dir.path());
    let codec = PythonUdfCodec::default();
    let mut checked = 0;
    for (name, magic) in [
        ("projection", DFPY_MAGIC),
        ("closure_filter", DFPY_MAGIC),
        ("two_args_aggregate", DFPY_MAGIC),
        ("udaf", DFPY_AGGREGATE_MAGIC),
        ("udwf", DFPY_WINDOW_MAGIC),
    ] {
        assert!(log.contains(&format!("wrote {name}")), "{log}");
        let bytes = std::fs::read(dir.path().join(format!("{name}.plan"))).unwrap();
        assert!(
            find(&bytes, magic).is_some(),
            "{name} carries datafusion-python payloads"
        );
        let plan = decode(&bytes, &codec).unwrap_or_else(|e| panic!("{name}: {e}"));
        let actual = pretty(&run(plan).await.unwrap());
        let expected = pretty(&read_ipc(&dir.path().join(format!("{name}.arrow"))));
        assert_eq!(actual, expected, "{name}");
        checked += 1;
    }
    assert_eq!(checked, 5);
}

#[tokio::test]
async fn plans_written_here_run_in_datafusion_python() {
    let ctx = session_with_data().await;
    let pa = "import pyarrow as pa\nimport pyarrow.compute as pc\n";
    ctx.register_udf(python_udf(
        "plus_one",
        vec![DataType::Int64],
        DataType::Int64,
        Volatility::Immutable,
        pa,
        "lambda a: pc.add(a, 1)",
    ));
    ctx.register_udf(python_udf(
        "scaled",
        vec![DataType::Int64, DataType::Float64],
        DataType::Float64,
        Volatility::Stable,
        &format!("{pa}def make(k):\n    return lambda a, b: pc.multiply(pc.multiply(pc.cast(a, pa.float64()), b), k)\n"),
        "make(2.0)",
    ));
    ctx.register_udf(python_udf(
        "shout",
        vec![DataType::Utf8],
        DataType::Utf8,
        Volatility::Volatile,
        pa,
        "lambda s: pc.utf8_upper(s)",
    ));
    let queries = [
        ("projection", "SELECT a, plus_one(a) AS p FROM v ORDER BY a"),
        (
            "closure_filter",
            "SELECT a, scaled(a, b) AS s FROM v WHERE plus_one(a) > 2 ORDER BY a",
        ),
        (
            "aggregate",
            "SELECT shout(s) AS loud, sum(a) AS total FROM v GROUP BY shout(s) ORDER BY loud",
        ),
        (
            "udaf",
            "SELECT s, total_plus(a) AS t FROM v GROUP BY s ORDER BY s",
        ),
        (
            "udwf",
            "SELECT a, running(a) OVER (ORDER BY s) AS r FROM v ORDER BY s",
        ),
    ];
    let accumulators = format!(
        "{pa}class TotalPlus:\n    def __init__(self):\n        self.t = 1\n    def update(self, v):\n        self.t += pc.sum(v).as_py() or 0\n    def merge(self, s):\n        self.t += (pc.sum(s[0]).as_py() or 0) - pc.count(s[0]).as_py()\n    def state(self):\n        return [self.t]\n    def evaluate(self):\n        return self.t\nclass Running:\n    def evaluate_all(self, values, n):\n        return pc.cumulative_sum(pc.fill_null(values[0], 0))\n"
    );
    ctx.register_udaf(python_udaf(
        "total_plus",
        vec![DataType::Int64],
        DataType::Int64,
        vec![DataType::Int64],
        &accumulators,
        "TotalPlus",
    ));
    ctx.register_udwf(python_udwf(
        "running",
        vec![DataType::Int64],
        DataType::Int64,
        &accumulators,
        "Running",
    ));
    let codec = PythonUdfCodec::new(
        CodecOptions::default().with_write_format(WireFormat::DataFusionPython),
    );
    let dir = tempfile::tempdir().unwrap();
    for (name, sql) in queries {
        let plan = physical_plan(&ctx, sql).await;
        let bytes = encode(Arc::clone(&plan), &codec).unwrap();
        assert!(
            [DFPY_MAGIC, DFPY_AGGREGATE_MAGIC, DFPY_WINDOW_MAGIC]
                .iter()
                .any(|magic| find(&bytes, *magic).is_some()),
            "{name} carries datafusion-python payloads"
        );
        std::fs::write(dir.path().join(format!("{name}.plan")), &bytes).unwrap();
        let batches = run(plan).await.unwrap();
        let file = File::create(dir.path().join(format!("{name}.arrow"))).unwrap();
        let mut writer =
            arrow::ipc::writer::FileWriter::try_new(file, &batches[0].schema()).unwrap();
        for batch in &batches {
            writer.write(batch).unwrap();
        }
        writer.finish().unwrap();
    }
    let log = venv_python("dfpy_import.py", dir.path());
    for (name, _) in queries {
        assert!(log.contains(&format!("ok {name}")), "{log}");
    }
}
