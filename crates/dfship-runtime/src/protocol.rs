//! The runner protocol: the one definition of its messages, ops, error
//! classes and byte layouts on the Rust side. `runner/dfship_runner.py`
//! (the runner) declares the same numbers; `tests/protocol_table.rs` holds
//! the two to each other through [`table`], and a runner announces
//! [`PROTOCOL_VERSION`] in its READY message, so a pool never talks to a
//! runner of another version.
//!
//! Every message, both ways, is `kind: u8 | request: u64 LE | length: u64 LE
//! | body`. The module docs of the runner describe each body. This module is
//! pure bytes and Arrow IPC: nothing here touches a process or an interpreter.

use std::sync::Arc;

use arrow::array::{ArrayData, ArrayRef, RecordBatch, RecordBatchOptions};
use arrow::buffer::Buffer;
use arrow::datatypes::{Field, FieldRef, Schema, SchemaRef};
use arrow::ipc::reader::StreamDecoder;
use arrow::ipc::writer::StreamWriter;
use bytes::Bytes;

/// The protocol this build speaks; a runner announcing another is refused.
pub const PROTOCOL_VERSION: u16 = 3;

/// The size of a message header: kind, request id, body length.
pub const HEADER_LEN: usize = 17;

macro_rules! numbers {
    ($( $(#[$doc:meta])* $name:ident = $value:expr ),* $(,)?) => {
        $( $(#[$doc])* pub const $name: u8 = $value; )*
        const NUMBERS: &[(&str, u64)] = &[ $( (stringify!($name), $value as u64) ),* ];
    };
}

numbers! {
    /// Parent to runner: a pickled function.
    LOAD = 1,
    /// Parent to runner: a scalar UDF call on one batch.
    CALL = 2,
    /// Parent to runner: drop a function (no reply).
    FORGET = 3,
    /// Parent to runner: an op on an aggregate's accumulators.
    AGGREGATE = 4,
    /// Parent to runner: an op of a window evaluator.
    WINDOW = 5,
    /// Parent to runner: drop an object (no reply).
    CLOSE = 6,
    /// Parent to runner: cancel the call the header names (no reply).
    CANCEL = 7,
    /// Runner to parent: started (protocol and interpreter versions, pid).
    READY = 10,
    /// Runner to parent: a LOAD succeeded (flags).
    LOADED = 11,
    /// Runner to parent: an Arrow IPC stream of one single-column batch.
    RESULT = 12,
    /// Runner to parent: a call failed (error class, text).
    ERROR = 13,
    /// Runner to parent: an aggregate op done (the object's size).
    DONE = 14,
    /// Runner to parent: what a call wrote (stdout, stderr, logging,
    /// warnings), sent before the call's answer; see [`parse_output`].
    OUTPUT = 15,
    RAISED = 0,
    MODULE_MISSING = 1,
    UNPICKLE_FAILED = 2,
    NOT_AN_ARRAY = 3,
    OUT_OF_MEMORY = 4,
    PROTOCOL = 5,
    STARTUP = 6,
    BAD_RESULT = 7,
    INIT_FAILED = 8,
    CONTENT_CALLABLE = 0,
    CONTENT_DATAFUSION_TUPLE = 1,
    FLAG_ASYNC = 1,
    FLAG_CLASS = 2,
    AGG_UPDATE = 0,
    AGG_MERGE = 1,
    AGG_STATE = 2,
    AGG_EVALUATE = 3,
    AGG_CONVERT = 4,
    WIN_DESCRIBE = 0,
    WIN_ALL = 1,
    WIN_RANK = 2,
    WIN_FRAMES = 3,
    STREAM_STDOUT = 0,
    STREAM_STDERR = 1,
    STREAM_LOGGING = 2,
    STREAM_WARNING = 3,
}

/// Every number of the protocol by the name both sides give it, the
/// version included: the runner must declare exactly these.
pub fn table() -> Vec<(&'static str, u64)> {
    let mut table = vec![("PROTOCOL_VERSION", PROTOCOL_VERSION as u64)];
    table.extend_from_slice(NUMBERS);
    table
}

/// What an ERROR message says went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The UDF raised.
    Raised,
    /// Unpickling needs a module the runner cannot import (text: its name).
    ModuleMissing,
    /// Unpickling failed otherwise.
    UnpickleFailed,
    /// A scalar UDF returned something that is not an Arrow array.
    NotAnArray,
    /// The runner ran out of memory (a `MemoryError`).
    OutOfMemory,
    /// The runner did not understand the parent.
    Protocol,
    /// The runner could not start (pyarrow or cloudpickle missing).
    Startup,
    /// A value of the wrong shape or type (text says how).
    BadResult,
    /// A class UDF's `__init__` raised.
    InitFailed,
}

impl ErrorClass {
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            RAISED => Self::Raised,
            MODULE_MISSING => Self::ModuleMissing,
            UNPICKLE_FAILED => Self::UnpickleFailed,
            NOT_AN_ARRAY => Self::NotAnArray,
            OUT_OF_MEMORY => Self::OutOfMemory,
            PROTOCOL => Self::Protocol,
            STARTUP => Self::Startup,
            BAD_RESULT => Self::BadResult,
            INIT_FAILED => Self::InitFailed,
            _ => return None,
        })
    }
}

