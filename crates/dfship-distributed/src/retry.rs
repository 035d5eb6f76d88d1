//! A query survives a lost worker: it is planned again on the workers left
//! and run again, up to `max_attempts` times.
//!
//! **Granularity: the whole query, re-planned.** datafusion-distributed 4.0
//! sends every task's plan when the query starts (`DistributedExec`) and its
//! consumers read each producer task's output as one stream
//! (`NetworkShuffleExec`, `NetworkCoalesceExec`). A task lost half-way has
//! already handed part of its rows to consumers on other workers, which
//! cannot tell them apart from a re-run's, and nothing in 4.0 re-sends one
//! task's plan to another worker or re-points a consumer at it. Re-running
//! one stage would need both: per-task routing at execution time (upstream
//! #694, after 4.0) and consumers that can restart a partition from the
//! beginning (or producers whose output is materialized, as Spark's shuffle
//! files are). What 4.0 allows is planning the query again without the lost
//! worker ([`crate::Membership`] drops it) and running it from scratch.
//!
//! **What may run twice** — one rule, shared with the runner pool's replay of
//! a crashed call: work whose output was thrown away may run again unless a
//! `volatile` Python UDF is involved. A volatile UDF declares that calling it
//! twice is not the same as calling it once (side effects, randomness), so a
//! query using one is not retried, and a crashed runner's call of one is not
//! replayed; the error says so. Immutable and stable UDFs may run again.
//!
//! **Rows are never duplicated or missing**: [`collect`] hands rows to the
//! caller only once an attempt has finished. `COPY … TO` a local path writes
//! into a staging directory beside the target and moves the files into place
//! only when the query succeeded, so a failed or retried write leaves no
//! partial output. Other writes (`INSERT`) are not retried: the error says
//! rows may have been written.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::dataframe::DataFrame;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::SessionState;
use datafusion::logical_expr::{Expr, LogicalPlan, Volatility};
use dfship_codec::ErrorKind;
use url::Url;

use crate::membership::Membership;
use crate::staged_copy::StagedCopy;

/// How often a query is attempted, and how long to wait between attempts.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all (1: never retry).
    pub max_attempts: u32,
    /// The wait before the second attempt; it doubles after each.
    pub first_backoff: Duration,
    /// The longest wait between attempts.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// 3 attempts; when a retry cannot just leave a named worker out, it
    /// waits 0.5 s, then 1 s.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            first_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// What a coordinator's queries retried, since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryStats {
    /// Queries run through [`collect`].
    pub queries: u64,
    /// Attempts after a first one (a query retried twice counts 2).
    pub retries: u64,
    /// Queries that failed after at least one retry.
    pub exhausted: u64,
}

/// The live worker view and retry policy of one coordinator; installed in
/// its session config by `ClusterContextBuilder`, read by [`collect`].
#[derive(Debug)]
pub struct QueryRetry {
    membership: Membership,
    /// Connections of their own to the workers, for progress polls.
    channels: Option<crate::channel::InlineUdfChannelResolver>,
    policy: RetryPolicy,
    /// Timeout and UDF output of every query (see [`crate::QueryOptions`]).
    query: crate::QueryOptions,
    queries: AtomicU64,
    retries: AtomicU64,
    exhausted: AtomicU64,
}

impl QueryRetry {
    pub fn new(membership: Membership, policy: RetryPolicy) -> Self {
        Self {
            membership,
            channels: None,
            policy,
            query: crate::QueryOptions::default(),
            queries: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            exhausted: AtomicU64::new(0),
        }
    }

    /// Progress of queries is polled over `channels` (see [`collect_with_progress`]).
    pub(crate) fn with_channels(
        mut self,
        channels: crate::channel::InlineUdfChannelResolver,
    ) -> Self {
        self.channels = Some(channels);
        self
    }

    /// Every query's timeout and UDF output settings.
    pub(crate) fn with_query_options(mut self, options: crate::QueryOptions) -> Self {
        self.query = options;
        self
    }

    pub fn query_options(&self) -> &crate::QueryOptions {
        &self.query
    }

    pub(crate) fn channels(&self) -> Option<&crate::channel::InlineUdfChannelResolver> {
        self.channels.as_ref()
    }

    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    pub fn stats(&self) -> RetryStats {
        RetryStats {
            queries: self.queries.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            exhausted: self.exhausted.load(Ordering::Relaxed),
        }
    }

    /// The retry state of a context built by `ClusterContextBuilder`.
    pub fn of(state: &SessionState) -> Option<Arc<Self>> {
        state.config().get_extension::<Self>()
    }
}

