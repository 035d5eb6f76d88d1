//! Guards the shim: these tests fail loudly once datafusion-distributed asks
//! user codecs for UDFs (apache/datafusion#24830), at which point
//! `dfship_distributed::encoder` and `channel` can be retired.

use std::sync::Arc;

use arrow::datatypes::DataType;
use datafusion::prelude::SessionConfig;
use datafusion_distributed::{DistributedCodec, DistributedExt};
use datafusion_proto::bytes::physical_plan_to_bytes_with_extension_codec;
use dfship_codec::wire::inline::INLINE_MAGIC;
use dfship_codec::PythonUdfCodec;
use dfship_distributed::InlineUdfs;
use dfship_integration_tests::*;

#[tokio::test]
async fn upstream_composition_still_drops_user_udf_payloads() {
    let ctx = datafusion::prelude::SessionContext::new();
    ctx.register_udf(python_udf(
        "guard_udf",
        vec![DataType::Int64],
        DataType::Int64,
        "",
        "lambda a: a",
    ));
    let plan = ctx
        .sql("SELECT guard_udf(v) FROM (VALUES (1), (2)) AS t(v)")
        .await
        .unwrap()
        .create_physical_plan()
        .await
        .unwrap();

    let config = SessionConfig::new().with_distributed_user_codec(PythonUdfCodec::default());
    let upstream = DistributedCodec::new_combined_with_user(&config);
    let bytes = physical_plan_to_bytes_with_extension_codec(Arc::clone(&plan), &upstream).unwrap();
    assert!(
        !bytes.windows(INLINE_MAGIC.len()).any(|w| w == INLINE_MAGIC),
        "datafusion-distributed now asks user codecs for UDFs: the InlineUdfEncoder / \
         InlineUdfChannelResolver shim in dfship-distributed can be retired"
    );

    // Our encoder writes the payload, and upstream's decoder (the workers') reads it.
    let inline = InlineUdfs::new(Default::default());
    let shipped = inline.encoder().encode_plan(plan).unwrap();
    assert!(shipped
        .windows(INLINE_MAGIC.len())
        .any(|w| w == INLINE_MAGIC));
    let decoded = datafusion_proto::bytes::physical_plan_from_bytes_with_extension_codec(
        &shipped,
        &datafusion::prelude::SessionContext::new().task_ctx(),
        &upstream,
    )
    .unwrap();
    let rows: usize = datafusion::physical_plan::collect(
        decoded,
        datafusion::prelude::SessionContext::new().task_ctx(),
    )
    .await
    .unwrap()
    .iter()
    .map(|b| b.num_rows())
    .sum();
    assert_eq!(rows, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_shim_workers_cannot_resolve_python_udfs() {
    use datafusion::execution::SessionStateBuilder;
    use datafusion_distributed::SessionStateBuilderExt;
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path()).await.unwrap();
    let cluster =
        InProcessCluster::start(2, worker_builder(dfship_codec::CallableCache::global())).await;
    let urls = cluster.urls.iter().map(|u| u.parse().unwrap()).collect();
    // The user codec registered the plain upstream way, with upstream's channels.
    let state = SessionStateBuilder::new()
        .with_default_features()
        .with_config(SessionConfig::new().with_target_partitions(4))
        .with_distributed_worker_resolver(dfship_distributed::StaticWorkers(urls))
        .with_distributed_planner()
        .with_distributed_user_codec(PythonUdfCodec::default())
        .with_distributed_file_scan_config_bytes_per_partition(1)
        .unwrap()
        .build();
    let ctx = datafusion::prelude::SessionContext::from(state);
    register_dataset(&ctx, dir.path()).await.unwrap();
    ctx.register_udf(python_udf(
        "unshipped",
        vec![DataType::Int64],
        DataType::Int64,
        "",
        "lambda a: a",
    ));
    let error = query_error(&ctx, "SELECT unshipped(id) FROM facts")
        .await
        .to_string();
    println!("{error}");
    assert!(
        error.contains("unshipped"),
        "without the shim the UDF travels by name and workers fail on it; if this query now \
         succeeds, upstream fixed the ordering and the shim can be retired. Error: {error}"
    );
}

/// datafusion-proto 55.2's `ComposedPhysicalExtensionCodec` does not forward
/// the window-UDF hooks, so a window UDF payload never reaches a user codec on
/// the workers. When this fails, upstream forwards them and
/// `dfship_codec::wrap_python_windows` / `PythonWindowNode` can be retired
/// (window UDFs would then travel through the encoder like aggregates).
#[tokio::test]
async fn upstream_composition_still_cannot_decode_window_udf_payloads() {
    use datafusion_proto::physical_plan::PhysicalExtensionCodec;

    let codec = PythonUdfCodec::default();
    let running = python_udwf(
        "guard_udwf",
        vec![DataType::Int64],
        DataType::Int64,
        "class Running:\n    def evaluate_all(self, values, n):\n        return pc.cumulative_sum(values[0])\n",
        "Running",
    );
    let payload = codec.encode_udwf(&running).unwrap().expect("inline");
    let config = SessionConfig::new().with_distributed_user_codec(codec);
    let upstream = DistributedCodec::new_combined_with_user(&config);
    // The envelope the composed codec reads: our codec is at position 1.
    let wrapped = enveloped(&payload);
    let error = upstream
        .try_decode_udwf("guard_udwf", &wrapped)
        .expect_err("upstream still drops window UDF payloads");
    assert!(
        error
            .to_string()
            .contains("not provided for window function"),
        "upstream's composed codec changed how it treats window UDFs: {error}"
    );
    // The aggregate hook, by contrast, is forwarded (so aggregates travel like scalar UDFs).
    let total = python_udaf(
        "guard_udaf",
        vec![DataType::Int64],
        DataType::Int64,
        vec![DataType::Int64],
        "class Total:\n    def __init__(self):\n        self.t = 0\n    def update(self, v):\n        self.t += pc.sum(v).as_py() or 0\n    def merge(self, s):\n        self.t += pc.sum(s[0]).as_py() or 0\n    def state(self):\n        return [self.t]\n    def evaluate(self):\n        return self.t\n",
        "Total",
    );
    let payload = PythonUdfCodec::default()
        .encode_udaf(&total)
        .unwrap()
        .expect("inline");
    let wrapped = enveloped(&payload);
    let decoded = upstream.try_decode_udaf("guard_udaf", &wrapped).unwrap();
    assert_eq!(decoded.name(), "guard_udaf");
}

/// `blob` in the envelope of the codec at position 1 (ours, after `DistributedCodec`).
fn enveloped(blob: &[u8]) -> Vec<u8> {
    prost::Message::encode_to_vec(&Envelope {
        encoder_position: 1,
        blob: blob.to_vec(),
    })
}

/// datafusion-proto's (private) `DataEncoderTuple`.
#[derive(Clone, PartialEq, prost::Message)]
struct Envelope {
    #[prost(uint32, tag = "1")]
    encoder_position: u32,
    #[prost(bytes = "vec", tag = "2")]
    blob: Vec<u8>,
}
