//! Text for `explain`: the distributed plan with its stages, and how each
//! user-defined function it calls travels to the workers.

use std::sync::Arc;

use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use dfship_codec::PythonScalarUdf;

/// The distributed plan (stages and tasks) followed by [`describe_udfs`].
pub fn explain_plan(ctx: &SessionContext, plan: &Arc<dyn ExecutionPlan>) -> String {
    format!(
        "{}\n{}",
        datafusion_distributed::display_plan_ascii(plan.as_ref(), false),
        describe_udfs(ctx, plan)
    )
}

/// Which user-defined functions the plan calls and how each one travels:
/// Python UDFs inline, every other non-built-in function by name.
pub fn describe_udfs(ctx: &SessionContext, plan: &Arc<dyn ExecutionPlan>) -> String {
    let shown = datafusion::physical_plan::displayable(plan.as_ref())
        .indent(true)
        .to_string();
    let state = ctx.state();
    let mut lines = Vec::new();
    let mut names: Vec<_> = state.scalar_functions().keys().cloned().collect();
    names.sort();
    for name in names {
        let Some(udf) = state.scalar_functions().get(&name) else {
            continue;
        };
        if !shown.contains(&format!("{name}(")) {
            continue;
        }
        if udf.inner().downcast_ref::<PythonScalarUdf>().is_some() {
            lines.push(format!(
                "  {name}: Python UDF, travels inline (cloudpickled into the plan)"
            ));
        } else if !datafusion::functions::all_default_functions()
            .iter()
            .any(|f| f.name() == name)
        {
            lines.push(format!(
                "  {name}: travels by name (every worker must register it)"
            ));
        }
    }
    if lines.is_empty() {
        "UDFs: none".to_string()
    } else {
        format!("UDFs:\n{}", lines.join("\n"))
    }
}