/// Runs `df` to completion and returns its rows, retrying on the live
/// workers when a worker is lost (see the module docs). A context without
/// [`QueryRetry`] (not built by `ClusterContextBuilder`) runs it once.
///
/// ```no_run
/// # async fn f() -> datafusion::error::Result<()> {
/// let ctx = dfship_distributed::ClusterContextBuilder::new(["http://127.0.0.1:50051"])?.build()?;
/// let rows = dfship_distributed::collect(ctx.sql("SELECT 1").await?).await?;
/// # Ok(()) }
/// ```
pub async fn collect(df: DataFrame) -> Result<Vec<RecordBatch>> {
    collect_with(df, CollectOptions::default()).await
}

/// What [`collect_with`] does beside running the query.
#[derive(Clone, Default)]
pub struct CollectOptions {
    /// Called as the workers report the query's stages advancing.
    pub progress: Option<crate::ProgressCallback>,
    /// Called with each line the query's Python UDFs write, when the
    /// context's `udf_output` is `client` (the default); `None` prints them
    /// on this process's stderr ([`crate::print_output_to_stderr`]).
    pub output: Option<crate::OutputCallback>,
    /// Overrides the context's query timeout (`Some(None)`: no limit).
    pub timeout: Option<Option<Duration>>,
}

/// [`collect`], calling `progress` as the workers report the query's
/// stages advancing (every `PROGRESS_INTERVAL`, when something changed),
/// and once more with every task done when it succeeds. An attempt planned
/// again after a lost worker starts its count afresh.
///
/// ```no_run
/// # async fn f() -> datafusion::error::Result<()> {
/// use std::sync::Arc;
/// let ctx = dfship_distributed::ClusterContextBuilder::new(["http://127.0.0.1:50051"])?.build()?;
/// let df = ctx.sql("SELECT count(*) FROM t").await?;
/// let rows = dfship_distributed::collect_with_progress(
///     df,
///     Some(Arc::new(|p: &dfship_distributed::QueryProgress| {
///         let (done, all) = p.tasks();
///         eprintln!("{done}/{all} tasks");
///     })),
/// )
/// .await?;
/// # Ok(()) }
/// ```
pub async fn collect_with_progress(
    df: DataFrame,
    progress: Option<crate::ProgressCallback>,
) -> Result<Vec<RecordBatch>> {
    collect_with(
        df,
        CollectOptions {
            progress,
            ..Default::default()
        },
    )
    .await
}

/// Runs `df` like [`collect`], with progress, UDF output and a timeout as
/// `options` say (see [`crate::watch`] for how a query is stopped and watched).
///
/// **Cancelling**: drop the returned future (for example, lose a
/// `tokio::select!` against Ctrl-C); the query's tasks then end on every
/// worker, their Python calls are cancelled, and nothing is retried.
///
/// ```no_run
/// # async fn f() -> datafusion::error::Result<()> {
/// use std::time::Duration;
/// use dfship_distributed::{collect_with, CollectOptions};
/// let ctx = dfship_distributed::ClusterContextBuilder::new(["http://127.0.0.1:50051"])?.build()?;
/// let df = ctx.sql("SELECT slow_udf(x) FROM t").await?;
/// let options = CollectOptions {
///     output: Some(std::sync::Arc::new(|line: &dfship_distributed::UdfOutput| {
///         eprintln!("{} said: {}", line.udf, line.text)
///     })),
///     timeout: Some(Some(Duration::from_secs(60))),
///     ..Default::default()
/// };
/// tokio::select! {
///     rows = collect_with(df, options) => { let _rows = rows?; }
///     _ = tokio::signal::ctrl_c() => eprintln!("cancelled: every worker stops the query"),
/// }
/// # Ok(()) }
/// ```
pub async fn collect_with(df: DataFrame, options: CollectOptions) -> Result<Vec<RecordBatch>> {
    let (state, plan) = df.into_parts();
    let Some(retry) = QueryRetry::of(&state) else {
        return DataFrame::new(state, plan).collect().await;
    };
    retry.queries.fetch_add(1, Ordering::Relaxed);
    let timeout = options.timeout.unwrap_or(retry.query.timeout);
    let started = tokio::time::Instant::now();
    let staged = StagedCopy::prepare(&plan)?;
    let plan = staged.as_ref().map_or(plan.clone(), |s| s.plan.clone());
    let attempts = attempts(&state, &plan, &retry, &options, staged.is_some());
    let result = match timeout {
        Some(limit) => match tokio::time::timeout(limit, attempts).await {
            Ok(result) => result,
            // The attempts' future is dropped: every task of the query ends.
            Err(_) => Err(DataFusionError::Execution(format!(
                "{} the query ran past its timeout of {} and was cancelled on every worker \
                 (after {:.1} s); raise query_timeout (or the call's timeout), or make the \
                 query cheaper",
                ErrorKind::QueryTimeout.tag(),
                humantime(limit),
                started.elapsed().as_secs_f64()
            ))),
        },
        None => attempts.await,
    };
    match (result, staged) {
        (Ok(batches), Some(staged)) => {
            staged.commit()?;
            Ok(batches)
        }
        (Err(error), Some(staged)) => {
            staged.discard();
            Err(error)
        }
        (result, None) => result,
    }
}

