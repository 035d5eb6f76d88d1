//! `explain_analyze`: run a query, then show its distributed plan with the
//! metrics every task sent back (datafusion-distributed's own explain
//! analyze) and, per stage, what each Python UDF cost there.
//!
//! A Python UDF is an expression, not a plan node, so DataFusion's metrics
//! (which belong to nodes and travel back in the stage plans' pre-order)
//! have no slot for it. Instead every worker keeps, per task, each scalar
//! UDF's calls, rows, seconds spent waiting for its runners (Python plus
//! transfer) and failures, labelled with the query, stage and task the
//! coordinator's request named (`query_span`), and answers the payload
//! service's `UdfFigures` for a query id. The coordinator's own stage is
//! the change in this process's totals while the query ran. Aggregate and
//! window UDFs are not broken down per task yet (their calls go through
//! runner objects, which carry no task id).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Instant;

use datafusion::dataframe::DataFrame;
use datafusion::error::{DataFusionError, Result};
use datafusion_distributed::DistributedMetricsFormat;
use dfship_codec::UdfFigures;

use crate::retry::QueryRetry;

/// One UDF's figures summed over the tasks of one stage.
#[derive(Debug, Default, Clone, Copy)]
struct StageUdf {
    figures: UdfFigures,
    tasks: usize,
}

/// Runs `df` once (no retry) and returns its distributed plan with metrics
/// followed by a table of its Python UDFs' figures per stage.
///
/// ```no_run
/// # async fn f() -> datafusion::error::Result<()> {
/// let ctx = dfship_distributed::ClusterContextBuilder::new(["http://127.0.0.1:50051"])?.build()?;
/// let text = dfship_distributed::explain_analyze(ctx.sql("SELECT 1").await?).await?;
/// println!("{text}");
/// # Ok(()) }
/// ```
pub async fn explain_analyze(df: DataFrame) -> Result<String> {
    let (state, plan) = df.into_parts();
    let retry = QueryRetry::of(&state).ok_or_else(|| {
        DataFusionError::Plan(
            "explain_analyze needs a context built by ClusterContextBuilder".to_string(),
        )
    })?;
    retry.membership().ensure_probed().await;
    let physical = state.create_physical_plan(&plan).await?;
    let stages = crate::stages_of(&physical);
    let before = dfship_codec::udf_figures();
    let started = Instant::now();
    let batches =
        datafusion::physical_plan::collect(std::sync::Arc::clone(&physical), state.task_ctx())
            .await?;
    let elapsed = started.elapsed();
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let mut text =
        datafusion_distributed::explain_analyze(physical, DistributedMetricsFormat::Aggregated)
            .await?;
    let mut per_stage: BTreeMap<(String, String), StageUdf> = BTreeMap::new();
    let mut unanswered = Vec::new();
    if let (Some((query, _)), Some(channels)) = (&stages, retry.channels()) {
        for url in retry.membership().live() {
            let answer = match channels.raw_channel(&url).await {
                Ok(channel) => crate::payloads::fetch_udf_figures(channel, *query)
                    .await
                    .map_err(|status| status.message().to_string()),
                Err(error) => Err(error.to_string()),
            };
            match answer {
                Ok(figures) => {
                    for f in figures {
                        let entry = per_stage
                            .entry((format!("Stage {}", f.stage), f.udf))
                            .or_default();
                        entry.figures.add(&UdfFigures {
                            calls: f.calls,
                            rows: f.rows,
                            seconds: f.seconds,
                            failures: f.failures,
                        });
                        entry.tasks += 1;
                    }
                }
                Err(error) => unanswered.push(format!("{url}: {error}")),
            }
        }
    }
    for (udf, after) in dfship_codec::udf_figures() {
        let earlier = before
            .iter()
            .find(|(name, _)| *name == udf)
            .map(|(_, f)| *f)
            .unwrap_or_default();
        if after.calls > earlier.calls {
            let delta = UdfFigures {
                calls: after.calls - earlier.calls,
                rows: after.rows - earlier.rows,
                seconds: after.seconds - earlier.seconds,
                failures: after.failures - earlier.failures,
            };
            per_stage.insert(
                ("coordinator".to_string(), udf),
                StageUdf {
                    figures: delta,
                    tasks: 1,
                },
            );
        }
    }
    let _ = writeln!(text, "\n{rows} rows in {elapsed:.2?}");
    let _ = writeln!(
        text,
        "\nPython UDFs per stage (waiting = time for runners' results: Python plus transfer):"
    );
    if per_stage.is_empty() {
        let _ = writeln!(text, "  (no Python scalar UDF was called)");
    }
    for ((stage, udf), s) in &per_stage {
        let f = s.figures;
        let _ = writeln!(
            text,
            "  {stage}: {udf}: calls={} rows={} waiting={:.3}s failures={} tasks={}",
            f.calls, f.rows, f.seconds, f.failures, s.tasks
        );
    }
    for line in unanswered {
        let _ = writeln!(text, "  (no figures from {line})");
    }
    Ok(text)
}
