//! [`PythonAggregateUdf`]: an aggregate UDF whose accumulator is Python
//! (datafusion-python's `Accumulator`: `update`, `merge`, `state`, `evaluate`).
//!
//! **Stateless calls.** Each group's state lives here, in Rust, as the values
//! of the declared state fields — the same Arrow values that cross the
//! network between partial and final aggregation. A call sends Python the
//! states of the groups a batch touches plus the batch; Python rebuilds each
//! accumulator (`factory()`, then `merge(state)`), applies `update` (or
//! `merge`), and answers `state()`. So any runner serves any call, a runner
//! that dies loses no state, and one call covers every group of a batch
//! (DataFusion's per-group adapter would make one call per group). The
//! contract this relies on is the one partial/final aggregation already
//! needs: `merge(state())` into a fresh accumulator continues it.
//!
//! State that grows with the input (a list of every value) is re-sent on
//! every batch of its group: such aggregates cost more per batch than ones
//! with a fixed-size state.

use std::sync::Arc;

use arrow::array::{
    make_array, Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch,
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

use crate::error::ErrorKind;
use crate::execution::{self, StatelessKind};
use crate::function::{python_function_type, PythonFunction};
use crate::python_udf::engine_signature;
use crate::result_check::{checked_result, invalid_array};
use crate::signature::UdfSignature;
use crate::wire::FunctionKind;

/// Ops of an `AGGREGATE` call (`python/dfship/_runner.py`, `_aggregate`).
const UPDATE: u8 = 0;
const MERGE: u8 = 1;
const EVALUATE: u8 = 2;

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

    fn groups(&self) -> PythonGroupsAccumulator {
        PythonGroupsAccumulator {
            function: Arc::clone(&self.function),
            states: Vec::new(),
        }
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

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(PythonAccumulator(self.groups())))
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
        _args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(self.groups()))
    }
}

/// One group's state: the values of the state fields, or `None` before the
/// group has seen anything (a fresh accumulator).
type GroupState = Option<Vec<ScalarValue>>;

/// The accumulators of many groups, as their states (see the module docs).
#[derive(Debug)]
struct PythonGroupsAccumulator {
    function: Arc<PythonFunction>,
    states: Vec<GroupState>,
}

impl PythonGroupsAccumulator {
    fn name(&self) -> &str {
        &self.function.signature.name
    }

    fn state_types(&self) -> impl Iterator<Item = &DataType> {
        self.function
            .signature
            .state_fields
            .iter()
            .map(|f| f.data_type())
    }

    /// How states travel: `known`, then one nullable column per state field.
    fn states_schema(&self) -> Schema {
        let mut fields = vec![Field::new("known", DataType::Boolean, false)];
        fields.extend(
            self.state_types()
                .enumerate()
                .map(|(i, t)| Field::new(format!("state_{i}"), t.clone(), true)),
        );
        Schema::new(fields)
    }

