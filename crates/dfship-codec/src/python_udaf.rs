//! [`PythonAggregateUdf`]: an aggregate UDF whose accumulator is Python
//! (datafusion-python's `Accumulator`: `update`, `merge`, `state`, `evaluate`).
//!
//! **Accumulators live in a runner.** The accumulators of one aggregate in
//! one partition (one per group) are a [`RunnerObject`]: they are made in
//! one runner and stay there, as real Python objects, exactly as
//! datafusion-python keeps them in its process. A batch is one call that
//! carries its rows and each row's group; the runner applies `update` (or
//! `merge`) per group. `state()` is asked only when DataFusion needs the
//! states (to emit partial results, to spill, to convert rows to states), and
//! `evaluate()` when it needs results, so any accumulator — one whose fresh
//! state is not the identity of `merge`, one whose state grows — gives the
//! answer datafusion-python gives on the same plan. The runner reports what
//! the accumulators hold after every call, which is what [`size`] returns,
//! so memory limits and spilling see them.
//!
//! A runner lost mid-aggregate takes the state with it: the query fails
//! with an error saying so (never a wrong answer from a rebuilt state).
//!
//! [`size`]: datafusion::logical_expr::GroupsAccumulator::size

use std::sync::Arc;

use arrow::array::{
    make_array, Array, ArrayData, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch,
    RecordBatchOptions, UInt64Array,
};
use arrow::datatypes::{DataType, Field, FieldRef, Fields, Schema};
use datafusion::common::ScalarValue;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, GroupsAccumulator, Signature,
};
use pyo3::prelude::*;

use dfship_runtime::protocol::{AGG_EVALUATE, AGG_MERGE, AGG_STATE, AGG_UPDATE};

use crate::error::ErrorKind;
use crate::execution::{self, RunnerObject};
use crate::function::{python_function_type, PythonFunction};
use crate::python_udf::engine_signature;
use crate::result_check::{checked_result, invalid_array};
use crate::signature::UdfSignature;
use crate::wire::FunctionKind;

/// An aggregate UDF whose accumulator is a Python object; it travels inline.
///
/// ```no_run
/// use arrow::datatypes::DataType;
/// use datafusion::logical_expr::Volatility;
/// use dfship_codec::{PythonAggregateUdf, UdfSignature};
/// use pyo3::prelude::*;
///
/// dfship_codec::ensure_python().unwrap();
/// let udaf = Python::attach(|py| {
///     let module = PyModule::from_code(py, c"
/// import pyarrow as pa, pyarrow.compute as pc
/// class Total:
///     def __init__(self): self.total = 0.0
///     def update(self, values): self.total += pc.sum(values).as_py() or 0.0
///     def merge(self, states): self.total += pc.sum(states[0]).as_py() or 0.0
///     def state(self): return [self.total]
///     def evaluate(self): return self.total
/// ", c"total.py", c"total")?;
///     let signature = UdfSignature::new("total", vec![DataType::Float64], DataType::Float64, Volatility::Immutable)
///         .with_state_types(vec![DataType::Float64]);
///     PyResult::Ok(PythonAggregateUdf::new(signature, module.getattr("Total")?))
/// }).unwrap().unwrap();
/// let ctx = datafusion::prelude::SessionContext::new();
/// ctx.register_udaf(udaf.into_aggregate_udf());
/// ```
#[derive(Debug)]
pub struct PythonAggregateUdf {
    function: Arc<PythonFunction>,
    signature: Signature,
}

impl PythonAggregateUdf {
    /// `factory` makes a fresh accumulator: a class, or a function returning one.
    /// The signature must declare the state types (`with_state_types`).
    pub fn new(udf_signature: UdfSignature, factory: Bound<'_, PyAny>) -> Result<Self> {
        if udf_signature.state_fields.is_empty() {
            return Err(DataFusionError::Plan(format!(
                "the Python aggregate UDF '{}' declares no state types; give one type per value \
                 its accumulator's state() returns",
                udf_signature.name
            )));
        }
        PythonFunction::live(FunctionKind::Aggregate, udf_signature, factory)
            .map(Self::from_function)
    }

    pub(crate) fn from_function(function: PythonFunction) -> Self {
        let signature = engine_signature(&function.signature);
        Self {
            function: Arc::new(function),
            signature,
        }
    }

    pub fn into_aggregate_udf(self) -> AggregateUDF {
        AggregateUDF::new_from_impl(self)
    }
}

python_function_type!(PythonAggregateUdf);

