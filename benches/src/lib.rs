//! Shared set-up of the micro benchmarks: stage plans with 0, 1 or 10 Python
//! UDFs (or the same plan with built-in expressions), encoded the way the
//! coordinator ships them and decoded the way workers read them.

use std::sync::Arc;

use arrow::datatypes::DataType;
use datafusion::error::Result;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use datafusion_proto::physical_plan::DeduplicatingProtoConverter;
use dfship_codec::{CallableCache, CodecOptions};
use dfship_distributed::InlineUdfs;
use dfship_integration_tests::{python_udf, register_dataset, write_dataset};

pub use dfship_integration_tests::init_python;

/// A dataset directory that lives as long as the benchmark.
pub struct Dataset {
    pub dir: tempfile::TempDir,
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

pub fn dataset(rt: &tokio::runtime::Runtime) -> Dataset {
    let dir = tempfile::tempdir().expect("a temp dir");
    rt.block_on(write_dataset(dir.path())).expect("the dataset");
    Dataset { dir }
}

/// The physical plan of `SELECT e0, …, e9 FROM facts WHERE id < 2` where the
/// first `python` expressions call distinct Python UDFs `u{i}(id)` and the
/// rest are the built-in `id + i`: the same plan shape for every count.
pub fn stage_plan(
    rt: &tokio::runtime::Runtime,
    data: &Dataset,
    python: usize,
) -> Arc<dyn ExecutionPlan> {
    let ctx = SessionContext::new();
    rt.block_on(register_dataset(&ctx, data.dir.path()))
        .unwrap();
    let mut columns = Vec::new();
    for i in 0..10 {
        if i < python {
            ctx.register_udf(python_udf(
                &format!("u{i}"),
                vec![DataType::Int64],
                DataType::Int64,
                "",
                &format!("lambda a: pc.add(a, {i})"),
            ));
            columns.push(format!("u{i}(id) AS c{i}"));
        } else {
            columns.push(format!("id + {i} AS c{i}"));
        }
    }
    let sql = format!("SELECT {} FROM facts WHERE id < 2", columns.join(", "));
    rt.block_on(async { ctx.sql(&sql).await?.create_physical_plan().await })
        .unwrap()
}

/// Coordinator and worker halves sharing one callable cache.
pub struct Codecs {
    pub inline: InlineUdfs,
    pub cache: Arc<CallableCache>,
}

pub fn codecs(cache: Arc<CallableCache>) -> Codecs {
    Codecs {
        inline: InlineUdfs::new(CodecOptions::default().with_cache(Arc::clone(&cache))),
        cache,
    }
}

pub fn encode(codecs: &Codecs, plan: &Arc<dyn ExecutionPlan>) -> Vec<u8> {
    codecs
        .inline
        .encoder()
        .encode_plan(Arc::clone(plan))
        .unwrap()
}

pub fn decode(
    codecs: &Codecs,
    bytes: &[u8],
    task_ctx: &TaskContext,
) -> Result<Arc<dyn ExecutionPlan>> {
    datafusion_proto::bytes::physical_plan_from_bytes_with_proto_converter(
        bytes,
        task_ctx,
        &codecs.inline.encoder().decoder(),
        &DeduplicatingProtoConverter::default(),
    )
}

/// Runs a decoded stage plan (a few rows): the first call of each UDF.
pub fn run(
    rt: &tokio::runtime::Runtime,
    plan: Arc<dyn ExecutionPlan>,
    task_ctx: Arc<TaskContext>,
) -> usize {
    rt.block_on(datafusion::physical_plan::collect(plan, task_ctx))
        .unwrap()
        .iter()
        .map(|b| b.num_rows())
        .sum()
}
