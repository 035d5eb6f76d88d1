//! Every dfship setting, declared once.
//!
//! Each field of the groups below (`WorkerSettings`, `FunctionSettings`,
//! `SecuritySettings`, `PythonSettings`, `TransportSettings`, `StorageSettings`,
//! `CoordinatorSettings`) is one setting, and its clap declaration is the
//! one place its flag, environment variable, default and help are written.
//! Everything else is derived from that declaration, by [`layers`]:
//!
//! - its **key in a settings file** (`--config FILE` or `DFSHIP_CONFIG`,
//!   TOML) is `<group>.<field>`, the field's name without the group's
//!   prefix: `python_runners` is `python.runners`, `udf_timeout` is
//!   `python.udf_timeout`, `tls_ca` is `transport.tls_ca`;
//! - its **Python keyword** (`dfship.ClusterContext(...)`) is the field's
//!   name: `python_runners=2`, `udf_timeout=30`, `tls_ca="ca.pem"`.
//!
//! A value from a flag wins over one from the environment, which wins over
//! the settings file, which wins over the default. Python keywords are
//! flags. Every entry point parses with these types: `dfship-worker`,
//! `dfship worker`, `python -m dfship worker` ([`WorkerOptions`]), `dfship
//! sql`/`explain`, `dfship.ClusterContext` and the Rust
//! [`CoordinatorOptions::cluster_context_builder`] ([`CoordinatorOptions`]).
//!
//! ```
//! use dfship_settings::{layers, CoordinatorOptions};
//!
//! let options: CoordinatorOptions = layers::parse_from([
//!     "coordinator", "--workers", "http://10.0.0.5:50051", "--python-runners", "2",
//! ])
//! .unwrap();
//! assert_eq!(options.python.python_runners, Some(2));
//! ```

mod groups;
pub mod layers;

use std::path::PathBuf;

use clap::{Args, Parser};
use datafusion::error::Result;
use datafusion::prelude::SessionConfig;
use dfship_codec::ClusterKey;
use dfship_distributed::{ClusterContextBuilder, InlineUdfs};

pub use groups::{
    parse_bytes, parse_duration, parse_size, secret_files, CoordinatorSettings, FunctionSettings,
    LogFormat, PythonSettings, SecuritySettings, StorageSettings, TransportSettings,
    WorkerSettings, DEFAULT_RUNNER_ENV_DENY,
};

/// The settings file, a TOML file of `[group]` tables (see the crate docs).
#[derive(Debug, Clone, Args, PartialEq)]
#[group(id = "file")]
pub struct ConfigFile {
    /// A TOML settings file (e.g. `[python]\nrunners = 4`); flags and
    /// environment variables override what it says.
    #[arg(long, env = "DFSHIP_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Every setting of a worker process (`dfship-worker`, `dfship worker`,
/// `python -m dfship worker`).
#[derive(Debug, Clone, Parser, PartialEq)]
#[command(
    name = "dfship-worker",
    version,
    about = "A datafusion-distributed worker that runs Python UDFs sent inline in plans"
)]
pub struct WorkerOptions {
    #[command(flatten)]
    pub worker: WorkerSettings,
    #[command(flatten)]
    pub functions: FunctionSettings,
    #[command(flatten)]
    pub security: SecuritySettings,
    #[command(flatten)]
    pub python: PythonSettings,
    #[command(flatten)]
    pub transport: TransportSettings,
    #[command(flatten)]
    pub storage: StorageSettings,
    #[command(flatten)]
    pub file: ConfigFile,
}

/// Every setting of a coordinator (`dfship sql`/`explain`,
/// `dfship.ClusterContext`, the Rust builder).
#[derive(Debug, Clone, Parser, PartialEq)]
#[command(name = "coordinator")]
pub struct CoordinatorOptions {
    #[command(flatten)]
    pub coordinator: CoordinatorSettings,
    #[command(flatten)]
    pub functions: FunctionSettings,
    #[command(flatten)]
    pub security: SecuritySettings,
    #[command(flatten)]
    pub python: PythonSettings,
    #[command(flatten)]
    pub transport: TransportSettings,
    #[command(flatten)]
    pub storage: StorageSettings,
    #[command(flatten)]
    pub file: ConfigFile,
}

impl CoordinatorOptions {
    /// A [`ClusterContextBuilder`] for these settings: the workers, the
    /// codec (with `key`), the channels (TLS, limits), the planner's
    /// partitioning and the FFI UDFs registered by name. Sets up this
    /// process's Python UDF execution too (the stages it keeps).
    ///
    /// ```no_run
    /// use dfship_settings::{layers, CoordinatorOptions};
    ///
    /// let options: CoordinatorOptions =
    ///     layers::parse_from(["coordinator", "--workers", "http://10.0.0.5:50051"]).unwrap();
    /// let key = options.security.take_cluster_key().unwrap();
    /// let ctx = options.cluster_context_builder(key).unwrap().build().unwrap();
    /// ```
    pub fn cluster_context_builder(
        &self,
        key: Option<ClusterKey>,
    ) -> Result<ClusterContextBuilder> {
        self.coordinator.check()?;
        dfship_codec::hide_from_runners(groups::secret_files(&self.security, &self.transport));
        self.python.apply()?;
        let (builder, _) = self.builder_with_inline(key)?;
        Ok(builder)
    }

    /// [`Self::cluster_context_builder`] without setting up Python execution
    /// (the caller did), also returning the codec and channels it installs.
    pub fn builder_with_inline(
        &self,
        key: Option<ClusterKey>,
    ) -> Result<(ClusterContextBuilder, InlineUdfs)> {
        self.coordinator.check()?;
        let inline = InlineUdfs::with_channel_options(
            self.security.codec_options(key),
            self.transport.channel_options()?,
        );
        let mut config = SessionConfig::new();
        if let Some(partitions) = self.coordinator.target_partitions {
            config = config.with_target_partitions(partitions as usize);
        }
        let mut builder = ClusterContextBuilder::new(&self.coordinator.workers)?
            .with_config(config)
            .with_storage_options(self.storage.storage_options()?)
            .with_inline_udfs(inline.clone());
        if let Some(bytes) = self.coordinator.bytes_per_partition {
            builder = builder.with_file_scan_bytes_per_partition(bytes.max(1));
        }
        if let Some(tasks) = self.coordinator.max_tasks_per_stage {
            builder = builder.with_max_tasks_per_stage(tasks as usize);
        }
        builder = builder
            .with_retry_policy(dfship_distributed::RetryPolicy {
                max_attempts: self.coordinator.max_attempts,
                ..Default::default()
            })
            .with_query_options(self.coordinator.query_options())
            .with_membership_options(dfship_distributed::MembershipOptions {
                probe_interval: self.coordinator.probe_interval,
                resolve_interval: self.coordinator.resolve_interval,
                ..Default::default()
            });
        for spec in &self.functions.ffi_udfs {
            builder = builder.with_udf(dfship_distributed::load_ffi_udf(spec)?);
        }
        Ok((builder, inline))
    }
}