impl AggregateUDFImpl for PythonAggregateUdf {
    fn name(&self) -> &str {
        &self.function.signature.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(self.function.signature.return_field.data_type().clone())
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(PythonAccumulator(PythonGroupsAccumulator::new(
            &self.function,
            args.expr_fields,
        ))))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(self
            .function
            .signature
            .state_fields
            .iter()
            .map(|field| {
                Arc::new(Field::new(
                    format_state_name(args.name, field.name()),
                    field.data_type().clone(),
                    true,
                ))
            })
            .collect())
    }

    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(PythonGroupsAccumulator::new(
            &self.function,
            args.expr_fields,
        )))
    }
}

/// The accumulators of one aggregate in one partition, in a runner.
#[derive(Debug)]
struct PythonGroupsAccumulator {
    function: Arc<PythonFunction>,
    object: RunnerObject,
    /// The groups the runner holds (DataFusion's numbering).
    groups: usize,
    /// The arguments' fields (extension types reach Python as such).
    input_fields: Vec<FieldRef>,
}

impl PythonGroupsAccumulator {
    fn new(function: &Arc<PythonFunction>, input_fields: &[FieldRef]) -> Self {
        Self {
            object: RunnerObject::new(Arc::clone(function)),
            function: Arc::clone(function),
            groups: 0,
            input_fields: input_fields.to_vec(),
        }
    }

    fn name(&self) -> &str {
        &self.function.signature.name
    }

    /// The declared state as one struct type (what `state()` answers).
    fn state_type(&self) -> DataType {
        DataType::Struct(Fields::from(self.function.signature.state_fields.clone()))
    }

    /// `values` with each (kept) row's group in front, as a batch.
    fn rows(
        &self,
        values: &[ArrayRef],
        fields: &[FieldRef],
        group_indices: &[usize],
        filter: Option<&BooleanArray>,
    ) -> Result<RecordBatch> {
        let kept: Option<Vec<u64>> = filter.map(|f| {
            (0..group_indices.len())
                .filter(|&row| f.is_valid(row) && f.value(row))
                .map(|row| row as u64)
                .collect()
        });
        let groups: Vec<i64> = match &kept {
            Some(rows) => rows
                .iter()
                .map(|&r| group_indices[r as usize] as i64)
                .collect(),
            None => group_indices.iter().map(|&g| g as i64).collect(),
        };
        let take = kept.map(UInt64Array::from);
        let mut schema = vec![Field::new("group", DataType::Int64, false)];
        let mut columns: Vec<ArrayRef> = vec![Arc::new(Int64Array::from(groups))];
        for (i, value) in values.iter().enumerate() {
            let field = Field::new(format!("arg_{i}"), value.data_type().clone(), true);
            schema.push(match fields.get(i) {
                Some(declared) => field.with_metadata(declared.metadata().clone()),
                None => field,
            });
            columns.push(match &take {
                Some(take) => arrow::compute::take(value, take, None)?,
                None => Arc::clone(value),
            });
        }
        Ok(RecordBatch::try_new(
            Arc::new(Schema::new(schema)),
            columns,
        )?)
    }

    fn apply(
        &mut self,
        op: u8,
        values: &[ArrayRef],
        group_indices: &[usize],
        filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.groups = self.groups.max(total_num_groups);
        if group_indices.is_empty() {
            return Ok(());
        }
        let fields = if op == AGG_UPDATE {
            self.input_fields.clone()
        } else {
            self.function.signature.state_fields.clone()
        };
        let rows = self.rows(values, &fields, group_indices, filter)?;
        if rows.num_rows() == 0 {
            return Ok(());
        }
        self.object.apply(op, self.groups as u64, rows)
    }

    /// How many groups `emit_to` covers.
    fn emitted(&self, emit_to: EmitTo) -> usize {
        match emit_to {
            EmitTo::All => self.groups,
            EmitTo::First(n) => n.min(self.groups),
        }
    }

    /// `count` groups left the runner.
    fn forget(&mut self, count: usize) {
        let before = self.groups;
        self.groups -= count;
        self.object.shrink(self.groups, before);
    }

    /// The states of the first `count` groups, one column per state field
    /// (`take`: and the groups leave the runner).
    fn states(&mut self, count: usize, take: bool) -> Result<Vec<ArrayRef>> {
        let state_type = self.state_type();
        let data = if count == 0 {
            arrow::array::new_empty_array(&state_type).to_data()
        } else {
            let shape = shape_of("state", &state_type)?;
            let (_, data) = self.object.emit(AGG_STATE, count as u64, take, shape)?;
            data
        };
        self.checked_states(data, count)
    }

