//! Binding the Python UDFs of a task's plan to that task, so their calls
//! stop when the task ends (its query is cancelled or has failed).
//!
//! Scalar UDFs learn their task from the session config each call carries.
//! Aggregate and window UDFs cannot: DataFusion hands accumulators and
//! evaluators no config. But a worker decodes every task's stage plan on its
//! own, so each task has its own UDF instances; a worker binds them to the
//! task's [`CancelToken`] before the plan runs (datafusion-distributed's
//! worker plan rewrite hook). Their calls then wait with that token, and a
//! call that has not reached a runner when the task ends never does.

use std::sync::Arc;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::error::Result;
use datafusion::logical_expr::AggregateUDF;
use datafusion::physical_expr::window::{
    PlainAggregateWindowExpr, SlidingAggregateWindowExpr, StandardWindowExpr,
};
use datafusion::physical_plan::aggregates::AggregateExec;
use datafusion::physical_plan::windows::{BoundedWindowAggExec, WindowAggExec, WindowUDFExpr};
use datafusion::physical_plan::{ExecutionPlan, WindowExpr};

use crate::execution::{task_token, CancelToken};
use crate::python_udaf::PythonAggregateUdf;
use crate::python_udwf::PythonWindowUdf;

/// Binds every Python aggregate and window UDF of `plan` to the task `task_id`.
pub fn bind_python_udfs_to_task(plan: &Arc<dyn ExecutionPlan>, task_id: &str) -> Result<()> {
    let token = task_token(task_id);
    plan.apply(|node| {
        if let Some(aggregate) = node.downcast_ref::<AggregateExec>() {
            for expr in aggregate.aggr_expr() {
                bind_aggregate(expr.fun(), &token, task_id);
            }
        }
        let windows: &[Arc<dyn WindowExpr>] = if let Some(w) = node.downcast_ref::<WindowAggExec>()
        {
            w.window_expr()
        } else if let Some(w) = node.downcast_ref::<BoundedWindowAggExec>() {
            w.window_expr()
        } else {
            &[]
        };
        for expr in windows {
            bind_window_expr(expr.as_ref(), &token, task_id);
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(())
}

fn bind_aggregate(udaf: &AggregateUDF, token: &CancelToken, id: &str) {
    if let Some(python) = udaf.inner().downcast_ref::<PythonAggregateUdf>() {
        python.function().bind_task(token, id);
    }
}

fn bind_window_expr(expr: &dyn WindowExpr, token: &CancelToken, id: &str) {
    let any = expr.as_any();
    if let Some(standard) = any.downcast_ref::<StandardWindowExpr>() {
        if let Some(udf) = standard
            .get_standard_func_expr()
            .as_any()
            .downcast_ref::<WindowUDFExpr>()
        {
            if let Some(python) = udf.fun().inner().downcast_ref::<PythonWindowUdf>() {
                python.function().bind_task(token, id);
            }
        }
    } else if let Some(plain) = any.downcast_ref::<PlainAggregateWindowExpr>() {
        bind_aggregate(plain.get_aggregate_expr().fun(), token, id);
    } else if let Some(sliding) = any.downcast_ref::<SlidingAggregateWindowExpr>() {
        bind_aggregate(sliding.get_aggregate_expr().fun(), token, id);
    }
}
