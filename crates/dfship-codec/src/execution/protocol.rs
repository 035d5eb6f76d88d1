//! The messages between a runner pool and its runners (`python/dfship/_runner.py`
//! documents them from the runner's side). Pure bytes: framing and the
//! Arrow IPC encoding of argument and result batches.
//!
//! Every message is `kind: u8 | length: u64 LE | body`. A runner runs user
//! code, so what it sends is untrusted: bodies are bounded in size, read
//! into exactly-sized buffers, and results are decoded by arrow-ipc (which
//! validates buffers, offsets and UTF-8) and then checked against the UDF's
//! signature by the caller.

use std::io::{Cursor, Read, Write};
use std::sync::Arc;

use arrow::array::{ArrayData, ArrayRef, RecordBatch, RecordBatchOptions};
use arrow::datatypes::{Field, Schema};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;

pub(crate) const LOAD: u8 = 1;
pub(crate) const CALL: u8 = 2;
pub(crate) const FORGET: u8 = 3;
pub(crate) const AGGREGATE: u8 = 4;
pub(crate) const WINDOW: u8 = 5;
pub(crate) const READY: u8 = 10;
pub(crate) const LOADED: u8 = 11;
pub(crate) const RESULT: u8 = 12;
pub(crate) const ERROR: u8 = 13;

/// The largest message a runner may send (a result batch): 4 GiB.
pub(crate) const MAX_RUNNER_MESSAGE: u64 = 4 << 30;

/// What a runner's ERROR message says went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunnerErrorClass {
    Raised,
    ModuleMissing,
    UnpickleFailed,
    NotAnArray,
    OutOfMemory,
    Protocol,
    Startup,
    BadResult,
}

impl RunnerErrorClass {
    pub(crate) fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => Self::Raised,
            1 => Self::ModuleMissing,
            2 => Self::UnpickleFailed,
            3 => Self::NotAnArray,
            4 => Self::OutOfMemory,
            5 => Self::Protocol,
            6 => Self::Startup,
            7 => Self::BadResult,
            _ => return None,
        })
    }
}

/// A message as read from a runner.
#[derive(Debug)]
pub(crate) struct Message {
    pub kind: u8,
    pub body: Vec<u8>,
}

pub(crate) fn write_message(
    out: &mut impl Write,
    kind: u8,
    parts: &[&[u8]],
) -> std::io::Result<()> {
    let length: usize = parts.iter().map(|part| part.len()).sum();
    let mut header = [0u8; 9];
    header[0] = kind;
    header[1..].copy_from_slice(&(length as u64).to_le_bytes());
    out.write_all(&header)?;
    for part in parts {
        out.write_all(part)?;
    }
    out.flush()
}

/// Reads one message; a body longer than `max_body` is refused before any
/// of it is allocated.
pub(crate) fn read_message(input: &mut impl Read, max_body: u64) -> std::io::Result<Message> {
    let mut header = [0u8; 9];
    input.read_exact(&mut header)?;
    let mut length = [0u8; 8];
    length.copy_from_slice(&header[1..]);
    let length = u64::from_le_bytes(length);
    if length > max_body {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a message of {length} bytes, above the limit of {max_body}"),
        ));
    }
    let mut body = vec![0u8; length as usize];
    input.read_exact(&mut body)?;
    Ok(Message {
        kind: header[0],
        body,
    })
}

/// The arguments of one call as an Arrow IPC stream: one batch whose
/// columns are `arg_0`, `arg_1`, … (a batch without columns still carries
/// the row count, for UDFs without arguments).
pub(crate) fn encode_arguments(
    arrays: &[ArrayRef],
    number_rows: usize,
) -> arrow::error::Result<Vec<u8>> {
    let fields: Vec<Field> = arrays
        .iter()
        .enumerate()
        .map(|(i, array)| Field::new(format!("arg_{i}"), array.data_type().clone(), true))
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new_with_options(
        Arc::clone(&schema),
        arrays.to_vec(),
        &RecordBatchOptions::new().with_row_count(Some(number_rows)),
    )?;
    let mut writer = StreamWriter::try_new(Vec::new(), &schema)?;
    writer.write(&batch)?;
    writer.finish()?;
    writer.into_inner()
}

/// The body of an `AGGREGATE` or `WINDOW` message after the digest:
/// `op | (length u64 LE | one-batch Arrow IPC stream)*`.
pub(crate) fn encode_op(op: u8, batches: &[RecordBatch]) -> arrow::error::Result<Vec<u8>> {
    let mut body = vec![op];
    for batch in batches {
        let mut writer = StreamWriter::try_new(Vec::new(), &batch.schema())?;
        writer.write(batch)?;
        writer.finish()?;
        let stream = writer.into_inner()?;
        body.extend_from_slice(&(stream.len() as u64).to_le_bytes());
        body.extend_from_slice(&stream);
    }
    Ok(body)
}

/// The one column of a result stream. arrow-ipc validates what it decodes
/// (buffer sizes, offsets, UTF-8); the caller checks the signature.
pub(crate) fn decode_result(bytes: Vec<u8>) -> Result<ArrayData, String> {
    let mut reader = StreamReader::try_new(Cursor::new(bytes), None)
        .map_err(|e| format!("its result is not an Arrow IPC stream ({e})"))?;
    let batch = match reader.next() {
        Some(Ok(batch)) => batch,
        Some(Err(e)) => return Err(format!("its result batch is not valid Arrow data ({e})")),
        None => return Err("its result stream holds no batch".to_string()),
    };
    if reader.next().is_some() {
        return Err("its result stream holds more than one batch".to_string());
    }
    if batch.num_columns() != 1 {
        return Err(format!(
            "its result batch has {} columns instead of 1",
            batch.num_columns()
        ));
    }
    Ok(batch.column(0).to_data())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};

    #[test]
    fn messages_round_trip_and_oversized_bodies_are_refused() {
        let mut wire = Vec::new();
        write_message(&mut wire, CALL, &[b"abc", b"de"]).unwrap();
        let message = read_message(&mut Cursor::new(&wire), 16).unwrap();
        assert_eq!(
            (message.kind, message.body.as_slice()),
            (CALL, &b"abcde"[..])
        );
        let error = read_message(&mut Cursor::new(&wire), 4).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
        // A header promising more than arrives is an error, not a hang or a panic.
        let error = read_message(&mut Cursor::new(&wire[..7]), 16).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn arguments_encode_with_their_row_count() {
        let ints: ArrayRef = Arc::new(Int64Array::from(vec![Some(1), None]));
        let strings: ArrayRef = Arc::new(StringArray::from(vec!["a", "b"]));
        let bytes = encode_arguments(&[ints, strings], 2).unwrap();
        let batch = StreamReader::try_new(Cursor::new(bytes), None)
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        assert_eq!((batch.num_rows(), batch.num_columns()), (2, 2));
        let nothing = encode_arguments(&[], 5).unwrap();
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
        let ok = encode_arguments(&[column], 1).unwrap();
        assert_eq!(decode_result(ok).unwrap().len(), 1);
        let two: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(vec![1])),
            Arc::new(Int64Array::from(vec![2])),
        ];
        let wide = encode_arguments(&two, 1).unwrap();
        assert!(decode_result(wide).unwrap_err().contains("2 columns"));
    }
}