/// `1.5 s`, `2 min`: a duration as a person reads it.
fn humantime(duration: Duration) -> String {
    let secs = duration.as_secs_f64();
    if secs >= 120.0 {
        format!("{:.0} min", secs / 60.0)
    } else {
        format!("{secs} s")
    }
}

/// Attempts of the query until one succeeds, an error is not a lost
/// worker, or the attempts run out.
async fn attempts(
    state: &SessionState,
    plan: &LogicalPlan,
    retry: &QueryRetry,
    options: &CollectOptions,
    staged: bool,
) -> Result<Vec<RecordBatch>> {
    retry.membership.ensure_probed().await;
    let refusal = retry_refusal(plan, staged);
    let mut causes: Vec<String> = Vec::new();
    let mut backoff = retry.policy.first_backoff;
    loop {
        let error = match run_once(state, plan, retry, options).await {
            Ok(batches) => return Ok(batches),
            Err(error) => error,
        };
        let text = error.to_string();
        let lost = lost_workers(&text);
        for url in &lost {
            retry.membership.report_lost(url, &first_line(&text));
        }
        let attempt = causes.len() + 1;
        if !is_retryable(&text) {
            return Err(with_earlier_attempts(error, &causes));
        }
        causes.push(text);
        if let Some(refusal) = &refusal {
            return Err(DataFusionError::Context(
                format!("{} not retried: {refusal}", ErrorKind::WorkerLost.tag()),
                Box::new(error),
            ));
        }
        if attempt >= retry.policy.max_attempts as usize {
            if attempt == 1 {
                return Err(error);
            }
            retry.exhausted.fetch_add(1, Ordering::Relaxed);
            return Err(exhausted(&causes));
        }
        tracing::warn!(
            attempt,
            max_attempts = retry.policy.max_attempts,
            cause = %first_line(&causes[causes.len() - 1]),
            "a worker was lost: planning the query again on the live workers"
        );
        retry.retries.fetch_add(1, Ordering::Relaxed);
        // The error named the lost worker and it is out of the plan now:
        // nothing to wait for. Otherwise (no live worker, or a loss nobody
        // named) give the cluster time to change.
        if lost.is_empty() || retry.membership.live().is_empty() {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(retry.policy.max_backoff);
        }
    }
}

/// How often a query's progress is asked of its workers.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// Ends the coordinator's own task of a query when dropped: its Python
/// calls still running are cancelled (a query that fails, times out or is
/// dropped stops here too, not only on the workers), and what this process
/// kept of the query's UDF output is forgotten, whether a watcher took it
/// or not.
struct LocalTask {
    id: String,
    /// Known once the query is planned.
    query: Option<[u8; 16]>,
}

impl Drop for LocalTask {
    fn drop(&mut self) {
        dfship_codec::end_task(&self.id);
        if let Some(query) = self.query {
            dfship_codec::forget_query_output(query);
        }
    }
}

