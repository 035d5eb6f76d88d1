//! Test harness: Python UDFs from source, a generated Parquet dataset, and
//! clusters of real datafusion-distributed workers serving gRPC on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

use arrow::util::pretty::pretty_format_batches;
use datafusion::arrow::datatypes::DataType;
use datafusion::error::Result;
use datafusion::logical_expr::{ScalarUDF, Volatility};
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use datafusion_distributed::Worker;
use dfship_codec::{CodecOptions, PythonScalarUdf, UdfSignature};
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
        dfship_codec::python::use_python_environment(&venv).expect("activate the venv");
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
        let callable = py
            .eval(
                &std::ffi::CString::new(expression).unwrap(),
                Some(&globals),
                None,
            )
            .expect("expression evaluates");
        PythonScalarUdf::new(
            UdfSignature::new(name, inputs, output, Volatility::Immutable),
            callable,
        )
    })
    .expect("a callable")
    .into_scalar_udf()
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
            let worker = Worker::from_session_builder(builder.clone());
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            servers.spawn(async move {
                tonic::transport::Server::builder()
                    .add_service(worker.into_worker_server())
                    .serve_with_incoming(incoming)
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

/// A worker session builder with default codec options and `cache` for unpickled callables.
pub fn worker_builder(cache: Arc<dfship_codec::CallableCache>) -> PythonWorkerSessionBuilder {
    PythonWorkerSessionBuilder::new(CodecOptions::default().with_cache(cache))
}
