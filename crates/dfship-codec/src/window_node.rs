//! Getting Python window UDFs through `ComposedPhysicalExtensionCodec`.
//!
//! datafusion-proto 55.2's `ComposedPhysicalExtensionCodec` — the codec
//! datafusion-distributed 4.0 decodes every stage plan with — forwards the
//! scalar and aggregate UDF hooks to the codecs it composes, but not
//! `try_decode_udwf`/`try_encode_udwf`: it inherits the defaults, so a window
//! function whose `fun_definition` is set fails on the worker with
//! "PhysicalExtensionCodec is not provided for window function …", whoever
//! wrote the payload. Plan *nodes* it does forward.
//!
//! So the coordinator wraps each window node that calls a Python window UDF
//! in a [`PythonWindowNode`] just before encoding ([`wrap_python_windows`]).
//! The wrapper is not a node datafusion-proto knows, so it reaches our codec's
//! `try_encode`, which writes the window node itself — its input replaced by
//! an `EmptyExec` of the same schema — as a plan of its own encoded with
//! [`PythonUdfCodec`] alone (UDF payloads raw, no envelope). The worker's
//! composed codec hands that blob back to our `try_decode`, which decodes it
//! with [`PythonUdfCodec`] (so `try_decode_udwf` is ours) and puts the real,
//! already decoded input back. The worker never sees the wrapper.
//!
//! [`PythonUdfCodec`]: crate::PythonUdfCodec

use std::fmt;
use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::windows::{
    BoundedWindowAggExec, StandardWindowExpr, WindowAggExec, WindowUDFExpr,
};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, PhysicalExpr, PlanProperties, WindowExpr,
};

use datafusion::common::config::ConfigOptions;
use datafusion::logical_expr::WindowUDF;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::windows::create_udwf_window_expr;

use crate::python_udwf::PythonWindowUdf;

/// The first bytes of the blob a [`PythonWindowNode`] is written as.
pub(crate) const WINDOW_NODE_MAGIC: &[u8; 8] = b"DFSHIPWN";

/// A window node that calls a Python window UDF, on its way to a worker.
#[derive(Debug)]
pub struct PythonWindowNode {
    window: Arc<dyn ExecutionPlan>,
}

impl PythonWindowNode {
    /// The window node (a `WindowAggExec` or `BoundedWindowAggExec`).
    pub fn window(&self) -> &Arc<dyn ExecutionPlan> {
        &self.window
    }
}

/// `plan` with every window node that calls a Python window UDF wrapped in
/// a [`PythonWindowNode`], so it survives the composed codec (module docs).
pub fn wrap_python_windows(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        if calls_python_window_udf(&node) {
            Ok(Transformed::yes(
                Arc::new(PythonWindowNode { window: node }) as Arc<dyn ExecutionPlan>,
            ))
        } else {
            Ok(Transformed::no(node))
        }
    })
    .map(|transformed| transformed.data)
}

fn calls_python_window_udf(node: &Arc<dyn ExecutionPlan>) -> bool {
    let exprs: &[Arc<dyn WindowExpr>] = if let Some(window) = node.downcast_ref::<WindowAggExec>() {
        window.window_expr()
    } else if let Some(window) = node.downcast_ref::<BoundedWindowAggExec>() {
        window.window_expr()
    } else {
        return false;
    };
    exprs.iter().any(|expr| {
        expr.as_any()
            .downcast_ref::<StandardWindowExpr>()
            .and_then(|standard| {
                standard
                    .get_standard_func_expr()
                    .as_any()
                    .downcast_ref::<WindowUDFExpr>()
            })
            .is_some_and(|udf| {
                udf.fun()
                    .inner()
                    .downcast_ref::<PythonWindowUdf>()
                    .is_some()
            })
    })
}

/// The blob for `node`: its window node with an `EmptyExec` for input,
/// encoded with `codec` (our codec, so UDF payloads are written raw).
pub(crate) fn encode(
    node: &PythonWindowNode,
    codec: &dyn datafusion_proto::physical_plan::PhysicalExtensionCodec,
) -> Result<Vec<u8>> {
    let input = node
        .window
        .children()
        .first()
        .map(|c| Arc::clone(c))
        .ok_or_else(|| DataFusionError::Internal("a window node without an input".to_string()))?;
    let stand_in: Arc<dyn ExecutionPlan> = Arc::new(EmptyExec::new(input.schema()));
    let window = replace_children(Arc::clone(&node.window), vec![stand_in])?;
    let bytes =
        datafusion_proto::bytes::physical_plan_to_bytes_with_extension_codec(window, codec)?;
    let mut blob = Vec::with_capacity(WINDOW_NODE_MAGIC.len() + bytes.len());
    blob.extend_from_slice(WINDOW_NODE_MAGIC);
    blob.extend_from_slice(&bytes);
    Ok(blob)
}

/// How deep window-node blobs may be nested in each other while decoding.
/// Real plans never nest them (a blob's window has an `EmptyExec` for
/// input); a plan from a peer that does is refused before the decoder's
/// recursion can exhaust the stack.
pub(crate) const MAX_NESTED_WINDOW_NODES: usize = 8;

