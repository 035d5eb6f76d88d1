//! [`PythonWindowUdf`]: a window UDF whose evaluator is Python
//! (datafusion-python's `WindowEvaluator`: `evaluate_all`, `evaluate`,
//! `evaluate_all_with_rank` and the flags that choose between them).
//!
//! Every call is one partition: a fresh evaluator in a runner gets the
//! partition's values (the arguments, then the ORDER BY columns, as
//! datafusion-python passes them) and answers the whole partition, so any
//! runner serves it. The evaluator's flags are asked once per UDF.
//!
//! **Frames in one call.** For an evaluator that uses its window frame,
//! DataFusion asks `evaluate(values, range)` once per row. When the UDF knows
//! its window's frame and ORDER BY (see [`attach_window_frames`], applied on
//! workers as they decode a stage and on coordinators by the
//! [`AttachWindowFrames`] rule), the first row's call computes every row's
//! frame with DataFusion's own frame rules (`WindowFrameContext`) and fetches
//! all results in one call; each row's call then checks that DataFusion's
//! range is the one computed and answers from them. A range that differs
//! (or a UDF without its frame) costs one call for that row, never a wrong
//! value.
//!
//! **Bounded execution.** `supports_bounded_execution` is reported to
//! DataFusion as false, so a query with a Python window UDF runs in
//! `WindowAggExec`, which buffers each partition whole (memory: the largest
//! partition); an evaluator that only implements `evaluate` row by row is
//! run row by row over the whole partition inside one call.
//!
//! [`attach_window_frames`]: crate::attach_window_frames
//! [`AttachWindowFrames`]: crate::AttachWindowFrames

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use arrow::array::{Array, ArrayRef, Int64Array, RecordBatch, RecordBatchOptions};
use arrow::compute::SortOptions;
use arrow::datatypes::{DataType, Field, FieldRef, Schema};
use datafusion::common::ScalarValue;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::function::{PartitionEvaluatorArgs, WindowUDFFieldArgs};
use datafusion::logical_expr::window_state::WindowFrameContext;
use datafusion::logical_expr::WindowFrame;
use datafusion::logical_expr::{PartitionEvaluator, Signature, WindowUDF, WindowUDFImpl};
use dfship_runtime::protocol::{WIN_ALL, WIN_DESCRIBE, WIN_FRAMES, WIN_RANK};
use pyo3::prelude::*;

use crate::execution;
use crate::function::{python_function_type, PythonFunction};
use crate::python_udf::engine_signature;
use crate::result_check::checked_result;
use crate::signature::UdfSignature;
use crate::wire::FunctionKind;

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
    /// The frame and ORDER BY of the window this instance is used in, when known.
    frame: Option<FrameHint>,
}

