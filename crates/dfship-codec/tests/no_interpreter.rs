//! A coordinator that only plans never needs Python: decoding our format and
//! re-encoding it leaves the interpreter unstarted. This file holds one test
//! so that nothing else in its process starts Python first.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema};
use datafusion::logical_expr::ScalarUDF;
use datafusion::physical_expr::ScalarFunctionExpr;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::expressions::col;
use datafusion::physical_plan::projection::{ProjectionExec, ProjectionExpr};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use datafusion_proto::bytes::{
    physical_plan_from_bytes_with_extension_codec, physical_plan_to_bytes_with_extension_codec,
};
use datafusion_proto::physical_plan::PhysicalExtensionCodec;
use dfship_codec::PythonUdfCodec;

/// A DFSHIPU frame built by hand: the pickle is never read on this path, so
/// its content does not matter (a real one would only be unpickled on call).
fn hand_made_frame() -> Vec<u8> {
    use sha2::Digest;
    let schema = |fields: Vec<Field>| {
        let mut w =
            arrow::ipc::writer::StreamWriter::try_new(Vec::new(), &Schema::new(fields)).unwrap();
        w.finish().unwrap();
        w.into_inner().unwrap()
    };
    let pickle = b"\x80\x05not unpickled here.".to_vec();
    let mut frame = b"DFSHIPU\x01\x03\x0b\x03\x00".to_vec();
    frame.extend_from_slice(&(5u16).to_le_bytes());
    frame.extend_from_slice(b"lazyf");
    frame.push(0);
    for s in [
        schema(vec![Field::new("arg_0", DataType::Int64, true)]),
        schema(vec![Field::new("lazyf", DataType::Int64, true)]),
    ] {
        frame.extend_from_slice(&(s.len() as u32).to_le_bytes());
        frame.extend_from_slice(&s);
    }
    frame.extend_from_slice(&sha2::Sha256::digest(&pickle));
    frame.extend_from_slice(&(pickle.len() as u32).to_le_bytes());
    frame.extend_from_slice(&pickle);
    frame
}

#[test]
fn plans_with_python_udfs_round_trip_without_an_interpreter() {
    let codec = PythonUdfCodec::default();
    let frame = hand_made_frame();
    let udf: Arc<ScalarUDF> = codec.try_decode_udf("lazyf", &frame).unwrap();
    assert_eq!(udf.name(), "lazyf");
    assert_eq!(
        udf.signature().type_signature,
        datafusion::logical_expr::TypeSignature::Exact(vec![DataType::Int64])
    );

    let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, true)]));
    let input: Arc<dyn ExecutionPlan> = Arc::new(EmptyExec::new(Arc::clone(&schema)));
    let call = ScalarFunctionExpr::try_new(
        udf,
        vec![col("a", &schema).unwrap()],
        &schema,
        Arc::new(Default::default()),
    )
    .unwrap();
    let plan: Arc<dyn ExecutionPlan> = Arc::new(
        ProjectionExec::try_new(
            vec![ProjectionExpr::new(Arc::new(call), "out".to_string())],
            input,
        )
        .unwrap(),
    );
    let bytes = physical_plan_to_bytes_with_extension_codec(Arc::clone(&plan), &codec).unwrap();
    let decoded = physical_plan_from_bytes_with_extension_codec(
        &bytes,
        &SessionContext::new().task_ctx(),
        &codec,
    )
    .unwrap();
    let again = physical_plan_to_bytes_with_extension_codec(decoded, &codec).unwrap();
    assert_eq!(
        bytes, again,
        "re-encoding emits the received payload unchanged"
    );
    assert!(
        bytes.windows(frame.len()).any(|w| w == frame.as_slice()),
        "the frame is carried byte for byte"
    );
    assert!(
        !dfship_codec::python_is_running(),
        "no interpreter was started"
    );
}
