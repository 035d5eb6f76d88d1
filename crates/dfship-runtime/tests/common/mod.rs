//! Helpers for the runtime's tests: the project's Python, functions pickled
//! by it (so these tests need no embedded interpreter), and a pool of real
//! runner processes.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{ArrayRef, Int64Array};
use arrow::datatypes::{DataType, Field};
use bytes::Bytes;
use dfship_runtime::protocol::{self, RunnerVersions};
use dfship_runtime::{
    CallSpec, FunctionSpec, Launcher, PoolConfig, ProcessSettings, Reply, RunnerPool,
    DEFAULT_MAX_IN_FLIGHT,
};

/// The project's Python (the venv `scripts/setup.sh` makes).
pub fn python() -> PathBuf {
    let venv = std::env::var_os("VIRTUAL_ENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv"));
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "no Python at {}; run scripts/setup.sh first",
        python.display()
    );
    python
}

/// Runs `code` with the project's Python; returns its stdout.
pub fn run_python(code: &str) -> String {
    let output = Command::new(python())
        .arg("-c")
        .arg(code)
        .output()
        .expect("python runs");
    assert!(
        output.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

/// The versions of the project's Python and cloudpickle.
pub fn versions() -> RunnerVersions {
    let text = run_python(
        "import sys, cloudpickle; print(sys.version_info[0], sys.version_info[1], \
         cloudpickle.__version__.split('.')[0])",
    );
    let numbers: Vec<u8> = text
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    RunnerVersions {
        python_major: numbers[0],
        python_minor: numbers[1],
        cloudpickle_major: numbers[2],
    }
}

/// `expression` (after `setup`), cloudpickled by value.
pub fn pickle(setup: &str, expression: &str) -> Vec<u8> {
    let code = format!(
        "import cloudpickle, sys, base64\n{setup}\n\
         sys.stdout.write(base64.b16encode(cloudpickle.dumps({expression})).decode())"
    );
    let hex = run_python(&code);
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// A function spec for `expression`, keyed by a digest of its pickle.
pub fn function(name: &str, setup: &str, expression: &str) -> FunctionSpec {
    let pickle = pickle(setup, expression);
    let mut digest = [0u8; 32];
    // Distinct pickles, distinct keys (a real caller uses SHA-256).
    for (i, byte) in pickle.iter().enumerate() {
        digest[i % 32] = digest[i % 32].wrapping_mul(31).wrapping_add(*byte);
    }
    digest[0] ^= pickle.len() as u8;
    FunctionSpec {
        name: name.to_string(),
        digest,
        content: protocol::CONTENT_CALLABLE,
        pickle: Bytes::from(pickle),
        versions: versions(),
        concurrency: None,
        environment: None,
        max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        replayable: true,
    }
}

/// The configuration of a pool of `runners` runner processes of the project's Python.
pub fn config(runners: usize) -> PoolConfig {
    PoolConfig::new(
        runners,
        Launcher::Process(ProcessSettings {
            python: python(),
            memory_limit: None,
            env_remove: Vec::new(),
            user: None,
        }),
    )
}

/// A pool of `runners` real runner processes.
pub fn pool(runners: usize, timeout: Option<Duration>) -> RunnerPool {
    let mut config = config(runners);
    config.call_timeout = timeout;
    RunnerPool::new(config)
}

/// The int64 answer of one CALL of `function` on `values`.
pub fn answer(pool: &RunnerPool, function: &Arc<FunctionSpec>, values: Vec<i64>) -> Vec<i64> {
    ints(
        pool.submit(call(function, values))
            .wait(pool, None)
            .unwrap(),
    )
}

/// A CALL of `function` on one int64 column.
pub fn call(function: &Arc<FunctionSpec>, values: Vec<i64>) -> CallSpec {
    let rows = values.len();
    let column: ArrayRef = Arc::new(Int64Array::from(values));
    let field = Arc::new(Field::new("x", DataType::Int64, true));
    let stream = protocol::encode_arguments(&[column], &[field], rows).unwrap();
    CallSpec {
        function: Arc::clone(function),
        kind: protocol::CALL,
        body: vec![Bytes::from(stream)],
        object: None,
        tenant: None,
        output: None,
    }
}

/// The int64 values of a RESULT.
pub fn ints(reply: Reply) -> Vec<i64> {
    assert_eq!(reply.kind, protocol::RESULT);
    let (_, data) = protocol::decode_result(reply.body).unwrap();
    Int64Array::from(data).values().to_vec()
}

/// One IPC message, framed as in a stream (continuation marker, padded length).
fn framed(message: &[u8]) -> Vec<u8> {
    let padded = message.len().div_ceil(8) * 8;
    let mut out = Vec::new();
    out.extend_from_slice(&[0xff; 4]);
    out.extend_from_slice(&(padded as u32).to_le_bytes());
    out.extend_from_slice(message);
    out.resize(8 + padded, 0);
    out
}

/// A stream whose schema message has no `fields` vector: valid to the
/// flatbuffer verifier, a panic in arrow-ipc 59's `fb_to_schema`.
pub fn schema_without_fields() -> Vec<u8> {
    use arrow::ipc::{MessageBuilder, MessageHeader, MetadataVersion, SchemaBuilder};
    let mut fbb = flatbuffers::FlatBufferBuilder::new();
    let schema = SchemaBuilder::new(&mut fbb).finish();
    let mut message = MessageBuilder::new(&mut fbb);
    message.add_version(MetadataVersion::V5);
    message.add_header_type(MessageHeader::Schema);
    message.add_header(schema.as_union_value());
    let message = message.finish();
    fbb.finish(message, None);
    let mut stream = framed(fbb.finished_data());
    stream.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
    stream
}

/// A valid one-column int64 schema, then a record batch message declaring
/// a body of `body_length` bytes and carrying none: arrow-ipc 59's
/// `StreamReader` allocates the declared length before reading it.
pub fn batch_declaring_body(body_length: i64) -> Vec<u8> {
    use arrow::ipc::{MessageBuilder, MessageHeader, MetadataVersion, RecordBatchBuilder};
    let schema = arrow::datatypes::Schema::new(vec![Field::new("x", DataType::Int64, true)]);
    let mut stream = Vec::new();
    {
        let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut stream, &schema).unwrap();
        writer.flush().unwrap();
    }
    let mut fbb = flatbuffers::FlatBufferBuilder::new();
    let mut batch = RecordBatchBuilder::new(&mut fbb);
    batch.add_length(1);
    let batch = batch.finish();
    let mut message = MessageBuilder::new(&mut fbb);
    message.add_version(MetadataVersion::V5);
    message.add_header_type(MessageHeader::RecordBatch);
    message.add_header(batch.as_union_value());
    message.add_bodyLength(body_length);
    let message = message.finish();
    fbb.finish(message, None);
    stream.extend_from_slice(&framed(fbb.finished_data()));
    stream
}