async fn run_once(
    state: &SessionState,
    plan: &LogicalPlan,
    retry: &QueryRetry,
    options: &CollectOptions,
) -> Result<Vec<RecordBatch>> {
    let progress = options.progress.as_ref();
    // The stages this process runs are a task of their own: their Python
    // calls see its id (scalar UDFs read it from the planning config), so
    // they stop when the query does and their output is labelled.
    let mut local = LocalTask {
        id: format!("coordinator-{}", uuid::Uuid::new_v4().simple()),
        query: None,
    };
    let mut state = state.clone();
    let mut task_options = dfship_codec::TaskOptions::default();
    task_options.task_id = local.id.clone();
    state
        .config_mut()
        .options_mut()
        .extensions
        .insert(task_options);
    let physical = state.create_physical_plan(plan).await?;
    let stages = crate::stages_of(&physical);
    let query = stages
        .as_ref()
        .map_or_else(uuid::Uuid::new_v4, |(query, _)| *query);
    local.query = Some(*query.as_bytes());
    // Only a query that calls Python UDFs has output to fetch (a plan of
    // extension nodes, such as a datafusion-python physical plan, may).
    let output = match retry.query.udf_output {
        dfship_codec::UdfOutputMode::Client if may_call_python(plan) => Some(
            options
                .output
                .clone()
                .unwrap_or_else(crate::print_output_to_stderr),
        ),
        _ => None,
    };
    dfship_codec::set_query_output(
        *query.as_bytes(),
        retry.query.udf_output,
        retry.query.udf_output_limits,
    );
    dfship_codec::bind_task_output(
        &local.id,
        *query.as_bytes(),
        dfship_codec::OutputOrigin::Coordinator,
    );
    let watcher = output.map(|callback| {
        crate::watch::OutputWatcher::start(
            query,
            retry.membership.live(),
            retry.channels.clone(),
            &retry.query,
            callback,
        )
    });
    // The coordinator's lines of this query name it, as workers' lines do.
    let span = match &stages {
        Some((query, _)) => tracing::info_span!("query", query_id = %query),
        None => tracing::Span::none(),
    };
    let progress_watcher = match (progress, &retry.channels, stages) {
        (Some(callback), Some(channels), Some((query, stages))) => {
            Some(crate::progress::ProgressWatcher::start(
                query,
                stages,
                retry.membership.live(),
                channels.clone(),
                PROGRESS_INTERVAL,
                Arc::clone(callback),
            ))
        }
        _ => None,
    };
    let result = {
        use tracing::Instrument;
        datafusion::physical_plan::collect(physical, state.task_ctx())
            .instrument(span.clone())
            .await
    };
    // Every call has answered (a runner reports a call's output before its
    // answer): what is left on the workers is taken now, also on failure.
    if let Some(watcher) = watcher {
        watcher.finish().await;
    }
    drop(local);
    if let Err(error) = &result {
        span.in_scope(|| tracing::info!(error = %first_line(&error.to_string()), "query failed"));
    }
    match (progress_watcher, progress) {
        (Some(watcher), _) => watcher.finish(result.is_ok()).await,
        // Nothing ran on the workers (e.g. answered from statistics): one
        // view, finished, with no stage.
        (None, Some(callback)) if result.is_ok() => callback(&crate::QueryProgress {
            stages: Vec::new(),
            finished: true,
        }),
        _ => {}
    }
    result
}

/// Why `plan` must not run twice, if it must not.
fn retry_refusal(plan: &LogicalPlan, staged_copy: bool) -> Option<String> {
    let volatile = volatile_python_udfs(plan);
    if !volatile.is_empty() {
        return Some(format!(
            "the query calls the volatile Python UDF(s) {}, which may not run twice (declare \
             them immutable or stable if calling them again is harmless, or run the query again)",
            volatile.join(", ")
        ));
    }
    let mut write = None;
    let _ = plan.apply(|node| {
        match node {
            LogicalPlan::Dml(dml) => write = Some(format!("{} into {}", dml.op, dml.table_name)),
            LogicalPlan::Copy(copy) if !staged_copy => {
                write = Some(format!("COPY to {}", copy.output_url))
            }
            _ => return Ok(TreeNodeRecursion::Continue),
        }
        Ok(TreeNodeRecursion::Stop)
    });
    write.map(|write| {
        format!(
            "the query writes ({write}) and some rows may have been written; check the target \
             before running it again"
        )
    })
}

/// The names of the volatile Python UDFs `plan` calls.
fn volatile_python_udfs(plan: &LogicalPlan) -> Vec<String> {
    python_udfs(plan)
        .into_iter()
        .filter(|(_, volatility)| *volatility == Volatility::Volatile)
        .map(|(name, _)| name)
        .collect()
}

/// Whether `plan` calls a Python UDF, or has nodes whose expressions the
/// logical plan does not show (extension nodes).
fn may_call_python(plan: &LogicalPlan) -> bool {
    let mut extension = false;
    let _ = plan.apply_with_subqueries(|node| {
        extension |= matches!(node, LogicalPlan::Extension(_));
        Ok(TreeNodeRecursion::Continue)
    });
    extension || !python_udfs(plan).is_empty()
}

