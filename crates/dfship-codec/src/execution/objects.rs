//! [`RunnerObject`]: the accumulators of one aggregate in one partition,
//! living in one runner for their whole life.
//!
//! The first call places the object on a runner (an idle one, within the
//! UDF's `concurrency`); every later call goes to that runner, which serves
//! its socket in order. Updates and merges are *pipelined*: a call returns
//! as soon as its rows are handed to the pool, with up to [`PIPELINE`]
//! calls in flight, so the engine prepares the next batch while Python works
//! on this one. Their errors surface at the next call (at the latest when
//! the state or the result is asked for), never silently. States leave the
//! runner only when DataFusion asks for them (emit, spill, partial → final).
//!
//! If the runner dies, the state is gone: every later call fails with
//! `StateLost`, and the query with it. It is never rebuilt from a replay.

use std::collections::VecDeque;
use std::sync::Arc;

use arrow::array::{ArrayData, RecordBatch};
use arrow::datatypes::FieldRef;
use bytes::Bytes;
use datafusion::error::Result;
use dfship_runtime::protocol::{self, DONE};
use dfship_runtime::{CallSpec, CancelToken, ObjectCall, PendingCall};

use crate::execution::calls::result_of;
use crate::execution::errors::call_error;
use crate::execution::{function_spec, pool, wait_off_runtime};
use crate::function::PythonFunction;

/// Updates or merges of one object in flight at most.
pub(crate) const PIPELINE: usize = 3;

#[derive(Debug)]
pub(crate) struct RunnerObject {
    function: Arc<PythonFunction>,
    id: u64,
    created: bool,
    in_flight: VecDeque<PendingCall>,
    /// What the runner said the object holds, after the last call it answered.
    size: usize,
}

impl RunnerObject {
    pub(crate) fn new(function: Arc<PythonFunction>) -> Self {
        Self {
            function,
            id: pool().new_object_id(),
            created: false,
            in_flight: VecDeque::new(),
            size: 0,
        }
    }

    fn name(&self) -> &str {
        &self.function.signature.name
    }

    /// The bytes the runner holds for this object (as of its last answer).
    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// `left` of `before` groups remain after an emit that took the others:
    /// the runner holds about that share of what it reported.
    pub(crate) fn shrink(&mut self, left: usize, before: usize) {
        self.size = if before == 0 {
            0
        } else {
            (self.size as u128 * left as u128 / before as u128) as usize
        };
    }

    fn call(
        &mut self,
        op: u8,
        count: u64,
        take: bool,
        batches: &[RecordBatch],
    ) -> Result<CallSpec> {
        if self
            .function
            .task
            .get()
            .is_some_and(|task| task.is_cancelled())
        {
            let returns = self.function.signature.return_field.data_type();
            return Err(call_error(
                self.name(),
                returns,
                dfship_runtime::CallError::Cancelled,
            ));
        }
        let spec = wait_off_runtime(|| function_spec(&self.function))?;
        let streams = protocol::encode_streams(batches)?;
        let object = ObjectCall {
            id: self.id,
            create: !self.created,
        };
        self.created = true;
        Ok(CallSpec {
            function: spec,
            kind: protocol::AGGREGATE,
            body: vec![
                protocol::aggregate_head(self.id, object.create, op, count, take),
                Bytes::from(streams),
            ],
            object: Some(object),
            tenant: self.function.task.get().and_then(CancelToken::tenant),
            output: Some(crate::execution::output_sink(
                self.function.task_id(),
                self.name(),
            )),
        })
    }

    /// `AGG_UPDATE` or `AGG_MERGE` of `rows` (column 0: the group of each
    /// row) into an object of `groups` groups; returns once it is in flight.
    pub(crate) fn apply(&mut self, op: u8, groups: u64, rows: RecordBatch) -> Result<()> {
        self.settle(PIPELINE - 1)?;
        let call = self.call(op, groups, false, &[rows])?;
        self.in_flight.push_back(pool().submit(call));
        Ok(())
    }

    /// `AGG_STATE` or `AGG_EVALUATE` of the first `count` groups (`take`:
    /// and drop them); `shape` is an empty batch whose one field is the
    /// answer's. Waits for the calls in flight first.
    pub(crate) fn emit(
        &mut self,
        op: u8,
        count: u64,
        take: bool,
        shape: RecordBatch,
    ) -> Result<(FieldRef, ArrayData)> {
        self.settle(0)?;
        let call = self.call(op, count, take, &[shape])?;
        let name = self.function.signature.name.clone();
        let returns = self.function.signature.return_field.data_type().clone();
        let task = self.function.task.get().cloned();
        let reply = wait_off_runtime(|| pool().submit(call).wait(pool(), task.as_ref()))
            .map_err(|e| call_error(&name, &returns, e))?;
        result_of(&name, reply)
    }

    /// Waits until at most `keep` calls are in flight; the first failure
    /// among those waited for is returned.
    fn settle(&mut self, keep: usize) -> Result<()> {
        // Answers already in are collected without waiting.
        while let Some(front) = self.in_flight.front_mut() {
            match front.try_take() {
                Some(answer) => {
                    self.in_flight.pop_front();
                    self.absorb(answer)?;
                }
                None => break,
            }
        }
        while self.in_flight.len() > keep {
            let Some(call) = self.in_flight.pop_front() else {
                break;
            };
            let task = self.function.task.get().cloned();
            let answer = wait_off_runtime(|| call.wait(pool(), task.as_ref()));
            self.absorb(answer)?;
        }
        Ok(())
    }

    fn absorb(
        &mut self,
        answer: std::result::Result<dfship_runtime::Reply, dfship_runtime::CallError>,
    ) -> Result<()> {
        let returns = self.function.signature.return_field.data_type();
        let reply = answer.map_err(|e| call_error(self.name(), returns, e))?;
        if reply.kind != DONE {
            return Err(datafusion::error::DataFusionError::Execution(format!(
                "the runner of Python aggregate UDF '{}' answered message kind {} to an update",
                self.name(),
                reply.kind
            )));
        }
        let size = protocol::parse_done(&reply.body).map_err(|detail| {
            datafusion::error::DataFusionError::Execution(format!(
                "the runner of Python aggregate UDF '{}' answered {detail}",
                self.name()
            ))
        })?;
        self.size = usize::try_from(size).unwrap_or(usize::MAX);
        Ok(())
    }
}

impl Drop for RunnerObject {
    fn drop(&mut self) {
        if self.created {
            pool().close_object(self.id);
        }
    }
}