/// A message header as it travels.
pub fn header(kind: u8, request: u64, length: u64) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[0] = kind;
    header[1..9].copy_from_slice(&request.to_le_bytes());
    header[9..].copy_from_slice(&length.to_le_bytes());
    header
}

/// `(kind, request, length)` of a header.
pub fn parse_header(header: &[u8; HEADER_LEN]) -> (u8, u64, u64) {
    let mut request = [0u8; 8];
    request.copy_from_slice(&header[1..9]);
    let mut length = [0u8; 8];
    length.copy_from_slice(&header[9..]);
    (
        header[0],
        u64::from_le_bytes(request),
        u64::from_le_bytes(length),
    )
}

/// The versions a runner announces in READY.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RunnerVersions {
    pub python_major: u8,
    pub python_minor: u8,
    pub cloudpickle_major: u8,
}

/// A READY body: `protocol u16 | python major | minor | cloudpickle major | pid u32`.
pub fn parse_ready(body: &[u8]) -> Result<(u16, RunnerVersions, u32), String> {
    if body.len() != 9 {
        return Err(format!(
            "a READY message of {} bytes (expected 9)",
            body.len()
        ));
    }
    let protocol = u16::from_le_bytes([body[0], body[1]]);
    let pid = u32::from_le_bytes([body[5], body[6], body[7], body[8]]);
    Ok((
        protocol,
        RunnerVersions {
            python_major: body[2],
            python_minor: body[3],
            cloudpickle_major: body[4],
        },
        pid,
    ))
}

/// The arguments of one call as an Arrow IPC stream: one batch whose columns
/// are `arg_0`, `arg_1`, … with the metadata of `fields` (so extension types
/// reach Python as such); a batch without columns still carries the row count.
pub fn encode_arguments(
    arrays: &[ArrayRef],
    fields: &[FieldRef],
    number_rows: usize,
) -> arrow::error::Result<Vec<u8>> {
    let schema_fields: Vec<Field> = arrays
        .iter()
        .enumerate()
        .map(|(i, array)| {
            let field = Field::new(format!("arg_{i}"), array.data_type().clone(), true);
            match fields.get(i) {
                Some(declared) => field.with_metadata(declared.metadata().clone()),
                None => field,
            }
        })
        .collect();
    let schema = Arc::new(Schema::new(schema_fields));
    let batch = RecordBatch::try_new_with_options(
        Arc::clone(&schema),
        arrays.to_vec(),
        &RecordBatchOptions::new().with_row_count(Some(number_rows)),
    )?;
    encode_batch(&batch)
}

/// One batch as an Arrow IPC stream.
pub fn encode_batch(batch: &RecordBatch) -> arrow::error::Result<Vec<u8>> {
    let mut writer = StreamWriter::try_new(Vec::new(), &batch.schema())?;
    writer.write(batch)?;
    writer.finish()?;
    writer.into_inner()
}

