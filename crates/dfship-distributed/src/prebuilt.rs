//! Running plans that were made elsewhere — datafusion-python 55's
//! serialized logical or physical plans — distributed on the cluster.
//!
//! Logical plan bytes decode into a `LogicalPlan`, which the coordinator's
//! planner distributes like any SQL query. Physical plan bytes decode into an
//! `ExecutionPlan`, but datafusion-distributed 4.0 only distributes plans its
//! `QueryPlanner` makes from a logical plan (its `create_distributed_plan` is
//! private). So the decoded plan is wrapped in a [`PrebuiltPlan`] logical
//! node, and [`PrebuiltPlanner`] — installed under the distributed planner by
//! [`crate::ClusterContextBuilder`] — hands the plan back during physical
//! planning; the distributed planner then splits it into stages.
//!
//! Both formats carry Python UDFs as `DFPYUDF` payloads (datafusion-python
//! writes them into `fun_definition`), which [`PythonUdfCodec`] reads. The
//! bytes come from the caller's own process, so they are read with
//! [`PythonUdfCodec::trusting_datafusion_python`]: with a cluster key, their
//! UDFs (which cannot carry a signature) are loaded here as datafusion-python
//! itself would load them, and reach the workers as signed frames. Tables
//! travel as file scans with their paths, so every worker must see those
//! paths; datafusion-python cannot serialize in-memory tables.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::{DFSchema, DFSchemaRef};
use datafusion::dataframe::DataFrame;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::context::QueryPlanner;
use datafusion::logical_expr::{
    Expr, Extension, LogicalPlan, UserDefinedLogicalNode, UserDefinedLogicalNodeCore,
};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_planner::{DefaultPhysicalPlanner, ExtensionPlanner, PhysicalPlanner};
use datafusion::prelude::SessionContext;
use datafusion_proto::physical_plan::PhysicalExtensionCodec;
use dfship_codec::{PythonUdfCodec, PythonUdfLogicalCodec};

/// A physical plan standing in a logical plan until physical planning.
#[derive(Debug, Clone)]
pub struct PrebuiltPlan {
    plan: Arc<dyn ExecutionPlan>,
    schema: DFSchemaRef,
}

impl PrebuiltPlan {
    pub fn new(plan: Arc<dyn ExecutionPlan>) -> Result<Self> {
        let schema = Arc::new(DFSchema::try_from(plan.schema().as_ref().clone())?);
        Ok(Self { plan, schema })
    }
}

impl PartialEq for PrebuiltPlan {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.plan, &other.plan)
    }
}
impl Eq for PrebuiltPlan {}
impl Hash for PrebuiltPlan {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (Arc::as_ptr(&self.plan) as *const () as usize).hash(state);
    }
}
impl PartialOrd for PrebuiltPlan {
    fn partial_cmp(&self, _other: &Self) -> Option<Ordering> {
        None
    }
}

impl UserDefinedLogicalNodeCore for PrebuiltPlan {
    fn name(&self) -> &str {
        "PrebuiltPhysicalPlan"
    }
    fn inputs(&self) -> Vec<&LogicalPlan> {
        Vec::new()
    }
    fn schema(&self) -> &DFSchemaRef {
        &self.schema
    }
    fn expressions(&self) -> Vec<Expr> {
        Vec::new()
    }
    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "PrebuiltPhysicalPlan: {}", self.plan.name())
    }
    fn with_exprs_and_inputs(&self, _exprs: Vec<Expr>, _inputs: Vec<LogicalPlan>) -> Result<Self> {
        Ok(self.clone())
    }
}

/// Plans a [`PrebuiltPlan`] as the plan it holds.
#[derive(Debug, Default)]
pub struct PrebuiltPlanner;

#[async_trait]
impl ExtensionPlanner for PrebuiltPlanner {
    async fn plan_extension(
        &self,
        _planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        _logical_inputs: &[&LogicalPlan],
        _physical_inputs: &[Arc<dyn ExecutionPlan>],
        _session: &dyn Session,
        _planning_ctx: &datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        Ok(node
            .as_any()
            .downcast_ref::<PrebuiltPlan>()
            .map(|prebuilt| Arc::clone(&prebuilt.plan)))
    }
}

/// DataFusion's default planner plus [`PrebuiltPlanner`].
#[derive(Debug, Default)]
pub struct PrebuiltAwareQueryPlanner;

#[async_trait]
impl QueryPlanner for PrebuiltAwareQueryPlanner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        session: &dyn Session,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        DefaultPhysicalPlanner::with_extension_planners(vec![Arc::new(PrebuiltPlanner)])
            .create_physical_plan(logical_plan, session)
            .await
    }
}

/// A DataFrame over datafusion-python 55 logical plan bytes
/// (`DataFrame.logical_plan().to_bytes()`), planned and run distributed.
///
/// The bytes are trusted as the caller's own code: their Python UDFs are
/// unpickled in this process even when `codec` has a cluster key (see
/// [`PythonUdfCodec::trusting_datafusion_python`]). Do not pass bytes from
/// an untrusted source.
pub async fn dataframe_from_logical_bytes(
    ctx: &SessionContext,
    codec: Arc<PythonUdfCodec>,
    bytes: &[u8],
) -> Result<DataFrame> {
    let logical = PythonUdfLogicalCodec::new(Arc::new(codec.trusting_datafusion_python()));
    let plan = datafusion_proto::bytes::logical_plan_from_bytes_with_extension_codec(
        bytes,
        &ctx.task_ctx(),
        &logical,
    )
    .map_err(|e| match logical.take_udf_error() {
        // datafusion-proto flattened it to its Debug form: the error as raised.
        Some(refused) => refused.into(),
        None => explain_decode("logical", e),
    })?;
    ctx.execute_logical_plan(plan).await
}

/// A DataFrame over datafusion-python 55 physical plan bytes
/// (`DataFrame.execution_plan().to_bytes()`), split into stages and run
/// distributed. Trusted like [`dataframe_from_logical_bytes`]'s.
pub async fn dataframe_from_physical_bytes(
    ctx: &SessionContext,
    codec: Arc<PythonUdfCodec>,
    bytes: &[u8],
) -> Result<DataFrame> {
    // datafusion-python writes expressions shared between nodes (a join's
    // dynamic filter and the scan it prunes) once, by id: read them back the same way.
    let codec = codec.trusting_datafusion_python();
    let plan = datafusion_proto::bytes::physical_plan_from_bytes_with_proto_converter(
        bytes,
        &ctx.task_ctx(),
        &codec as &dyn PhysicalExtensionCodec,
        &datafusion_proto::physical_plan::DeduplicatingProtoConverter::default(),
    )
    .map_err(|e| explain_decode("physical", e))?;
    let node = LogicalPlan::Extension(Extension {
        node: Arc::new(PrebuiltPlan::new(plan)?),
    });
    ctx.execute_logical_plan(node).await
}

fn explain_decode(kind: &str, error: DataFusionError) -> DataFusionError {
    DataFusionError::Context(
        format!(
            "cannot decode these bytes as a datafusion-python 55 {kind} plan (expected the \
             output of `{}().to_bytes()` from datafusion==55.x)",
            if kind == "logical" {
                "DataFrame.logical_plan"
            } else {
                "DataFrame.execution_plan"
            }
        ),
        Box::new(error),
    )
}
