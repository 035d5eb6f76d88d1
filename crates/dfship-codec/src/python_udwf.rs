//! [`PythonWindowUdf`]: a window UDF whose evaluator is Python
//! (datafusion-python's `WindowEvaluator`: `evaluate_all`, `evaluate`,
//! `evaluate_all_with_rank` and the flags that choose between them).
//!
//! Each call creates the evaluator afresh and hands it one partition (or,
//! for a function of its window frame, one frame), so calls are stateless
//! like those of aggregates and any runner serves them. The evaluator's
//! flags are asked once per UDF. `supports_bounded_execution` is reported to
//! DataFusion as false, so partitions arrive whole; an evaluator that only
//! implements `evaluate` row by row (bounded, no frame) is run row by row
//! over the whole partition inside one call. A function of its frame is
//! called once per row with the frame's rows (its range rebased to start
//! at 0), as `evaluate(values, range)` only reads the frame.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use arrow::array::{Array, ArrayRef, Int64Array, RecordBatch, RecordBatchOptions};
use arrow::datatypes::{DataType, Field, FieldRef, Schema};
use datafusion::common::ScalarValue;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::function::{PartitionEvaluatorArgs, WindowUDFFieldArgs};
use datafusion::logical_expr::{PartitionEvaluator, Signature, WindowUDF, WindowUDFImpl};
use pyo3::prelude::*;

use crate::execution::{self, StatelessKind};
use crate::function::{python_function_type, PythonFunction};
use crate::python_udf::engine_signature;
use crate::result_check::checked_result;
use crate::signature::UdfSignature;
use crate::wire::FunctionKind;

/// Ops of a `WINDOW` call (`python/dfship/_runner.py`, `_window`).
const DESCRIBE: u8 = 0;
const ALL: u8 = 1;
const RANK: u8 = 2;
const FRAME: u8 = 3;

/// A window UDF whose evaluator is a Python object; it travels inline.
///
/// ```no_run
/// use arrow::datatypes::DataType;
/// use datafusion::logical_expr::Volatility;
/// use dfship_codec::{PythonWindowUdf, UdfSignature};
/// use pyo3::prelude::*;
///
/// dfship_codec::ensure_python().unwrap();
/// let udwf = Python::attach(|py| {
///     let module = PyModule::from_code(py, c"
/// import pyarrow.compute as pc
/// class RunningTotal:
///     def evaluate_all(self, values, num_rows): return pc.cumulative_sum(values[0])
/// ", c"running.py", c"running")?;
///     let signature = UdfSignature::new("running_total", vec![DataType::Float64], DataType::Float64, Volatility::Immutable);
///     PyResult::Ok(PythonWindowUdf::new(signature, module.getattr("RunningTotal")?))
/// }).unwrap().unwrap();
/// let ctx = datafusion::prelude::SessionContext::new();
/// ctx.register_udwf(udwf.into_window_udf());
/// ```
#[derive(Debug)]
pub struct PythonWindowUdf {
    function: Arc<PythonFunction>,
    signature: Signature,
    flags: Arc<OnceLock<std::result::Result<Flags, String>>>,
}

/// What the evaluator says about itself.
#[derive(Debug, Clone, Copy, Default)]
struct Flags {
    uses_window_frame: bool,
    include_rank: bool,
    is_causal: bool,
}

impl PythonWindowUdf {
    /// `factory` makes a fresh evaluator: a class, or a function returning one.
    pub fn new(udf_signature: UdfSignature, factory: Bound<'_, PyAny>) -> Result<Self> {
        PythonFunction::live(FunctionKind::Window, udf_signature, factory).map(Self::from_function)
    }

    pub(crate) fn from_function(function: PythonFunction) -> Self {
        let signature = engine_signature(&function.signature);
        Self {
            function: Arc::new(function),
            signature,
            flags: Arc::default(),
        }
    }

    pub fn into_window_udf(self) -> WindowUDF {
        WindowUDF::new_from_impl(self)
    }
}

python_function_type!(PythonWindowUdf);

impl WindowUDFImpl for PythonWindowUdf {
    fn name(&self) -> &str {
        &self.function.signature.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn partition_evaluator(
        &self,
        _args: PartitionEvaluatorArgs,
    ) -> Result<Box<dyn PartitionEvaluator>> {
        Ok(Box::new(PythonPartitionEvaluator {
            function: Arc::clone(&self.function),
            flags: Arc::clone(&self.flags),
        }))
    }

    fn field(&self, field_args: WindowUDFFieldArgs) -> Result<FieldRef> {
        let declared = &self.function.signature.return_field;
        Ok(Arc::new(Field::new(
            field_args.name(),
            declared.data_type().clone(),
            declared.is_nullable(),
        )))
    }
}

#[derive(Debug)]
struct PythonPartitionEvaluator {
    function: Arc<PythonFunction>,
    flags: Arc<OnceLock<std::result::Result<Flags, String>>>,
}

impl PythonPartitionEvaluator {
    fn name(&self) -> &str {
        &self.function.signature.name
    }