/// The name and volatility of every Python UDF (scalar, aggregate, window) `plan` calls.
fn python_udfs(plan: &LogicalPlan) -> Vec<(String, Volatility)> {
    let mut names: Vec<(String, Volatility)> = Vec::new();
    let _ = plan.apply_with_subqueries(|node| {
        node.apply_expressions(|expr| {
            expr.apply(|e| {
                let found = match e {
                    Expr::ScalarFunction(f) => Some((
                        f.func.name().to_string(),
                        f.func.signature().volatility,
                        f.func
                            .inner()
                            .downcast_ref::<dfship_codec::PythonScalarUdf>()
                            .is_some(),
                    )),
                    Expr::AggregateFunction(f) => Some((
                        f.func.name().to_string(),
                        f.func.signature().volatility,
                        f.func
                            .inner()
                            .downcast_ref::<dfship_codec::PythonAggregateUdf>()
                            .is_some(),
                    )),
                    Expr::WindowFunction(w) => match &w.fun {
                        datafusion::logical_expr::expr::WindowFunctionDefinition::WindowUDF(f) => {
                            Some((
                                f.name().to_string(),
                                f.signature().volatility,
                                f.inner()
                                    .downcast_ref::<dfship_codec::PythonWindowUdf>()
                                    .is_some(),
                            ))
                        }
                        _ => None,
                    },
                    _ => None,
                };
                if let Some((name, volatility, true)) = found {
                    if !names.iter().any(|(known, _)| *known == name) {
                        names.push((name, volatility));
                    }
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    });
    names
}

/// Whether an error means a worker was lost (and so a re-planned run may
/// succeed), as opposed to an error in the query or a UDF.
fn is_retryable(text: &str) -> bool {
    text.contains(&ErrorKind::WorkerLost.tag())
        || text.contains("timed-out while waiting for the plan to be set")
}

/// The worker URLs an error says were lost.
fn lost_workers(text: &str) -> Vec<Url> {
    const PHRASES: [&str; 3] = [
        "lost the connection to worker ",
        "cannot connect to worker ",
        "could not send worker ",
    ];
    let mut urls: Vec<Url> = Vec::new();
    for phrase in PHRASES {
        for (at, _) in text.match_indices(phrase) {
            let rest = &text[at + phrase.len()..];
            let token: String = rest
                .chars()
                .take_while(|c| !c.is_whitespace() && !matches!(c, '(' | ')' | ',' | ';' | '"'))
                .collect();
            if let Ok(url) = Url::parse(&token) {
                if !urls.contains(&url) {
                    urls.push(url);
                }
            }
        }
    }
    urls
}

fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    line.chars().take(300).collect()
}

fn with_earlier_attempts(error: DataFusionError, causes: &[String]) -> DataFusionError {
    if causes.is_empty() {
        return error;
    }
    DataFusionError::Context(
        format!(
            "attempt {} of the query (retried after a lost worker) failed; earlier: {}",
            causes.len() + 1,
            numbered(causes)
        ),
        Box::new(error),
    )
}

fn exhausted(causes: &[String]) -> DataFusionError {
    DataFusionError::Execution(format!(
        "{} the query failed on each of its {} attempts (a worker was lost each time; raise \
         --max-attempts or fix the workers): {}",
        ErrorKind::WorkerLost.tag(),
        causes.len(),
        numbered(causes)
    ))
}

fn numbered(causes: &[String]) -> String {
    causes
        .iter()
        .enumerate()
        .map(|(i, cause)| format!("attempt {}: {cause}", i + 1))
        .collect::<Vec<_>>()
        .join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_worker_urls_are_read_from_every_wording() {
        let text = "[worker-lost] lost the connection to worker http://127.0.0.1:7001 (it \
                    stopped...); on worker http://127.0.0.1:7002: cannot connect to worker \
                    http://127.0.0.1:7003 within 5s; the coordinator could not send worker \
                    http://h:1/ its plan";
        let urls: Vec<String> = lost_workers(text).iter().map(Url::to_string).collect();
        assert_eq!(
            urls,
            [
                "http://127.0.0.1:7001/",
                "http://127.0.0.1:7003/",
                "http://h:1/"
            ]
        );
        assert!(is_retryable(text));
        assert!(!is_retryable("[udf-raised] ValueError: boom"));
    }

    #[test]
    fn exhausted_error_lists_every_attempt() {
        let text = exhausted(&["a".into(), "b".into(), "c".into()]).to_string();
        assert!(
            text.contains("attempt 1: a | attempt 2: b | attempt 3: c"),
            "{text}"
        );
        assert!(text.contains(&ErrorKind::WorkerLost.tag()));
    }
}