    fn checked_states(&self, data: ArrayData, groups: usize) -> Result<Vec<ArrayRef>> {
        let expected = self.state_type();
        if data.len() != groups || data.data_type() != &expected {
            return Err(bad_result(
                self.name(),
                &format!(
                    "answered {} states of type {} for {groups} groups of state type {expected}",
                    data.len(),
                    data.data_type()
                ),
            ));
        }
        data.validate_full()
            .map_err(|e| invalid_array(self.name(), &e.to_string()))?;
        Ok(make_array(data).as_struct().columns().to_vec())
    }

    /// The results of the first `count` groups (`take`: and the groups
    /// leave the runner).
    fn results(&mut self, count: usize, take: bool) -> Result<ArrayRef> {
        let returns = &self.function.signature.return_field;
        if count == 0 {
            return Ok(arrow::array::new_empty_array(returns.data_type()));
        }
        let shape = self.function.answer_shape()?;
        let (field, data) = self.object.emit(AGG_EVALUATE, count as u64, take, shape)?;
        checked_result(&self.function.signature, Some(&field), data, count)
    }

    fn runner_size(&self) -> usize {
        std::mem::size_of::<Self>() + self.object.size()
    }
}

/// An empty batch whose one field, `name`, has type `data_type`: the shape
/// of an answer, sent with the call.
fn shape_of(name: &str, data_type: &DataType) -> Result<RecordBatch> {
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new(name, data_type.clone(), true)])),
        vec![arrow::array::new_empty_array(data_type)],
    )?)
}

fn bad_result(name: &str, detail: &str) -> DataFusionError {
    DataFusionError::Execution(format!(
        "{} Python aggregate UDF '{name}' {detail}",
        ErrorKind::UdfBadResult.tag()
    ))
}

impl GroupsAccumulator for PythonGroupsAccumulator {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.apply(
            AGG_UPDATE,
            values,
            group_indices,
            opt_filter,
            total_num_groups,
        )
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let count = self.emitted(emit_to);
        let results = self.results(count, true);
        self.forget(count);
        results
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        let count = self.emitted(emit_to);
        let states = self.states(count, true);
        self.forget(count);
        states
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.apply(AGG_MERGE, values, group_indices, None, total_num_groups)
    }

    /// Each row as the state of an accumulator that saw only that row (a
    /// row the filter drops: a fresh accumulator's state). Stateless: any
    /// runner.
    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let rows = values.first().map_or(0, |v| v.len());
        let keep: BooleanArray = (0..rows)
            .map(|row| Some(opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row))))
            .collect();
        let mut schema = vec![Field::new("keep", DataType::Boolean, false)];
        let mut columns: Vec<ArrayRef> = vec![Arc::new(keep)];
        for (i, value) in values.iter().enumerate() {
            let field = Field::new(format!("arg_{i}"), value.data_type().clone(), true);
            schema.push(match self.input_fields.get(i) {
                Some(declared) => field.with_metadata(declared.metadata().clone()),
                None => field,
            });
            columns.push(Arc::clone(value));
        }
        let batch = RecordBatch::try_new_with_options(
            Arc::new(Schema::new(schema)),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(rows)),
        )?;
        let shape = shape_of("state", &self.state_type())?;
        let (_, data) = execution::convert_to_state(&self.function, &batch, &shape)?;
        self.checked_states(data, rows)
    }

    fn size(&self) -> usize {
        self.runner_size()
    }
}

/// One accumulator (no GROUP BY, or an aggregate used as a window
/// function): the accumulators of a single group, which `state()` and
/// `evaluate()` leave in place.
#[derive(Debug)]
struct PythonAccumulator(PythonGroupsAccumulator);

impl Accumulator for PythonAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let rows = values.first().map_or(0, |v| v.len());
        self.0.apply(AGG_UPDATE, values, &vec![0; rows], None, 1)
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        self.0.groups = 1;
        let result = self.0.results(1, false)?;
        ScalarValue::try_from_array(&result, 0)
    }

    fn size(&self) -> usize {
        self.0.runner_size()
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        self.0.groups = 1;
        self.0
            .states(1, false)?
            .iter()
            .map(|column| ScalarValue::try_from_array(column, 0))
            .collect()
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let rows = states.first().map_or(0, |v| v.len());
        self.0.apply(AGG_MERGE, states, &vec![0; rows], None, 1)
    }
}