thread_local! {
    static DECODING_DEPTH: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The window node of `blob`, its input put back.
pub(crate) fn decode(
    blob: &[u8],
    inputs: &[Arc<dyn ExecutionPlan>],
    ctx: &TaskContext,
    codec: &dyn datafusion_proto::physical_plan::PhysicalExtensionCodec,
) -> Result<Arc<dyn ExecutionPlan>> {
    let depth = DECODING_DEPTH.with(|d| d.get());
    if depth >= MAX_NESTED_WINDOW_NODES {
        return Err(DataFusionError::Plan(format!(
            "Python window nodes nested more than {MAX_NESTED_WINDOW_NODES} deep in each other;              the plan is corrupt or hostile (dfship never makes such plans)"
        )));
    }
    DECODING_DEPTH.with(|d| d.set(depth + 1));
    let decoded = decode_at_depth(blob, inputs, ctx, codec);
    DECODING_DEPTH.with(|d| d.set(depth));
    decoded
}

fn decode_at_depth(
    blob: &[u8],
    inputs: &[Arc<dyn ExecutionPlan>],
    ctx: &TaskContext,
    codec: &dyn datafusion_proto::physical_plan::PhysicalExtensionCodec,
) -> Result<Arc<dyn ExecutionPlan>> {
    let bytes = &blob[WINDOW_NODE_MAGIC.len()..];
    let [input] = inputs else {
        return Err(DataFusionError::Plan(format!(
            "a Python window node must have one input, this one has {}; the plan is corrupt",
            inputs.len()
        )));
    };
    let window =
        datafusion_proto::bytes::physical_plan_from_bytes_with_extension_codec(bytes, ctx, codec)?;
    if !window.is::<WindowAggExec>() && !window.is::<BoundedWindowAggExec>() {
        return Err(DataFusionError::Plan(format!(
            "a Python window node holds a {} instead of a window node; the plan is corrupt",
            window.name()
        )));
    }
    if window.children().first().map(|c| c.schema()) != Some(input.schema()) {
        return Err(DataFusionError::Plan(
            "a Python window node's input does not have the schema it was planned with; the \
             plan is corrupt"
                .to_string(),
        ));
    }
    attach_frames_to(replace_children(window, vec![Arc::clone(input)])?)
}

/// `plan` with every Python window UDF told the frame and ORDER BY of its
/// window, so its evaluators fetch all frames of a partition in one call
/// (see [`PythonWindowUdf`]). Workers apply it to the window nodes they
/// decode; coordinators through [`AttachWindowFrames`]. Idempotent.
pub fn attach_window_frames(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        if calls_python_window_udf(&node) {
            attach_frames_to(Arc::clone(&node)).map(Transformed::yes)
        } else {
            Ok(Transformed::no(node))
        }
    })
    .map(|transformed| transformed.data)
}

/// [`attach_window_frames`] for one window node.
fn attach_frames_to(node: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    let Some(window) = node.downcast_ref::<WindowAggExec>() else {
        // Python window UDFs never support bounded execution, so DataFusion
        // plans them in `WindowAggExec`; another node is left as it is.
        return Ok(node);
    };
    let input = window.input();
    let schema = input.schema();
    let mut changed = false;
    let mut exprs: Vec<Arc<dyn WindowExpr>> = Vec::with_capacity(window.window_expr().len());
    for expr in window.window_expr() {
        let python = expr
            .as_any()
            .downcast_ref::<StandardWindowExpr>()
            .and_then(|standard| {
                let udf = standard
                    .get_standard_func_expr()
                    .as_any()
                    .downcast_ref::<WindowUDFExpr>()?;
                let python = udf.fun().inner().downcast_ref::<PythonWindowUdf>()?;
                Some((udf, python))
            });
        match python {
            Some((udf, python)) if !python.knows_frame() => {
                let frame = Arc::clone(expr.get_window_frame());
                let sort_options = expr.order_by().iter().map(|sort| sort.options).collect();
                let hinted = Arc::new(WindowUDF::new_from_impl(
                    python.for_frame(Arc::clone(&frame), sort_options),
                ));
                let function = create_udwf_window_expr(
                    &hinted,
                    udf.args(),
                    &schema,
                    expr.name().to_string(),
                    false,
                )?;
                exprs.push(Arc::new(StandardWindowExpr::new(
                    function,
                    expr.partition_by(),
                    expr.order_by(),
                    frame,
                )));
                changed = true;
            }
            _ => exprs.push(Arc::clone(expr)),
        }
    }
    if !changed {
        return Ok(node);
    }
    let can_repartition = !window.partition_keys().is_empty();
    Ok(Arc::new(WindowAggExec::try_new(
        exprs,
        Arc::clone(input),
        can_repartition,
    )?))
}

/// A physical optimizer rule applying [`attach_window_frames`]: install it
/// on any session that runs Python window UDFs itself (dfship's coordinator
/// sessions do), so window functions of their frame take one call per
/// partition there too.
#[derive(Debug, Default)]
pub struct AttachWindowFrames;

impl PhysicalOptimizerRule for AttachWindowFrames {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        attach_window_frames(plan)
    }

    fn name(&self) -> &str {
        "dfship_attach_window_frames"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

fn replace_children(
    plan: Arc<dyn ExecutionPlan>,
    children: Vec<Arc<dyn ExecutionPlan>>,
) -> Result<Arc<dyn ExecutionPlan>> {
    plan.replace_children(
        children,
        ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
    )
}

impl DisplayAs for PythonWindowNode {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "PythonWindowNode: ")?;
        self.window.fmt_as(t, f)
    }
}

impl ExecutionPlan for PythonWindowNode {
    fn name(&self) -> &str {
        "PythonWindowNode"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.window.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        self.window.children()
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        self.window.apply_expressions(f)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(PythonWindowNode {
            window: replace_children(Arc::clone(&self.window), children)?,
        }))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        self.window.execute(partition, context)
    }
}