    fn states_batch<'a>(
        &self,
        states: impl Iterator<Item = &'a GroupState>,
    ) -> Result<RecordBatch> {
        let states: Vec<&GroupState> = states.collect();
        let known: ArrayRef = Arc::new(BooleanArray::from(
            states.iter().map(|s| s.is_some()).collect::<Vec<_>>(),
        ));
        let mut columns = vec![known];
        for (i, data_type) in self.state_types().enumerate() {
            let null = ScalarValue::try_from(data_type)?;
            let values = states.iter().map(|state| match state {
                Some(values) => values[i].clone(),
                None => null.clone(),
            });
            columns.push(if states.is_empty() {
                arrow::array::new_empty_array(data_type)
            } else {
                ScalarValue::iter_to_array(values)?
            });
        }
        Ok(RecordBatch::try_new_with_options(
            Arc::new(self.states_schema()),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(states.len())),
        )?)
    }

    /// Sends the groups `touched` (indices into `self.states`) and `rows`
    /// (first column: position in `touched`) through `op`, and stores the
    /// new states.
    fn apply(&mut self, op: u8, touched: &[usize], rows: RecordBatch) -> Result<()> {
        let batch = self.states_batch(touched.iter().map(|&g| &self.states[g]))?;
        let new_states = self.call_for_states(op, batch, rows, touched.len())?;
        for (&group, state) in touched.iter().zip(new_states) {
            self.states[group] = Some(state);
        }
        Ok(())
    }

    /// One call answering new states (UPDATE, MERGE), checked against the
    /// declared state types.
    fn call_for_states(
        &self,
        op: u8,
        states: RecordBatch,
        rows: RecordBatch,
        groups: usize,
    ) -> Result<Vec<Vec<ScalarValue>>> {
        let expected = DataType::Struct(Fields::from(self.states_schema().fields()[1..].to_vec()));
        let data = execution::stateless(
            self.name(),
            &expected,
            &self.function.callable,
            StatelessKind::Aggregate,
            op,
            &[states, rows],
            groups,
        )?;
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
        let array = make_array(data);
        let columns = array.as_struct().columns();
        (0..groups)
            .map(|row| {
                columns
                    .iter()
                    .map(|column| ScalarValue::try_from_array(column, row))
                    .collect::<Result<Vec<_>>>()
            })
            .collect()
    }

    /// The groups of `group_indices` in order of first appearance, and each
    /// row's position among them (rows the filter drops are left out).
    fn touched(
        &mut self,
        group_indices: &[usize],
        filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> (Vec<usize>, Vec<u64>, Vec<i64>) {
        if self.states.len() < total_num_groups {
            self.states.resize(total_num_groups, None);
        }
        let mut position_of = std::collections::HashMap::new();
        let mut touched = Vec::new();
        let mut kept_rows = Vec::new();
        let mut positions = Vec::new();
        for (row, &group) in group_indices.iter().enumerate() {
            if filter.is_some_and(|f| !f.is_valid(row) || !f.value(row)) {
                continue;
            }
            let position = *position_of.entry(group).or_insert_with(|| {
                touched.push(group);
                touched.len() - 1
            });
            kept_rows.push(row as u64);
            positions.push(position as i64);
        }
        (touched, kept_rows, positions)
    }

    fn update_or_merge(
        &mut self,
        op: u8,
        values: &[ArrayRef],
        group_indices: &[usize],
        filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        let (touched, kept_rows, positions) = self.touched(group_indices, filter, total_num_groups);
        if touched.is_empty() {
            return Ok(());
        }
        let all_kept = kept_rows.len() == group_indices.len();
        let take = UInt64Array::from(kept_rows);
        let mut fields = vec![Field::new("group", DataType::Int64, false)];
        let mut columns: Vec<ArrayRef> = vec![Arc::new(Int64Array::from(positions))];
        for (i, value) in values.iter().enumerate() {
            fields.push(Field::new(
                format!("arg_{i}"),
                value.data_type().clone(),
                true,
            ));
            columns.push(if all_kept {
                Arc::clone(value)
            } else {
                arrow::compute::take(value, &take, None)?
            });
        }
        let rows = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
        self.apply(op, &touched, rows)
    }

    /// Fills in the states of groups that have none (a fresh accumulator's).
    fn fill_unknown(&mut self, groups: &mut [GroupState]) -> Result<()> {
        let unknown: Vec<usize> = (0..groups.len()).filter(|&g| groups[g].is_none()).collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let states = self.states_batch(unknown.iter().map(|_| &None))?;
        let rows = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new(
                "group",
                DataType::Int64,
                false,
            )])),
            vec![Arc::new(Int64Array::from(Vec::<i64>::new()))],
        )?;
        let fresh = self.call_for_states(UPDATE, states, rows, unknown.len())?;
        for (g, state) in unknown.into_iter().zip(fresh) {
            groups[g] = Some(state);
        }
        Ok(())
    }

    fn evaluate_states(&self, groups: &[GroupState]) -> Result<ArrayRef> {
        let returns = &self.function.signature.return_field;
        if groups.is_empty() {
            return Ok(arrow::array::new_empty_array(returns.data_type()));
        }
        let states = self.states_batch(groups.iter())?;
        let shape = self.function.answer_shape()?;
        let data = execution::stateless(
            self.name(),
            returns.data_type(),
            &self.function.callable,
            StatelessKind::Aggregate,
            EVALUATE,
            &[states, shape],
            groups.len(),
        )?;
        checked_result(&self.function.signature, data, groups.len())
    }

    /// The state columns of `groups` (fresh accumulators' states for groups
    /// that have none yet).
    fn state_arrays(&mut self, mut groups: Vec<GroupState>) -> Result<Vec<ArrayRef>> {
        self.fill_unknown(&mut groups)?;
        let batch = self.states_batch(groups.iter())?;
        Ok(batch.columns()[1..].to_vec())
    }

    fn states_size(&self) -> usize {
        self.states
            .iter()
            .map(|state| {
                std::mem::size_of::<GroupState>()
                    + state.as_ref().map_or(0, |values| {
                        values.iter().map(ScalarValue::size).sum::<usize>()
                    })
            })
            .sum()
    }
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
        self.update_or_merge(UPDATE, values, group_indices, opt_filter, total_num_groups)
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let groups = emit_to.take_needed(&mut self.states);
        self.evaluate_states(&groups)
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        let groups = emit_to.take_needed(&mut self.states);
        self.state_arrays(groups)
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.update_or_merge(MERGE, values, group_indices, None, total_num_groups)
    }

    /// Each row as the state of an accumulator that saw only that row.
    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let rows = values.first().map_or(0, |v| v.len());
        let mut each_row = PythonGroupsAccumulator {
            function: Arc::clone(&self.function),
            states: Vec::new(),
        };
        let groups: Vec<usize> = (0..rows).collect();
        each_row.update_or_merge(UPDATE, values, &groups, opt_filter, rows)?;
        let states = std::mem::take(&mut each_row.states);
        each_row.state_arrays(states)
    }

    fn size(&self) -> usize {
        std::mem::size_of::<Self>() + self.states_size()
    }
}

/// One accumulator (no GROUP BY, or an aggregate used as a window
/// function): a groups accumulator with a single group.
#[derive(Debug)]
struct PythonAccumulator(PythonGroupsAccumulator);

impl Accumulator for PythonAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let rows = values.first().map_or(0, |v| v.len());
        if rows == 0 {
            return Ok(());
        }
        self.0
            .update_or_merge(UPDATE, values, &vec![0; rows], None, 1)
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        if self.0.states.is_empty() {
            self.0.states.push(None);
        }
        let result = self.0.evaluate_states(&self.0.states[..1])?;
        ScalarValue::try_from_array(&result, 0)
    }

    fn size(&self) -> usize {
        std::mem::size_of::<Self>() + self.0.states_size()
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        if self.0.states.is_empty() {
            self.0.states.push(None);
        }
        let mut groups = vec![self.0.states[0].clone()];
        self.0.fill_unknown(&mut groups)?;
        self.0.states[0] = groups[0].clone();
        Ok(groups.remove(0).unwrap_or_default())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let rows = states.first().map_or(0, |v| v.len());
        if rows == 0 {
            return Ok(());
        }
        self.0
            .update_or_merge(MERGE, states, &vec![0; rows], None, 1)
    }
}
