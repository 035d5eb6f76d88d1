//! Aggregate and window UDF payloads: our `DFSHIPA`/`DFSHIPW` frames and
//! datafusion-python's `DFPYUDA`/`DFPYUDW` round-trip; tampering, truncation,
//! a payload of the wrong kind and an unsigned payload on a keyed codec are
//! errors, never panics; the payload sizes of a small UDAF and UDWF in both
//! formats are printed (for the record) and bounded.

mod common;

use arrow::datatypes::DataType;
use common::*;
use datafusion_proto::physical_plan::PhysicalExtensionCodec;
use dfship_codec::wire::dfpy::{DFPY_AGGREGATE_MAGIC, DFPY_WINDOW_MAGIC};
use dfship_codec::wire::inline::{AGGREGATE_MAGIC, WINDOW_MAGIC};
use dfship_codec::{ClusterKey, CodecOptions, PythonUdfCodec, UdfPayloadError, WireFormat};

const SETUP: &str = "import pyarrow as pa\nimport pyarrow.compute as pc\n\
class Total:\n    def __init__(self):\n        self.t = 0\n    def update(self, v):\n        self.t += pc.sum(v).as_py() or 0\n    def merge(self, s):\n        self.t += pc.sum(s[0]).as_py() or 0\n    def state(self):\n        return [self.t]\n    def evaluate(self):\n        return self.t\n\
class Running:\n    def evaluate_all(self, values, n):\n        return pc.cumulative_sum(values[0])\n";

fn udaf() -> datafusion::logical_expr::AggregateUDF {
    python_udaf(
        "total",
        vec![DataType::Int64],
        DataType::Int64,
        vec![DataType::Int64],
        SETUP,
        "Total",
    )
}

fn udwf() -> datafusion::logical_expr::WindowUDF {
    python_udwf(
        "running",
        vec![DataType::Int64],
        DataType::Int64,
        SETUP,
        "Running",
    )
}

fn key() -> ClusterKey {
    ClusterKey::new(vec![7; 32]).unwrap()
}

fn refused(error: datafusion::error::DataFusionError) -> UdfPayloadError {
    UdfPayloadError::find(&error)
        .cloned()
        .unwrap_or_else(|| panic!("not a payload error: {error}"))
}

#[test]
fn frames_round_trip_in_both_formats_and_keep_the_state_schema() {
    for format in [WireFormat::Inline, WireFormat::DataFusionPython] {
        let codec = PythonUdfCodec::new(CodecOptions::default().with_write_format(format));
        let aggregate = codec.encode_udaf(&udaf()).unwrap().expect("inline");
        let window = codec.encode_udwf(&udwf()).unwrap().expect("inline");
        let (a_magic, w_magic) = match format {
            WireFormat::Inline => (AGGREGATE_MAGIC, WINDOW_MAGIC),
            WireFormat::DataFusionPython => (DFPY_AGGREGATE_MAGIC, DFPY_WINDOW_MAGIC),
        };
        assert!(aggregate.starts_with(a_magic) && window.starts_with(w_magic));
        println!(
            "payload sizes ({format:?}): UDAF 'total' {} bytes, UDWF 'running' {} bytes",
            aggregate.len(),
            window.len()
        );
        assert!(aggregate.len() < 4096 && window.len() < 4096);

        let decoded = codec.try_decode_udaf("total", &aggregate).unwrap();
        let state = decoded
            .state_fields(datafusion::logical_expr::function::StateFieldsArgs {
                name: "total",
                input_fields: &[],
                return_field: std::sync::Arc::new(arrow::datatypes::Field::new(
                    "total",
                    DataType::Int64,
                    true,
                )),
                ordering_fields: &[],
                is_distinct: false,
            })
            .unwrap();
        assert_eq!(state.len(), 1);
        assert_eq!(state[0].data_type(), &DataType::Int64);
        // Re-encoding what was received sends the same bytes.
        assert_eq!(codec.encode_udaf(&decoded).unwrap().unwrap(), aggregate);
        let decoded = codec.try_decode_udwf("running", &window).unwrap();
        assert_eq!(codec.encode_udwf(&decoded).unwrap().unwrap(), window);
    }
}

#[test]
fn a_payload_of_another_kind_is_refused() {
    let codec = PythonUdfCodec::default();
    let aggregate = codec.encode_udaf(&udaf()).unwrap().unwrap();
    let window = codec.encode_udwf(&udwf()).unwrap().unwrap();
    let error = refused(codec.try_decode_udwf("total", &aggregate).unwrap_err());
    assert!(
        error
            .to_string()
            .contains("calls it as a window function but its payload holds an aggregate function"),
        "{error}"
    );
    assert!(codec.try_decode_udaf("running", &window).is_err());
    assert!(codec.try_decode_udf("running", &window).is_err());
}