/// `streams` of an AGGREGATE or WINDOW body: `(length u64 LE | one-batch stream)*`.
pub fn encode_streams(batches: &[RecordBatch]) -> arrow::error::Result<Vec<u8>> {
    let mut body = Vec::new();
    for batch in batches {
        let stream = encode_batch(batch)?;
        body.extend_from_slice(&(stream.len() as u64).to_le_bytes());
        body.extend_from_slice(&stream);
    }
    Ok(body)
}

/// The body of an AGGREGATE call after the digest.
pub fn aggregate_head(object: u64, create: bool, op: u8, count: u64, take: bool) -> Bytes {
    let mut head = Vec::with_capacity(19);
    head.extend_from_slice(&object.to_le_bytes());
    head.push(create as u8);
    head.push(op);
    head.extend_from_slice(&count.to_le_bytes());
    head.push(take as u8);
    Bytes::from(head)
}

/// The end-of-stream marker of an Arrow IPC stream.
const END_OF_STREAM: [u8; 8] = [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];

/// A whole Arrow IPC stream held in memory, decoded as bytes from an
/// untrusted peer must be: its schema and every batch, validated.
///
/// Two things of arrow-ipc 59 make its `StreamReader` unfit for such bytes,
/// and this avoids both:
/// - it allocates a message's declared body length before reading it, so a
///   few bytes declaring 2^60 could abort the process; the push decoder
///   used here grows its buffer only with bytes that really came;
/// - it unwraps optional parts of a verified flatbuffer (a schema without
///   its fields vector panics in `fb_to_schema`): any panic is caught here
///   and becomes an error.
pub fn decode_stream(bytes: Vec<u8>) -> Result<(SchemaRef, Vec<RecordBatch>), String> {
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        // arrow-ipc 59's push decoder leaves a message whose body is empty
        // (a schema) undecoded when it ends exactly at the end of the bytes,
        // until more bytes come: a stream without its end-of-stream marker
        // (pyarrow's `Schema.serialize()`) gets one.
        let mut bytes = bytes;
        if !bytes.ends_with(&END_OF_STREAM) {
            bytes.extend_from_slice(&END_OF_STREAM);
        }
        let mut buffer = Buffer::from_vec(bytes);
        let mut decoder = StreamDecoder::new();
        let mut batches = Vec::new();
        while !buffer.is_empty() {
            match decoder.decode(&mut buffer).map_err(|e| e.to_string())? {
                Some(batch) => batches.push(batch),
                None => break,
            }
        }
        decoder.finish().map_err(|e| e.to_string())?;
        let schema = decoder
            .schema()
            .ok_or_else(|| "the stream holds no schema".to_string())?;
        Ok((schema, batches))
    }));
    match decoded {
        Ok(decoded) => decoded,
        Err(panic) => Err(format!(
            "arrow-ipc rejected it with a panic: {}",
            panic_text(panic.as_ref())
        )),
    }
}

/// The message of a caught panic.
pub fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

/// The one column of a RESULT stream and its field (which carries an
/// extension type's metadata). The stream is decoded by [`decode_stream`]
/// (validated, no panic, no allocation beyond the bytes received); the
/// caller checks the column against the signature.
pub fn decode_result(bytes: Vec<u8>) -> Result<(FieldRef, ArrayData), String> {
    let (_, mut batches) = decode_stream(bytes)
        .map_err(|e| format!("its result is not a valid Arrow IPC stream ({e})"))?;
    let batch = match batches.len() {
        1 => batches.remove(0),
        0 => return Err("its result stream holds no batch".to_string()),
        _ => return Err("its result stream holds more than one batch".to_string()),
    };
    if batch.num_columns() != 1 {
        return Err(format!(
            "its result batch has {} columns instead of 1",
            batch.num_columns()
        ));
    }
    Ok((
        Arc::clone(&batch.schema().fields()[0]),
        batch.column(0).to_data(),
    ))
}