    /// The evaluator's flags, asked once per UDF. DataFusion asks for them
    /// where it cannot take an error; a failure to ask reads as "no" there
    /// and is reported by the next evaluation.
    fn flags(&self) -> std::result::Result<Flags, String> {
        self.flags
            .get_or_init(|| self.describe().map_err(|e| e.to_string()))
            .clone()
    }

    fn flag(&self, pick: impl Fn(Flags) -> bool) -> bool {
        self.flags().map(pick).unwrap_or(false)
    }

    fn describe(&self) -> Result<Flags> {
        let data = execution::stateless(
            self.name(),
            &DataType::Boolean,
            &self.function.callable,
            StatelessKind::Window,
            DESCRIBE,
            &[],
            0,
        )?;
        let flags = arrow::array::BooleanArray::from(data);
        if flags.len() != 4 || flags.null_count() > 0 {
            return Err(DataFusionError::Execution(format!(
                "the runner answered {} flags for Python window UDF '{}' instead of 4",
                flags.len(),
                self.name()
            )));
        }
        Ok(Flags {
            uses_window_frame: flags.value(0),
            include_rank: flags.value(2),
            is_causal: flags.value(3),
        })
    }

    fn checked_flags(&self) -> Result<Flags> {
        self.flags().map_err(DataFusionError::Execution)
    }

    fn call(&self, op: u8, batches: &[RecordBatch], rows: usize) -> Result<ArrayRef> {
        let data = execution::stateless(
            self.name(),
            self.function.signature.return_field.data_type(),
            &self.function.callable,
            StatelessKind::Window,
            op,
            batches,
            rows,
        )?;
        checked_result(&self.function.signature, data, rows)
    }
}

/// The partition's columns as one batch of `rows` rows (`v_0`, `v_1`, …).
fn values_batch(values: &[ArrayRef], rows: usize) -> Result<RecordBatch> {
    let fields: Vec<Field> = values
        .iter()
        .enumerate()
        .map(|(i, v)| Field::new(format!("v_{i}"), v.data_type().clone(), true))
        .collect();
    Ok(RecordBatch::try_new_with_options(
        Arc::new(Schema::new(fields)),
        values.to_vec(),
        &RecordBatchOptions::new().with_row_count(Some(rows)),
    )?)
}

impl PartitionEvaluator for PythonPartitionEvaluator {
    fn is_causal(&self) -> bool {
        self.flag(|f| f.is_causal)
    }

    fn evaluate_all(&mut self, values: &[ArrayRef], num_rows: usize) -> Result<ArrayRef> {
        self.checked_flags()?;
        let batches = [
            values_batch(values, num_rows)?,
            self.function.answer_shape()?,
        ];
        self.call(ALL, &batches, num_rows)
    }

    fn evaluate(&mut self, values: &[ArrayRef], range: &Range<usize>) -> Result<ScalarValue> {
        self.checked_flags()?;
        let length = range.end.saturating_sub(range.start);
        let frame: Vec<ArrayRef> = values
            .iter()
            .map(|v| v.slice(range.start, length))
            .collect();
        let batches = [values_batch(&frame, length)?, self.function.answer_shape()?];
        let result = self.call(FRAME, &batches, 1)?;
        ScalarValue::try_from_array(&result, 0)
    }

    fn evaluate_all_with_rank(
        &self,
        num_rows: usize,
        ranks_in_partition: &[Range<usize>],
    ) -> Result<ArrayRef> {
        self.checked_flags()?;
        let ranks = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("start", DataType::Int64, false),
                Field::new("end", DataType::Int64, false),
            ])),
            vec![
                Arc::new(Int64Array::from_iter_values(
                    ranks_in_partition.iter().map(|r| r.start as i64),
                )),
                Arc::new(Int64Array::from_iter_values(
                    ranks_in_partition.iter().map(|r| r.end as i64),
                )),
            ],
        )?;
        let batches = [
            values_batch(&[], num_rows)?,
            self.function.answer_shape()?,
            ranks,
        ];
        self.call(RANK, &batches, num_rows)
    }

    fn supports_bounded_execution(&self) -> bool {
        false
    }

    fn uses_window_frame(&self) -> bool {
        self.flag(|f| f.uses_window_frame)
    }

    fn include_rank(&self) -> bool {
        self.flag(|f| f.include_rank)
    }
}
