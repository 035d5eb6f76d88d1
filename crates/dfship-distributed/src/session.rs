//! Session wiring for both sides of a cluster.
//!
//! [`InlineUdfs`] holds what coordinator and workers must agree on: the
//! [`PythonUdfCodec`] (same options, same position in the user-codec list)
//! and the channel resolver that sends Python UDFs inline.
//! [`PythonWorkerSessionBuilder`] builds each query's session on a worker;
//! [`ClusterContextBuilder`] builds the coordinator's `SessionContext`.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{FunctionRegistry, SessionState, SessionStateBuilder};
use datafusion::logical_expr::{AggregateUDF, ScalarUDF, WindowUDF};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_distributed::{
    DistributedExt, DistributedTaskContext, SessionStateBuilderExt, WorkerPlanRewriteEvent,
    WorkerPlanRewriteEventResponse, WorkerQueryContext, WorkerResolver, WorkerSessionBuilder,
};
use datafusion_proto::physical_plan::PhysicalExtensionCodec;
use dfship_codec::{CodecOptions, PythonUdf, PythonUdfCodec, TaskOptions};
use url::Url;

use crate::channel::{ChannelOptions, InlineUdfChannelResolver};
use crate::encoder::InlineUdfEncoder;
use crate::membership::{Membership, MembershipOptions, WorkerSource};
use crate::object_stores::{runtime_env_with_object_stores, StorageOptions};
use crate::retry::{QueryRetry, RetryPolicy};
use crate::rpc_auth::RpcAuthenticator;
use crate::task_lifetime::TASK_ID_HEADER;

/// The codec and channels both sides of a cluster install.
#[derive(Clone)]
pub struct InlineUdfs {
    codec: Arc<PythonUdfCodec>,
    encoder: Arc<InlineUdfEncoder>,
    channels: InlineUdfChannelResolver,
    channel_options: ChannelOptions,
}

impl InlineUdfs {
    /// The codec with `options`, and channels with default [`ChannelOptions`].
    pub fn new(options: CodecOptions) -> Self {
        Self::with_channel_options(options, ChannelOptions::default())
    }

    /// The codec with `options`, and channels with `channels` (TLS, limits).
    /// With a cluster key in `options`, the key also authenticates every RPC.
    pub fn with_channel_options(options: CodecOptions, channels: ChannelOptions) -> Self {
        let auth = options.cluster_key().map(RpcAuthenticator::new);
        let codec = Arc::new(PythonUdfCodec::new(options));
        let user_codecs: Vec<Arc<dyn PhysicalExtensionCodec>> = vec![codec.clone()];
        let encoder = Arc::new(
            InlineUdfEncoder::new(user_codecs, Arc::clone(&codec))
                .unwrap_or_else(|_| unreachable!("the codec is in the list")),
        );
        Self {
            channels: InlineUdfChannelResolver::new(Arc::clone(&encoder), channels.clone(), auth),
            channel_options: channels,
            codec,
            encoder,
        }
    }

    /// How this side's connections behave.
    pub fn channel_options(&self) -> &ChannelOptions {
        &self.channel_options
    }

    pub fn codec(&self) -> &Arc<PythonUdfCodec> {
        &self.codec
    }

    pub fn encoder(&self) -> &Arc<InlineUdfEncoder> {
        &self.encoder
    }

    /// What workers were handed of large pickles, and what they reused.
    pub fn payload_stats(&self) -> crate::PayloadStats {
        self.channels.payload_stats()
    }

    /// Channels to the workers over connections of their own (probes).
    pub(crate) fn probe_channels(&self) -> InlineUdfChannelResolver {
        self.channels.with_own_connections()
    }

    /// Registers the codec as the (only) user codec and installs the channels.
    pub fn install(&self, builder: SessionStateBuilder) -> SessionStateBuilder {
        builder
            .with_distributed_user_codec_arc(self.codec.clone())
            .with_distributed_channel_resolver(self.channels.clone())
    }
}

