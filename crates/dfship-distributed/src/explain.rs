//! Text for `explain`: the distributed plan with its stages, and how each
//! user-defined function it calls travels to the workers.

use std::sync::Arc;

use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use dfship_codec::{PythonAggregateUdf, PythonScalarUdf, PythonWindowUdf};

/// The distributed plan (stages and tasks) followed by [`describe_udfs`].
pub fn explain_plan(ctx: &SessionContext, plan: &Arc<dyn ExecutionPlan>) -> String {
    format!(
        "{}\n{}",
        datafusion_distributed::display_plan_ascii(plan.as_ref(), false),
        describe_udfs(ctx, plan)
    )
}

/// Which user-defined functions the plan calls and how each one travels:
/// Python UDFs (scalar, aggregate, window) inline, every other non-built-in
/// function by name.
pub fn describe_udfs(ctx: &SessionContext, plan: &Arc<dyn ExecutionPlan>) -> String {
    let shown = datafusion::physical_plan::displayable(plan.as_ref())
        .indent(true)
        .to_string();
    let state = ctx.state();
    let called = |name: &str| shown.contains(&format!("{name}("));
    let mut lines = Vec::new();
    for (name, udf) in sorted(state.scalar_functions()) {
        let python = udf.inner().downcast_ref::<PythonScalarUdf>().map(|python| {
            with_options(
                "Python UDF, travels inline (cloudpickled into the plan)",
                python.call_options(),
            )
        });
        let built_in = || {
            datafusion::functions::all_default_functions()
                .iter()
                .any(|f| f.name() == name)
        };
        lines.extend(how_it_travels(name, called(name), python, built_in));
    }
    for (name, udaf) in sorted(state.aggregate_functions()) {
        let python = udaf
            .inner()
            .downcast_ref::<PythonAggregateUdf>()
            .map(|python| {
                with_options(
                    "Python aggregate UDF, travels inline (cloudpickled into the plan); its \
                 accumulators live in a runner, partial states cross stages as Arrow",
                    python.call_options(),
                )
            });
        let built_in = || {
            datafusion::functions_aggregate::all_default_aggregate_functions()
                .iter()
                .any(|f| f.name() == name)
        };
        lines.extend(how_it_travels(name, called(name), python, built_in));
    }
    for (name, udwf) in sorted(state.window_functions()) {
        let python = udwf
            .inner()
            .downcast_ref::<PythonWindowUdf>()
            .map(|python| {
                with_options(
                "Python window UDF, travels inline inside its window node (cloudpickled into the \
                 plan)",
                python.call_options(),
            )
            });
        let built_in = || {
            datafusion::functions_window::all_default_window_functions()
                .iter()
                .any(|f| f.name() == name)
        };
        lines.extend(how_it_travels(name, called(name), python, built_in));
    }
    if lines.is_empty() {
        "UDFs: none".to_string()
    } else {
        format!("UDFs:\n{}", lines.join("\n"))
    }
}

/// `how` a Python UDF travels, with its call options when any is set.
fn with_options(how: &str, options: dfship_codec::CallOptions) -> String {
    let set = options.describe();
    if set.is_empty() {
        how.to_string()
    } else {
        format!("{how}; {set}")
    }
}

/// The line for function `name`, if the plan calls it and it is not a
/// built-in: `python` says how a Python UDF travels; anything else goes by name.
fn how_it_travels(
    name: &str,
    called: bool,
    python: Option<String>,
    built_in: impl FnOnce() -> bool,
) -> Option<String> {
    match python {
        _ if !called => None,
        Some(how) => Some(format!("  {name}: {how}")),
        None if built_in() => None,
        None => Some(format!(
            "  {name}: travels by name (every worker must register it)"
        )),
    }
}

fn sorted<T>(functions: &std::collections::HashMap<String, T>) -> Vec<(&str, &T)> {
    let mut entries: Vec<(&str, &T)> = functions.iter().map(|(k, v)| (k.as_str(), v)).collect();
    entries.sort_by_key(|(name, _)| *name);
    entries
}