/// Where a line of a call's output was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputStream {
    Stdout,
    Stderr,
    /// A `logging` record (formatted as `LEVEL logger: message`).
    Logging,
    /// A `warnings.warn` (formatted as `file:line: Category: message`).
    Warning,
}

impl OutputStream {
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            STREAM_STDOUT => Self::Stdout,
            STREAM_STDERR => Self::Stderr,
            STREAM_LOGGING => Self::Logging,
            STREAM_WARNING => Self::Warning,
            _ => return None,
        })
    }

    /// The name users see: `stdout`, `stderr`, `logging`, `warning`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
            Self::Logging => "logging",
            Self::Warning => "warning",
        }
    }
}

/// What one call wrote, as an OUTPUT message carries it: the lines the
/// runner kept (it keeps at most a per-call budget) and how much it dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallOutput {
    pub lines: Vec<(OutputStream, String)>,
    pub dropped_lines: u64,
    pub dropped_bytes: u64,
}

/// The most lines one OUTPUT message may carry.
pub const MAX_OUTPUT_LINES: usize = 100_000;

/// An OUTPUT body: `dropped lines u64 | dropped bytes u64 | (stream u8 |
/// length u32 | UTF-8 text)*`. Invalid UTF-8 is replaced, never refused;
/// anything else malformed is an error (the runner is then broken).
pub fn parse_output(body: &[u8]) -> Result<CallOutput, String> {
    if body.len() < 16 {
        return Err(format!(
            "an OUTPUT message of {} bytes (at least 16)",
            body.len()
        ));
    }
    let word = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&body[at..at + 8]);
        u64::from_le_bytes(bytes)
    };
    let mut output = CallOutput {
        lines: Vec::new(),
        dropped_lines: word(0),
        dropped_bytes: word(8),
    };
    let mut at = 16;
    while at < body.len() {
        if at + 5 > body.len() {
            return Err("an OUTPUT message with a truncated line header".to_string());
        }
        let stream = OutputStream::from_code(body[at])
            .ok_or_else(|| format!("an OUTPUT line of unknown stream {}", body[at]))?;
        let length =
            u32::from_le_bytes([body[at + 1], body[at + 2], body[at + 3], body[at + 4]]) as usize;
        at += 5;
        let text = body
            .get(at..at.saturating_add(length))
            .ok_or_else(|| "an OUTPUT line longer than its message".to_string())?;
        if output.lines.len() >= MAX_OUTPUT_LINES {
            return Err(format!(
                "an OUTPUT message of more than {MAX_OUTPUT_LINES} lines"
            ));
        }
        output
            .lines
            .push((stream, String::from_utf8_lossy(text).into_owned()));
        at += length;
    }
    Ok(output)
}

/// An OUTPUT body for `output` (what a runner sends; for tests and tools).
pub fn encode_output(output: &CallOutput) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&output.dropped_lines.to_le_bytes());
    body.extend_from_slice(&output.dropped_bytes.to_le_bytes());
    for (stream, text) in &output.lines {
        body.push(match stream {
            OutputStream::Stdout => STREAM_STDOUT,
            OutputStream::Stderr => STREAM_STDERR,
            OutputStream::Logging => STREAM_LOGGING,
            OutputStream::Warning => STREAM_WARNING,
        });
        body.extend_from_slice(&(text.len() as u32).to_le_bytes());
        body.extend_from_slice(text.as_bytes());
    }
    body
}