/// Builds each query's session on a worker: the inline-UDF codec and
/// channels, plus UDFs resolved by name (e.g. FFI UDFs).
#[derive(Clone)]
pub struct PythonWorkerSessionBuilder {
    inline: InlineUdfs,
    by_name: Vec<Arc<ScalarUDF>>,
    storage: StorageOptions,
}

impl PythonWorkerSessionBuilder {
    pub fn new(options: CodecOptions) -> Self {
        Self::with_channel_options(options, ChannelOptions::default())
    }

    /// A worker whose server and whose channels to other workers (shuffles)
    /// use `channels` (TLS, message limits).
    pub fn with_channel_options(options: CodecOptions, channels: ChannelOptions) -> Self {
        Self {
            inline: InlineUdfs::with_channel_options(options, channels),
            by_name: Vec::new(),
            storage: StorageOptions::default(),
        }
    }

    /// Object stores (`s3://`, `gs://`, ...) this worker reads and writes with
    /// `storage` over its environment (see [`StorageOptions`]).
    pub fn with_storage_options(mut self, storage: StorageOptions) -> Self {
        self.storage = storage;
        self
    }

    pub(crate) fn storage_options(&self) -> &StorageOptions {
        &self.storage
    }

    pub(crate) fn inline(&self) -> &InlineUdfs {
        &self.inline
    }

    /// A UDF that travels by name and must be found in this worker's registry.
    pub fn with_udf(mut self, udf: Arc<ScalarUDF>) -> Self {
        self.by_name.push(udf);
        self
    }

    pub fn codec(&self) -> &Arc<PythonUdfCodec> {
        self.inline.codec()
    }
}

/// Prepares each task plan a worker receives: binds its Python aggregate and
/// window UDFs to the task (so their calls stop when it ends), and logs it
/// (task index and count, root node).
fn prepare_task_plan(event: WorkerPlanRewriteEvent) -> Result<WorkerPlanRewriteEventResponse> {
    if let Some(options) = event
        .session_config
        .options()
        .extensions
        .get::<TaskOptions>()
    {
        if !options.task_id.is_empty() {
            dfship_codec::bind_python_udfs_to_task(&event.plan, &options.task_id)?;
        }
    }
    let task = event
        .session_config
        .get_extension::<DistributedTaskContext>();
    tracing::info!(
        task_index = task.as_ref().map(|t| t.task_index),
        task_count = task.as_ref().map(|t| t.task_count),
        root = event.plan.name(),
        "task plan received"
    );
    Ok(WorkerPlanRewriteEventResponse::new(event.plan))
}

#[async_trait]
impl WorkerSessionBuilder for PythonWorkerSessionBuilder {
    async fn build_session_state(&self, ctx: WorkerQueryContext) -> Result<SessionState> {
        let mut builder = ctx
            .builder
            .with_distributed_worker_plan_rewrite_handler(prepare_task_plan);
        let task_id = ctx
            .headers
            .get(TASK_ID_HEADER)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        if !task_id.is_empty() {
            // The task's UDF figures, asked for by query later (`explain_analyze`).
            let label = ctx
                .headers
                .get(crate::query_span::QUERY_HEADER)
                .and_then(crate::query_span::parse);
            if let Some((query, stage, task)) = label {
                dfship_codec::label_task(
                    task_id,
                    dfship_codec::TaskLabel {
                        query: *query.as_bytes(),
                        stage,
                        task,
                    },
                );
                // What its UDFs write: kept for the coordinator, logged, or
                // dropped, as the coordinator asks (see `watch`).
                if let Some((mode, limits)) = ctx
                    .headers
                    .get(crate::watch::OUTPUT_HEADER)
                    .and_then(crate::watch::parse_output_header)
                {
                    dfship_codec::set_query_output(*query.as_bytes(), mode, limits);
                }
                dfship_codec::bind_task_output(
                    task_id,
                    *query.as_bytes(),
                    dfship_codec::OutputOrigin::Task { stage, task },
                );
            }
            if let Some(config) = builder.config() {
                let mut options = TaskOptions::default();
                options.task_id = task_id.to_string();
                config.options_mut().extensions.insert(options);
            }
        }
        let mut state = self.inline.install(builder).build();
        for udf in &self.by_name {
            state.register_udf(Arc::clone(udf))?;
        }
        Ok(state)
    }
}

