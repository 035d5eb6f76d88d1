//! Stateless calls: a scalar UDF on one batch, a window evaluator on one
//! partition, an aggregate's rows turned into states. Any runner serves them.

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayData, ArrayRef, RecordBatch};
use arrow::datatypes::FieldRef;
use bytes::Bytes;
use datafusion::error::{DataFusionError, Result};
use dfship_runtime::protocol::{self, RESULT};
use dfship_runtime::{CallError, CallSpec, CancelToken, PendingCall, Reply};

use crate::execution::errors::call_error;
use crate::execution::{
    function_spec, output_sink, pool, record_udf_figures, task_token, wait_off_runtime,
};
use crate::function::PythonFunction;
use crate::result_check::{checked_result, invalid_array};

/// One call of a scalar UDF on one batch: the arguments as arrays of the
/// batch's length, with their fields (extension types reach Python as such).
/// With `batch_size`, the batch is cut into slices (zero-copy) that are all
/// in flight at once: on several runners, and for an async UDF, several on
/// one runner. The result is checked against the signature.
pub(crate) fn call_scalar(
    function: &PythonFunction,
    args: &[ArrayRef],
    fields: &[FieldRef],
    number_rows: usize,
    task: Option<&str>,
) -> Result<ArrayRef> {
    let signature = &function.signature;
    let name = &signature.name;
    let returns = signature.return_field.data_type();
    if number_rows == 0 {
        return Ok(arrow::array::new_empty_array(returns));
    }
    let cancel = task.map(task_token);
    if cancel.as_ref().is_some_and(|token| token.is_cancelled()) {
        return Err(call_error(name, returns, CallError::Cancelled));
    }
    let slice_rows = function
        .options
        .batch_size
        .map_or(number_rows, |rows| rows.get() as usize);
    let started = Instant::now();
    let result = wait_off_runtime(|| {
        let spec = function_spec(function)?;
        let pool = pool();
        let output = output_sink(task, name);
        let mut pending: Vec<(usize, PendingCall)> = Vec::new();
        let mut offset = 0;
        while offset < number_rows {
            let rows = slice_rows.min(number_rows - offset);
            let slice: Vec<ArrayRef> = args.iter().map(|a| a.slice(offset, rows)).collect();
            let stream = protocol::encode_arguments(&slice, fields, rows)?;
            let call = CallSpec {
                function: Arc::clone(&spec),
                kind: protocol::CALL,
                body: vec![Bytes::from(stream)],
                object: None,
                tenant: cancel.as_ref().and_then(CancelToken::tenant),
                output: Some(output.clone()),
            };
            pending.push((rows, pool.submit(call)));
            offset += rows;
        }
        // Every slice is waited for, so none outlives the batch unobserved.
        let mut results = Vec::with_capacity(pending.len());
        let mut failure = None;
        for (rows, call) in pending {
            let answer = call
                .wait(pool, cancel.as_ref())
                .map_err(|e| call_error(name, returns, e))
                .and_then(|reply| {
                    let (field, data) = result_of(name, reply)?;
                    checked_result(signature, Some(&field), data, rows)
                });
            match answer {
                Ok(result) => results.push(result),
                Err(error) => {
                    failure.get_or_insert(error);
                }
            }
        }
        if let Some(error) = failure {
            return Err(error);
        }
        match results.len() {
            1 => Ok(results.remove(0)),
            _ => {
                let parts: Vec<&dyn arrow::array::Array> =
                    results.iter().map(|a| a.as_ref()).collect();
                Ok(arrow::compute::concat(&parts)?)
            }
        }
    });
    record_udf_figures(
        name,
        task,
        number_rows.div_ceil(slice_rows.max(1)) as u64,
        number_rows as u64,
        started.elapsed(),
        result.is_err(),
    );
    result
}

/// One op of a window evaluator (`WINDOW`), on any runner; the result
/// column unchecked, with its field.
pub(crate) fn call_window(
    function: &PythonFunction,
    op: u8,
    batches: &[RecordBatch],
) -> Result<(FieldRef, ArrayData)> {
    let body = protocol::encode_streams(batches)?;
    stateless(
        function,
        protocol::WINDOW,
        vec![Bytes::from(vec![op]), Bytes::from(body)],
    )
}

/// Each row of `rows` as the state of an accumulator that saw only it;
/// `shape` is an empty batch whose one field is the state struct.
pub(crate) fn convert_to_state(
    function: &PythonFunction,
    rows: &RecordBatch,
    shape: &RecordBatch,
) -> Result<(FieldRef, ArrayData)> {
    let streams = protocol::encode_streams(&[rows.clone(), shape.clone()])?;
    stateless(
        function,
        protocol::AGGREGATE,
        vec![
            protocol::aggregate_head(0, false, protocol::AGG_CONVERT, 0, false),
            Bytes::from(streams),
        ],
    )
}

fn stateless(
    function: &PythonFunction,
    kind: u8,
    body: Vec<Bytes>,
) -> Result<(FieldRef, ArrayData)> {
    let name = &function.signature.name;
    let returns = function.signature.return_field.data_type();
    let started = Instant::now();
    let result = wait_off_runtime(|| {
        let spec = function_spec(function)?;
        let pool = pool();
        let call = CallSpec {
            function: spec,
            kind,
            body,
            object: None,
            tenant: function.task.get().and_then(CancelToken::tenant),
            output: Some(output_sink(function.task_id(), name)),
        };
        let reply = pool
            .submit(call)
            .wait(pool, function.task.get())
            .map_err(|e| call_error(name, returns, e))?;
        result_of(name, reply)
    });
    let rows = result.as_ref().map_or(0, |(_, data)| data.len() as u64);
    record_udf_figures(name, None, 1, rows, started.elapsed(), result.is_err());
    result
}

/// The column of a RESULT reply (anything else is a broken runner's).
pub(crate) fn result_of(name: &str, reply: Reply) -> Result<(FieldRef, ArrayData)> {
    if reply.kind != RESULT {
        return Err(DataFusionError::Execution(format!(
            "the runner of Python UDF '{name}' answered message kind {} where a result was due",
            reply.kind
        )));
    }
    protocol::decode_result(reply.body).map_err(|detail| invalid_array(name, &detail))
}