/// A DONE body: the size of the object the call changed.
pub fn parse_done(body: &[u8]) -> Result<u64, String> {
    let bytes: [u8; 8] = body
        .try_into()
        .map_err(|_| format!("a DONE message of {} bytes (expected 8)", body.len()))?;
    Ok(u64::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::ipc::reader::StreamReader;
    use std::collections::HashMap;
    use std::io::Cursor;

    #[test]
    fn headers_round_trip() {
        let bytes = header(CALL, u64::MAX - 3, 42);
        assert_eq!(parse_header(&bytes), (CALL, u64::MAX - 3, 42));
    }

    #[test]
    fn the_table_has_no_duplicate_names() {
        let table = table();
        let names: HashMap<_, _> = table.iter().cloned().collect();
        assert_eq!(names.len(), table.len());
        assert_eq!(names["PROTOCOL_VERSION"], PROTOCOL_VERSION as u64);
        assert_eq!(names["CALL"], CALL as u64);
    }

    #[test]
    fn arguments_keep_their_field_metadata_and_row_count() {
        let ints: ArrayRef = Arc::new(Int64Array::from(vec![Some(1), None]));
        let strings: ArrayRef = Arc::new(StringArray::from(vec!["a", "b"]));
        let tagged: FieldRef = Arc::new(
            Field::new("x", arrow::datatypes::DataType::Int64, true)
                .with_metadata([("k".to_string(), "v".to_string())].into()),
        );
        let bytes = encode_arguments(&[ints, strings], &[tagged], 2).unwrap();
        let batch = StreamReader::try_new(Cursor::new(bytes), None)
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        assert_eq!((batch.num_rows(), batch.num_columns()), (2, 2));
        assert_eq!(batch.schema().field(0).metadata()["k"], "v");
        let nothing = encode_arguments(&[], &[], 5).unwrap();
        let batch = StreamReader::try_new(Cursor::new(nothing), None)
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        assert_eq!((batch.num_rows(), batch.num_columns()), (5, 0));
    }

    #[test]
    fn a_result_stream_must_hold_one_valid_single_column_batch() {
        assert!(decode_result(b"not arrow".to_vec()).is_err());
        let column: ArrayRef = Arc::new(Int64Array::from(vec![7]));
        let ok = encode_arguments(&[column], &[], 1).unwrap();
        assert_eq!(decode_result(ok).unwrap().1.len(), 1);
        let two: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(vec![1])),
            Arc::new(Int64Array::from(vec![2])),
        ];
        let wide = encode_arguments(&two, &[], 1).unwrap();
        assert!(decode_result(wide).unwrap_err().contains("2 columns"));
    }

    #[test]
    fn output_bodies_round_trip_and_malformed_ones_are_refused() {
        let output = CallOutput {
            lines: vec![
                (OutputStream::Stdout, "hello".to_string()),
                (
                    OutputStream::Warning,
                    "x.py:3: UserWarning: careful".to_string(),
                ),
                (OutputStream::Logging, String::new()),
            ],
            dropped_lines: 7,
            dropped_bytes: 70,
        };
        let body = encode_output(&output);
        assert_eq!(parse_output(&body).unwrap(), output);
        assert!(parse_output(&body[..10]).is_err());
        assert!(parse_output(&body[..body.len() - 1]).is_err());
        let mut unknown = body.clone();
        unknown[16] = 9;
        assert!(parse_output(&unknown).unwrap_err().contains("stream 9"));
        let mut huge = body[..16].to_vec();
        huge.extend_from_slice(&[0, 0xff, 0xff, 0xff, 0xff, b'x']);
        assert!(parse_output(&huge).is_err());
        let mut bad_utf8 = body[..16].to_vec();
        bad_utf8.extend_from_slice(&[1, 2, 0, 0, 0, 0xff, b'a']);
        assert_eq!(parse_output(&bad_utf8).unwrap().lines[0].1, "\u{fffd}a");
    }

    #[test]
    fn ready_and_done_bodies_are_checked() {
        let mut ready = PROTOCOL_VERSION.to_le_bytes().to_vec();
        ready.extend_from_slice(&[3, 11, 3]);
        ready.extend_from_slice(&77u32.to_le_bytes());
        let (protocol, versions, pid) = parse_ready(&ready).unwrap();
        assert_eq!(
            (protocol, versions.python_minor, pid),
            (PROTOCOL_VERSION, 11, 77)
        );
        assert!(parse_ready(&ready[..5]).is_err());
        assert_eq!(parse_done(&9u64.to_le_bytes()), Ok(9));
        assert!(parse_done(b"short").is_err());
    }
}