/// A fixed list of worker URLs.
#[derive(Clone, Debug)]
pub struct StaticWorkers(pub Vec<Url>);

impl WorkerResolver for StaticWorkers {
    fn get_urls(&self) -> Result<Vec<Url>> {
        Ok(self.0.clone())
    }
}

/// Builds a coordinator `SessionContext` that plans distributed queries over
/// `workers`, with Python UDFs shipped inline.
///
/// ```no_run
/// use dfship_distributed::ClusterContextBuilder;
/// let ctx = ClusterContextBuilder::new(["http://127.0.0.1:50051", "http://127.0.0.1:50052"])
///     .unwrap()
///     .build();
/// ```
pub struct ClusterContextBuilder {
    workers: Vec<WorkerSource>,
    inline: Option<InlineUdfs>,
    options: CodecOptions,
    config: SessionConfig,
    by_name: Vec<Arc<ScalarUDF>>,
    python: Vec<PythonUdf>,
    bytes_per_partition: Option<usize>,
    max_tasks_per_stage: Option<usize>,
    membership: MembershipOptions,
    retry: RetryPolicy,
    query: crate::QueryOptions,
    storage: StorageOptions,
}

impl ClusterContextBuilder {
    /// Workers as URLs (`http://10.0.0.5:50051`), DNS names whose every
    /// address is a worker (`dns://workers:50051`), or files listing either
    /// (`file:///etc/dfship/workers`); see [`crate::WorkerSource`].
    pub fn new<I, S>(workers: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let workers = workers
            .into_iter()
            .map(|w| WorkerSource::parse(w.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        if workers.is_empty() {
            return Err(DataFusionError::Configuration(
                "a cluster needs at least one worker URL".to_string(),
            ));
        }
        Ok(Self {
            workers,
            inline: None,
            options: CodecOptions::default(),
            config: SessionConfig::new(),
            by_name: Vec::new(),
            python: Vec::new(),
            bytes_per_partition: None,
            max_tasks_per_stage: None,
            membership: MembershipOptions::default(),
            retry: RetryPolicy::default(),
            query: crate::QueryOptions::default(),
            storage: StorageOptions::default(),
        })
    }

    pub fn with_codec_options(mut self, options: CodecOptions) -> Self {
        self.options = options;
        self
    }

    /// Shares `inline` (and so its encoder statistics) with the caller;
    /// overrides [`Self::with_codec_options`].
    pub fn with_inline_udfs(mut self, inline: InlineUdfs) -> Self {
        self.inline = Some(inline);
        self
    }

    pub fn with_config(mut self, config: SessionConfig) -> Self {
        self.config = config;
        self
    }

    /// A UDF the coordinator plans with and workers resolve by name (a
    /// native or FFI UDF every worker registers too).
    pub fn with_udf(mut self, udf: Arc<ScalarUDF>) -> Self {
        self.by_name.push(udf);
        self
    }

    /// A Python UDF, known only here: it travels inline to the workers.
    pub fn with_python_udf(mut self, udf: ScalarUDF) -> Self {
        self.python.push(PythonUdf::Scalar(udf));
        self
    }

    /// A Python aggregate UDF (see `dfship_codec::PythonAggregateUdf`), known
    /// only here: it travels inline to the workers.
    pub fn with_python_udaf(mut self, udaf: AggregateUDF) -> Self {
        self.python.push(PythonUdf::Aggregate(udaf));
        self
    }

    /// A Python window UDF (see `dfship_codec::PythonWindowUdf`), known only
    /// here: it travels inline to the workers.
    pub fn with_python_udwf(mut self, udwf: WindowUDF) -> Self {
        self.python.push(PythonUdf::Window(udwf));
        self
    }

    /// Every UDF declared in a Python file (see `dfship_codec::load_python_udfs_from_file`).
    pub fn with_python_udfs_from_file(mut self, path: impl AsRef<std::path::Path>) -> Result<Self> {
        self.python
            .extend(dfship_codec::load_python_udfs_from_file(path.as_ref())?);
        Ok(self)
    }

    /// Every UDF declared at the top level of an importable Python module.
    pub fn with_python_udfs_from_module(mut self, module: &str) -> Result<Self> {
        self.python
            .extend(dfship_codec::load_python_udfs_from_module(module)?);
        Ok(self)
    }

    /// Splits file scans into partitions of about this many bytes (small
    /// values spread small test files over every worker).
    pub fn with_file_scan_bytes_per_partition(mut self, bytes: usize) -> Self {
        self.bytes_per_partition = Some(bytes);
        self
    }

    /// At most this many tasks per stage (default: one per worker).
    pub fn with_max_tasks_per_stage(mut self, tasks: usize) -> Self {
        self.max_tasks_per_stage = Some(tasks.max(1));
        self
    }

    /// How the coordinator learns which workers are alive (probe interval).
    pub fn with_membership_options(mut self, options: MembershipOptions) -> Self {
        self.membership = options;
        self
    }

    /// How often a query that lost a worker is attempted (see [`crate::collect`]).
    pub fn with_retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Every query's timeout and where its Python UDFs' output goes (see
    /// [`crate::QueryOptions`]).
    pub fn with_query_options(mut self, options: crate::QueryOptions) -> Self {
        self.query = options;
        self
    }

    /// Object stores (`s3://`, `gs://`, `az://`, `http(s)://`) this
    /// coordinator lists and writes with `storage` over its environment;
    /// workers use their own (see [`StorageOptions`]).
    pub fn with_storage_options(mut self, storage: StorageOptions) -> Self {
        self.storage = storage;
        self
    }

    pub fn build(self) -> Result<SessionContext> {
        let inline = self.inline.unwrap_or_else(|| InlineUdfs::new(self.options));
        let probes: Arc<dyn datafusion_distributed::ChannelResolver + Send + Sync> =
            Arc::new(inline.probe_channels());
        let membership = Membership::new(self.workers, self.membership, Some(probes));
        let retry = Arc::new(
            QueryRetry::new(membership.clone(), self.retry)
                .with_channels(inline.probe_channels())
                .with_query_options(self.query),
        );
        let mut builder = inline.install(
            SessionStateBuilder::new()
                .with_default_features()
                .with_runtime_env(runtime_env_with_object_stores(
                    self.storage,
                    "the coordinator",
                )?)
                .with_config(self.config.with_extension(retry))
                .with_query_planner(Arc::new(crate::prebuilt::PrebuiltAwareQueryPlanner))
                // Window UDFs of their frame: one call per partition, also in
                // the stages this coordinator runs itself.
                .with_physical_optimizer_rule(Arc::new(dfship_codec::AttachWindowFrames))
                .with_distributed_route_tasks_handler(crate::routing::RoundRobinRouting::new(
                    membership.clone(),
                ))
                .with_distributed_worker_resolver(membership)
                .with_distributed_planner()
                .with_distributed_scale_up_leaf_node_handler(crate::leaf::even_file_scan_split),
        );
        if let Some(bytes) = self.bytes_per_partition {
            builder = builder.with_distributed_file_scan_config_bytes_per_partition(bytes)?;
        }
        if let Some(tasks) = self.max_tasks_per_stage {
            builder = builder.with_distributed_max_tasks_per_stage(tasks)?;
        }
        let ctx = SessionContext::from(builder.build());
        for udf in self.by_name {
            ctx.register_udf(udf.as_ref().clone());
        }
        for udf in self.python {
            udf.register(&ctx);
        }
        Ok(ctx)
    }
}