/// A window's frame and the sort options of its ORDER BY.
#[derive(Debug, Clone)]
pub(crate) struct FrameHint {
    frame: Arc<WindowFrame>,
    sort_options: Vec<SortOptions>,
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
            frame: None,
        }
    }

    /// This UDF, for a window with `frame` ordered by keys sorted with
    /// `sort_options`: its evaluators fetch every frame of a partition in
    /// one call (module docs).
    pub(crate) fn for_frame(
        &self,
        frame: Arc<WindowFrame>,
        sort_options: Vec<SortOptions>,
    ) -> Self {
        Self {
            function: Arc::clone(&self.function),
            signature: self.signature.clone(),
            flags: Arc::clone(&self.flags),
            frame: Some(FrameHint {
                frame,
                sort_options,
            }),
        }
    }

    /// Whether this instance knows its window's frame.
    pub(crate) fn knows_frame(&self) -> bool {
        self.frame.is_some()
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
        args: PartitionEvaluatorArgs,
    ) -> Result<Box<dyn PartitionEvaluator>> {
        Ok(Box::new(PythonPartitionEvaluator {
            function: Arc::clone(&self.function),
            flags: Arc::clone(&self.flags),
            frame: self.frame.clone(),
            input_fields: args.input_fields().to_vec(),
            frames: None,
            next_row: 0,
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
    frame: Option<FrameHint>,
    /// The arguments' fields (extension types reach Python as such).
    input_fields: Vec<FieldRef>,
    /// Every row's frame and value, fetched at the partition's first row.
    frames: Option<(Vec<Range<usize>>, ArrayRef)>,
    /// The row DataFusion asks about next.
    next_row: usize,
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
        let (_, data) = execution::call_window(&self.function, WIN_DESCRIBE, &[])?;
        if data.data_type() != &DataType::Boolean {
            return Err(DataFusionError::Execution(format!(
                "the runner answered flags of type {} for Python window UDF '{}'",
                data.data_type(),
                self.name()
            )));
        }
        data.validate_full()?;
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
        let (field, data) = execution::call_window(&self.function, op, batches)?;
        checked_result(&self.function.signature, Some(&field), data, rows)
    }

    /// The partition's values as one batch (arguments with their fields).
    fn values_batch(&self, values: &[ArrayRef], rows: usize) -> Result<RecordBatch> {
        values_batch(values, &self.input_fields, rows)
    }

    /// Every row's frame (DataFusion's own rules: `values` ends with the
    /// ORDER BY columns) and every row's value, in one call.
    fn fetch_frames(
        &self,
        hint: &FrameHint,
        values: &[ArrayRef],
    ) -> Result<(Vec<Range<usize>>, ArrayRef)> {
        let rows = values.first().map_or(0, |v| v.len());
        let order_bys = &values[values.len().saturating_sub(hint.sort_options.len())..];
        let mut context =
            WindowFrameContext::new(Arc::clone(&hint.frame), hint.sort_options.clone());
        let mut ranges = Vec::with_capacity(rows);
        let mut last = Range { start: 0, end: 0 };
        for row in 0..rows {
            let range = context.calculate_range(order_bys, &last, rows, row)?;
            last = range.clone();
            ranges.push(range);
        }
        let frames = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("start", DataType::Int64, false),
                Field::new("end", DataType::Int64, false),
            ])),
            vec![
                Arc::new(Int64Array::from_iter_values(
                    ranges.iter().map(|r| r.start as i64),
                )),
                Arc::new(Int64Array::from_iter_values(
                    ranges.iter().map(|r| r.end as i64),
                )),
            ],
        )?;
        let batches = [
            self.values_batch(values, rows)?,
            self.function.answer_shape()?,
            frames,
        ];
        let results = self.call(WIN_FRAMES, &batches, rows)?;
        Ok((ranges, results))
    }

    /// One frame on its own: its rows, rebased to start at 0.
    fn one_frame(&self, values: &[ArrayRef], range: &Range<usize>) -> Result<ScalarValue> {
        let length = range.end.saturating_sub(range.start);
        let frame: Vec<ArrayRef> = values
            .iter()
            .map(|v| v.slice(range.start, length))
            .collect();
        let one = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("start", DataType::Int64, false),
                Field::new("end", DataType::Int64, false),
            ])),
            vec![
                Arc::new(Int64Array::from(vec![0])),
                Arc::new(Int64Array::from(vec![length as i64])),
            ],
        )?;
        let batches = [
            self.values_batch(&frame, length)?,
            self.function.answer_shape()?,
            one,
        ];
        let result = self.call(WIN_FRAMES, &batches, 1)?;
        ScalarValue::try_from_array(&result, 0)
    }
}

/// The partition's columns as one batch of `rows` rows (`v_0`, `v_1`, …),
/// the first ones with the metadata of `fields`.
fn values_batch(values: &[ArrayRef], fields: &[FieldRef], rows: usize) -> Result<RecordBatch> {
    let fields: Vec<Field> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let field = Field::new(format!("v_{i}"), v.data_type().clone(), true);
            match fields.get(i) {
                Some(declared) => field.with_metadata(declared.metadata().clone()),
                None => field,
            }
        })
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
            self.values_batch(values, num_rows)?,
            self.function.answer_shape()?,
        ];
        self.call(WIN_ALL, &batches, num_rows)
    }

    fn evaluate(&mut self, values: &[ArrayRef], range: &Range<usize>) -> Result<ScalarValue> {
        self.checked_flags()?;
        let row = self.next_row;
        self.next_row += 1;
        if let Some(hint) = self.frame.clone() {
            if row == 0 || self.frames.is_none() {
                self.frames = Some(self.fetch_frames(&hint, values)?);
            }
            if let Some((ranges, results)) = &self.frames {
                if ranges.get(row) == Some(range) {
                    return ScalarValue::try_from_array(results, row);
                }
            }
        }
        self.one_frame(values, range)
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
            values_batch(&[], &[], num_rows)?,
            self.function.answer_shape()?,
            ranks,
        ];
        self.call(WIN_RANK, &batches, num_rows)
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