#[test]
fn truncated_or_tampered_frames_are_errors_not_panics() {
    let keyed = PythonUdfCodec::new(CodecOptions::default().with_cluster_key(key()));
    let aggregate = keyed.encode_udaf(&udaf()).unwrap().unwrap();
    let window = keyed.encode_udwf(&udwf()).unwrap().unwrap();
    for end in 0..aggregate.len() {
        assert!(keyed.try_decode_udaf("total", &aggregate[..end]).is_err());
    }
    for end in 0..window.len() {
        assert!(keyed.try_decode_udwf("running", &window[..end]).is_err());
    }
    // Every single flipped byte is caught (by the tag, or by the framing
    // before it), and nothing is unpickled.
    for at in 7..aggregate.len() {
        let mut bytes = aggregate.to_vec();
        bytes[at] ^= 0x01;
        assert!(
            keyed.try_decode_udaf("total", &bytes).is_err(),
            "a flipped byte at {at} passed"
        );
    }
    // Unsigned frames and datafusion-python's payloads are refused by a keyed codec.
    let unsigned = PythonUdfCodec::default()
        .encode_udaf(&udaf())
        .unwrap()
        .unwrap();
    assert!(matches!(
        refused(keyed.try_decode_udaf("total", &unsigned).unwrap_err()),
        UdfPayloadError::Unsigned { .. }
    ));
    let dfpy = PythonUdfCodec::new(
        CodecOptions::default().with_write_format(WireFormat::DataFusionPython),
    )
    .encode_udwf(&udwf())
    .unwrap()
    .unwrap();
    assert!(matches!(
        refused(keyed.try_decode_udwf("running", &dfpy).unwrap_err()),
        UdfPayloadError::UnsignableDataFusionPython { .. }
    ));
    // The user's own coordinator trusts them, and signs them on.
    let trusting = keyed.trusting_datafusion_python();
    let decoded = trusting.try_decode_udwf("running", &dfpy).unwrap();
    let signed = keyed.encode_udwf(&decoded).unwrap().unwrap();
    assert!(signed.starts_with(WINDOW_MAGIC));
    keyed.try_decode_udwf("running", &signed).unwrap();
}

#[test]
fn an_aggregate_frame_without_state_types_is_malformed() {
    let codec = PythonUdfCodec::default();
    let mut frame = codec.encode_udaf(&udaf()).unwrap().unwrap().to_vec();
    // Make it claim to be a window frame: the state schema is then trailing bytes.
    frame[..7].copy_from_slice(WINDOW_MAGIC);
    assert!(codec.try_decode_udwf("total", &frame).is_err());
}

#[test]
fn a_corrupt_window_node_is_an_error_not_a_panic() {
    use std::sync::Arc;

    use datafusion::physical_plan::empty::EmptyExec;
    use datafusion::physical_plan::ExecutionPlan;
    use datafusion::prelude::SessionContext;
    use datafusion_proto::physical_plan::DefaultPhysicalProtoConverter;

    let codec = PythonUdfCodec::default();
    let ctx = SessionContext::new().task_ctx();
    let schema = Arc::new(arrow::datatypes::Schema::empty());
    let input: Arc<dyn ExecutionPlan> = Arc::new(EmptyExec::new(schema));
    let converter = DefaultPhysicalProtoConverter {};
    for blob in [
        b"DFSHIPWN".to_vec(),
        b"DFSHIPWN\xff\xff\xff\xff".to_vec(),
        [b"DFSHIPWN".as_slice(), &[0x0a; 64]].concat(),
    ] {
        let error = codec
            .try_decode(&blob, std::slice::from_ref(&input), &ctx, &converter)
            .expect_err("garbage is refused");
        assert!(!error.to_string().is_empty());
        let error = codec
            .try_decode(&blob, &[], &ctx, &converter)
            .expect_err("a window node without its input is refused");
        assert!(error.to_string().contains("one input"), "{error}");
    }
    // Anything else is not ours.
    let error = codec
        .try_decode(b"something else", &[], &ctx, &converter)
        .unwrap_err();
    assert!(error
        .to_string()
        .contains("compose it with the codec that wrote this node"));
}

/// A peer's plan with Python window-node blobs nested in each other, far
/// deeper than any plan dfship makes: refused with an error, not a stack
/// overflow of the worker.
#[test]
fn window_node_blobs_nested_without_end_are_refused() {
    use datafusion::physical_plan::empty::EmptyExec;
    use datafusion::physical_plan::ExecutionPlan;
    use datafusion_proto::protobuf::physical_plan_node::PhysicalPlanType;
    use datafusion_proto::protobuf::{PhysicalExtensionNode, PhysicalPlanNode};
    use prost::Message;
    use std::sync::Arc;

    let codec = PythonUdfCodec::new(CodecOptions::default());
    let schema = Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("x", DataType::Int64, true),
    ]));
    let empty: Arc<dyn ExecutionPlan> = Arc::new(EmptyExec::new(Arc::clone(&schema)));
    let empty_bytes = datafusion_proto::bytes::physical_plan_to_bytes_with_extension_codec(
        Arc::clone(&empty),
        &codec,
    )
    .unwrap();
    let empty_proto = PhysicalPlanNode::decode(empty_bytes.as_ref()).unwrap();
    // Innermost: an empty plan; each level wraps the previous one in a
    // window-node blob, as an extension node with one input.
    let mut blob = b"DFSHIPWN".to_vec();
    blob.extend_from_slice(&empty_proto.encode_to_vec());
    for _ in 0..20_000 {
        let node = PhysicalPlanNode {
            physical_plan_type: Some(PhysicalPlanType::Extension(PhysicalExtensionNode {
                node: blob,
                inputs: vec![empty_proto.clone()],
            })),
        };
        blob = b"DFSHIPWN".to_vec();
        blob.extend_from_slice(&node.encode_to_vec());
    }
    let ctx = datafusion::prelude::SessionContext::new();
    // On a thread with a small stack, as a tokio worker thread has.
    let error = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            codec
                .try_decode(
                    &blob,
                    &[empty],
                    &ctx.task_ctx(),
                    &datafusion_proto::physical_plan::DefaultPhysicalProtoConverter {},
                )
                .unwrap_err()
                .to_string()
        })
        .unwrap()
        .join()
        .expect("decoding returns an error instead of overflowing the stack");
    assert!(error.contains("nested more than"), "{error}");
}
