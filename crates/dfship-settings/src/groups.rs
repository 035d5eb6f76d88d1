//! The settings, in groups. Each field is declared here once, with its
//! flag, environment variable, default and help; the TOML key and the Python
//! keyword are derived from it (see the crate docs).

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::Args;
use datafusion::error::{DataFusionError, Result};
use dfship_codec::{
    ClusterKey, CodecOptions, PythonExecution, PythonMode, RunnerUser, UdfOutputMode,
    DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_WARN_PAYLOAD_BYTES,
};
use dfship_distributed::{ChannelOptions, StorageOptions, TlsConfig, DEFAULT_MAX_MESSAGE_BYTES};

/// What only a worker process has: where it listens, what it registers by name.
#[derive(Debug, Clone, Args, PartialEq)]
#[group(id = "worker")]
pub struct WorkerSettings {
    /// Address to listen on.
    #[arg(long, env = "DFSHIP_WORKER_HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on; 0 picks a free one (the address is printed on start).
    #[arg(long, env = "DFSHIP_WORKER_PORT", default_value_t = 50051)]
    pub port: u16,

    /// Listen beyond loopback without a cluster key or mutual TLS: anyone
    /// who reaches the port can then run plans that read and write files as
    /// this worker. Only for isolated networks; a loud warning is logged.
    #[arg(
        long, env = "DFSHIP_INSECURE", num_args = 0..=1, require_equals = true,
        default_value = "false", default_missing_value = "true",
        value_parser = BoolishValueParser::new()
    )]
    pub insecure: bool,

    /// Serve /livez, /readyz (503 while draining) and /metrics (Prometheus)
    /// over plain HTTP on this port of --host [default: off; 0 picks a free one].
    #[arg(long, env = "DFSHIP_HTTP_PORT")]
    pub http_port: Option<u16>,

    /// On SIGTERM, how long the worker keeps taking tasks while telling
    /// coordinators' probes it is draining (longer than their --probe-interval).
    #[arg(long, env = "DFSHIP_DRAIN_NOTICE", default_value = "3", value_parser = parse_duration_or_zero)]
    pub drain_notice: Duration,

    /// On SIGTERM, the longest the worker waits for running queries before it
    /// stops anyway (SIGINT stops at once).
    #[arg(long, env = "DFSHIP_DRAIN_TIMEOUT", default_value = "60", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Connections this worker keeps open at most; more are closed at once
    /// (each holds a file descriptor; TLS handshakes get 10 s).
    #[arg(long, env = "DFSHIP_MAX_CONNECTIONS", default_value_t = dfship_distributed::DEFAULT_MAX_CONNECTIONS, value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u32).range(1..), |n| n as usize))]
    pub max_connections: usize,

    /// Log lines on stderr as `text` or `json` (one object per line, with
    /// the query id of the request a line belongs to); `RUST_LOG` filters.
    #[arg(long, env = "DFSHIP_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields, spans).
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("'{other}' is not a log format: use text or json")),
        }
    }
}

impl WorkerSettings {
    /// How this worker drains on SIGTERM.
    pub fn drain_options(&self) -> dfship_distributed::DrainOptions {
        dfship_distributed::DrainOptions {
            notice: self.drain_notice,
            timeout: self.drain_timeout,
        }
    }
}

/// Functions every process registers by name (both sides).
#[derive(Debug, Clone, Args, PartialEq)]
#[group(id = "functions")]
pub struct FunctionSettings {
    /// An FFI scalar UDF to register by name: /path/lib.so:symbol or
    /// python.module:attribute (repeatable, or comma-separated); workers and
    /// coordinators must agree.
    #[arg(long = "ffi-udf", env = "DFSHIP_FFI_UDFS", value_delimiter = ',')]
    pub ffi_udfs: Vec<String>,
}

/// Object stores (`s3://`, `gs://`, `az://`, `http(s)://`) tables and
/// results may live in, besides local paths (both sides: each process
/// resolves the stores its plans name from its own settings and
/// environment, so credentials never travel in plans).
#[derive(Debug, Clone, Args, PartialEq)]
#[group(id = "storage")]
pub struct StorageSettings {
    /// An object store setting KEY=VALUE over the environment's AWS_*,
    /// GOOGLE_*, AZURE_* variables (repeatable, or comma-separated):
    /// object_store's keys with their store's prefix (aws_endpoint,
    /// aws_region, aws_allow_http, google_service_account,
    /// azure_storage_account_name...), client keys for every store
    /// (allow_http, timeout, connect_timeout), max_retries, retry_timeout.
    #[arg(
        long = "storage-option",
        env = "DFSHIP_STORAGE_OPTIONS",
        value_delimiter = ','
    )]
    pub storage_options: Vec<String>,

    /// Let object stores without credentials ask the cloud's instance
    /// metadata service (169.254.169.254) for an instance role's; off, a
    /// store without credentials fails at once, saying what to set.
    #[arg(
        long, env = "DFSHIP_CLOUD_METADATA", num_args = 0..=1, require_equals = true,
        default_value = "false", default_missing_value = "true",
        value_parser = BoolishValueParser::new()
    )]
    pub cloud_metadata: bool,
}

impl StorageSettings {
    /// The object store options these settings describe.
    pub fn storage_options(&self) -> Result<StorageOptions> {
        Ok(StorageOptions::parse(&self.storage_options)?.with_cloud_metadata(self.cloud_metadata))
    }
}

/// The cluster key and what inline Python UDFs may be (both sides).
#[derive(Debug, Clone, Args, PartialEq)]
#[group(id = "security")]
pub struct SecuritySettings {
    /// File holding the shared cluster key: every RPC then proves it and
    /// every pickled UDF is signed with it. Else DFSHIP_CLUSTER_KEY, if set.
    #[arg(long, env = "DFSHIP_CLUSTER_KEY_FILE")]
    pub cluster_key_file: Option<PathBuf>,

    /// Refuse every inline Python UDF (only UDFs registered by name run).
    #[arg(
        long, env = "DFSHIP_STRICT", num_args = 0..=1, require_equals = true,
        default_value = "false", default_missing_value = "true",
        value_parser = BoolishValueParser::new()
    )]
    pub strict: bool,

    /// Refuse inline payloads larger than this, e.g. 100MiB.
    #[arg(long, env = "DFSHIP_MAX_PAYLOAD_BYTES", value_parser = parse_size, default_value_t = DEFAULT_MAX_PAYLOAD_BYTES)]
    pub max_payload_bytes: usize,

    /// Log a warning for inline payloads larger than this.
    #[arg(long, env = "DFSHIP_WARN_PAYLOAD_BYTES", value_parser = parse_size, default_value_t = DEFAULT_WARN_PAYLOAD_BYTES)]
    pub warn_payload_bytes: usize,
}

/// Where and how Python UDFs run in a process (workers, and the stages a
/// coordinator keeps).
#[derive(Debug, Clone, Args, PartialEq)]
#[group(id = "python")]
pub struct PythonSettings {
    /// Python virtual environment whose packages UDFs may import (default: $VIRTUAL_ENV).
    #[arg(long, env = "DFSHIP_PYTHON_ENV")]
    pub python_env: Option<PathBuf>,

    /// Where Python UDFs run: `pool` (runner processes: every core, a crashing
    /// or hanging UDF costs one runner) or `in-process` (this process's
    /// interpreter on its own threads; for debugging and tiny UDFs).
    #[arg(long, env = "DFSHIP_PYTHON_MODE", default_value = "pool")]
    pub python_mode: PythonMode,

    /// Runner processes (pool) or interpreter threads (in-process)
    /// [default: the cores this process may use].
    #[arg(long, env = "DFSHIP_PYTHON_RUNNERS", value_parser = clap::value_parser!(u16).range(1..))]
    pub python_runners: Option<u16>,

    /// Longest one UDF call (one batch) may run, e.g. `30s` or `2m`; the
    /// runner is then killed and the query fails naming the UDF (pool mode)
    /// [default: 10m; 0 for no limit].
    #[arg(long, env = "DFSHIP_UDF_TIMEOUT", value_parser = parse_duration_or_zero)]
    pub udf_timeout: Option<Duration>,

    /// Most bytes of replies all runners may be sending at once, e.g.
    /// `512MiB`; a larger reply waits for the others to arrive, one larger
    /// than this fails (pool mode) [default: 1GiB].
    #[arg(long, env = "DFSHIP_RUNNER_REPLIES_IN_FLIGHT", value_parser = parse_bytes)]
    pub runner_replies_in_flight: Option<u64>,

    /// Environment variables runners do not inherit (comma-separated):
    /// credentials of this process that UDFs have no business with; `none`
    /// for none. The cluster key variable is never inherited [default: the
    /// object stores' secrets, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
    /// `AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_STORAGE_ACCESS_KEY`,
    /// `AZURE_CLIENT_SECRET`, `GOOGLE_SERVICE_ACCOUNT_KEY`,
    /// `GOOGLE_APPLICATION_CREDENTIALS`].
    #[arg(long, env = "DFSHIP_RUNNER_ENV_DENY", value_delimiter = ',')]
    pub runner_env_deny: Option<Vec<String>>,

    /// Most memory each runner may use, e.g. `512MiB` or `2GiB` (pool mode).
    #[arg(long, env = "DFSHIP_RUNNER_MEMORY_LIMIT", value_parser = parse_bytes)]
    pub runner_memory_limit: Option<u64>,

    /// The Python interpreter runners run [default: `<python-env>/bin/python`,
    /// else `$VIRTUAL_ENV/bin/python`, else `python3`].
    #[arg(long, env = "DFSHIP_PYTHON_EXECUTABLE")]
    pub python_executable: Option<PathBuf>,

    /// The user Python UDF runners run as: a name, a UID, UID:GID, or
    /// `worker` for this process's own user [default: `nobody` when this
    /// process runs as root (so UDFs cannot read what only root can: the
    /// cluster key file, the worker's /proc files), else its own user].
    #[arg(long, env = "DFSHIP_RUNNER_USER", value_parser = parse_runner_user)]
    pub runner_user: Option<String>,

    /// Which calls may share a runner process: `shared` (any: a runner keeps
    /// what it loaded, and whatever a UDF left in it, across queries) or
    /// `query` (a runner serves one query, then a fresh process replaces it:
    /// nothing a UDF plants reaches another query; costs a runner start per
    /// query and runner used). Pool mode.
    #[arg(long, env = "DFSHIP_RUNNER_ISOLATION", default_value = "shared")]
    pub runner_isolation: dfship_codec::Isolation,
}

/// TLS and message limits of the connections between coordinator and workers.
#[derive(Debug, Clone, Args, PartialEq)]
#[group(id = "transport")]
pub struct TransportSettings {
    /// PEM certificate this process presents: a worker's server certificate
    /// (also presented to other workers it calls), or a coordinator's client
    /// certificate for workers that require one. Needs --tls-key.
    #[arg(long, env = "DFSHIP_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "DFSHIP_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// PEM certificate authority of the cluster: workers' certificates are
    /// verified against it (worker URLs are then https://), and a worker given
    /// it requires clients to present a certificate it signed (mutual TLS).
    #[arg(long, env = "DFSHIP_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// The largest gRPC message accepted, either way (stage plans carry the
    /// Python UDF payloads, up to --max-payload-bytes each).
    #[arg(long, env = "DFSHIP_MAX_MESSAGE_BYTES", value_parser = parse_size, default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
}

/// What only a coordinator has: the workers and how queries split over them.
#[derive(Debug, Clone, Args, PartialEq)]
#[group(id = "coordinator")]
pub struct CoordinatorSettings {
    /// Workers, comma-separated: URLs (http://10.0.0.5:50051), dns://NAME:PORT
    /// (every address NAME resolves to, re-resolved every --resolve-interval),
    /// or file:///PATH (a file of such entries, one per line, re-read when it changes).
    #[arg(long, env = "DFSHIP_WORKERS", value_delimiter = ',')]
    pub workers: Vec<String>,

    /// Partitions a query is planned with [default: DataFusion's, the cores of this process].
    #[arg(long, env = "DFSHIP_TARGET_PARTITIONS", value_parser = clap::value_parser!(u32).range(1..))]
    pub target_partitions: Option<u32>,

    /// Split file scans into partitions of about this many bytes [default:
    /// the planner's; small values spread small files over every worker].
    #[arg(long, env = "DFSHIP_BYTES_PER_PARTITION", value_parser = parse_size)]
    pub bytes_per_partition: Option<usize>,

    /// At most this many tasks per stage [default: one per worker].
    #[arg(long, env = "DFSHIP_MAX_TASKS_PER_STAGE", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tasks_per_stage: Option<u32>,

    /// Attempts of a query that loses a worker: it is planned again on the
    /// live workers at once, or after 0.5 s, 1 s, ... when no lost worker was
    /// named or none is left (1: never retry).
    #[arg(long, env = "DFSHIP_MAX_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,

    /// How often the coordinator probes every worker; a lost worker is taken
    /// back when it answers (e.g. 2, 500ms).
    #[arg(long, env = "DFSHIP_PROBE_INTERVAL", default_value = "2", value_parser = parse_duration)]
    pub probe_interval: Duration,

    /// How often dns:// worker names are resolved again (workers that join
    /// or leave are seen within this time).
    #[arg(long, env = "DFSHIP_RESOLVE_INTERVAL", default_value = "5", value_parser = parse_duration)]
    pub resolve_interval: Duration,

    /// Longest a query may run, e.g. `30s` or `10m`; it is then cancelled on
    /// every worker and fails with a query-timeout error [default: no limit].
    #[arg(long, env = "DFSHIP_QUERY_TIMEOUT", value_parser = parse_duration)]
    pub query_timeout: Option<Duration>,

    /// Where what Python UDFs print, log and warn goes: `client` (shown
    /// where the query was run, each line prefixed with its UDF and worker;
    /// also in the workers' logs), `worker` (workers' logs only) or `off`.
    #[arg(long, env = "DFSHIP_UDF_OUTPUT", default_value = "client")]
    pub udf_output: UdfOutputMode,

    /// Lines of UDF output kept per query (on each worker, and on the
    /// client); the rest is counted and reported in one line.
    #[arg(long, env = "DFSHIP_UDF_OUTPUT_MAX_LINES", default_value_t = dfship_codec::DEFAULT_OUTPUT_LINES)]
    pub udf_output_max_lines: u64,

    /// Bytes of UDF output kept per query, e.g. `1MiB` (on each worker, and on the client).
    #[arg(long, env = "DFSHIP_UDF_OUTPUT_MAX_BYTES", default_value = "1MiB", value_parser = parse_bytes)]
    pub udf_output_max_bytes: u64,
}

impl CoordinatorSettings {
    /// The query options (timeout, UDF output) these settings describe.
    pub fn query_options(&self) -> dfship_distributed::QueryOptions {
        dfship_distributed::QueryOptions {
            timeout: self.query_timeout.filter(|t| !t.is_zero()),
            udf_output: self.udf_output,
            udf_output_limits: dfship_codec::OutputLimits {
                max_lines: self.udf_output_max_lines,
                max_bytes: self.udf_output_max_bytes,
            },
        }
    }
}

/// Variables runners do not inherit unless `--runner-env-deny` says
/// otherwise: the object stores' secrets (the worker reads objects itself;
/// UDFs that need credentials of their own get them another way).
pub const DEFAULT_RUNNER_ENV_DENY: &[&str] = &[
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_CLIENT_SECRET",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS",
];

/// The files of these settings that UDF runners must not touch: the
/// cluster key file, the TLS private key, and the Google service account
/// file `GOOGLE_APPLICATION_CREDENTIALS` names (see
/// `dfship_runtime::landlock`).
pub fn secret_files(security: &SecuritySettings, transport: &TransportSettings) -> Vec<PathBuf> {
    let google = std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS")
        .map(PathBuf::from)
        .filter(|file| file.is_file());
    security
        .cluster_key_file
        .iter()
        .chain(transport.tls_key.iter())
        .cloned()
        .chain(google)
        .collect()
}

impl SecuritySettings {
    /// The cluster key, read once: from `--cluster-key-file`, else from
    /// `DFSHIP_CLUSTER_KEY`, which is then removed from the environment so
    /// no UDF or child process can read it. Call it first thing, before
    /// other threads and Python start.
    pub fn take_cluster_key(&self) -> Result<Option<ClusterKey>> {
        let key = match &self.cluster_key_file {
            Some(path) => Some(ClusterKey::from_file(path)?),
            None => ClusterKey::take_from_env(dfship_codec::CLUSTER_KEY_ENV)?,
        };
        // A key file wins; a variable set beside it must not linger either.
        dfship_codec::erase_env_var(dfship_codec::CLUSTER_KEY_ENV);
        Ok(key)
    }

    /// The codec these settings describe, with `key`.
    pub fn codec_options(&self, key: Option<ClusterKey>) -> CodecOptions {
        CodecOptions::default()
            .with_strict(self.strict)
            .with_optional_cluster_key(key)
            .with_max_payload_bytes(self.max_payload_bytes)
            .with_warn_payload_bytes(self.warn_payload_bytes)
    }
}

impl PythonSettings {
    /// The execution settings these options describe.
    pub fn execution(&self) -> PythonExecution {
        let mut execution = PythonExecution::default()
            .with_mode(self.python_mode)
            .with_isolation(self.runner_isolation)
            .with_udf_timeout(match self.udf_timeout {
                None => Some(dfship_codec::DEFAULT_CALL_TIMEOUT),
                Some(limit) if limit.is_zero() => None,
                limit => limit,
            })
            .with_runner_env_deny(match &self.runner_env_deny {
                None => DEFAULT_RUNNER_ENV_DENY
                    .iter()
                    .map(|name| name.to_string())
                    .collect(),
                Some(names) => names
                    .iter()
                    .map(|name| name.trim().to_string())
                    .filter(|name| !name.is_empty() && !name.eq_ignore_ascii_case("none"))
                    .collect(),
            })
            .with_runner_memory_limit(self.runner_memory_limit);
        if let Some(bytes) = self.runner_replies_in_flight {
            execution = execution.with_replies_in_flight(bytes);
        }
        if let Some(runners) = self.python_runners {
            execution = execution.with_runners(runners.into());
        }
        let python = self.python_executable.clone().or_else(|| {
            self.python_env
                .as_ref()
                .map(|env| env.join("bin").join("python"))
        });
        if let Some(python) = python {
            execution = execution.with_python(python);
        }
        let user = match &self.runner_user {
            // Checked when parsed (`parse_runner_user`).
            Some(spec) => RunnerUser::parse(spec).ok().flatten(),
            None => {
                let (user, warning) = RunnerUser::default_for(&execution.python);
                if let Some(warning) = warning {
                    tracing::warn!("{warning}");
                }
                user
            }
        };
        execution.with_runner_user(user)
    }

    /// Sets this process up to run Python UDFs this way: the environment
    /// for the embedded interpreter, and the runner pool.
    pub fn apply(&self) -> Result<()> {
        self.apply_with(self.execution())
    }

    /// [`Self::apply`] with `execution` (these settings, adjusted by the caller).
    pub fn apply_with(&self, execution: PythonExecution) -> Result<()> {
        if let Some(env) = &self.python_env {
            dfship_codec::use_python_environment(env)?;
        }
        dfship_codec::configure_python_execution(execution)
    }
}

impl TransportSettings {
    /// The connection settings these options describe (reads the PEM files).
    pub fn channel_options(&self) -> Result<ChannelOptions> {
        Ok(ChannelOptions {
            max_message_bytes: self.max_message_bytes,
            tls: TlsConfig::from_files(
                self.tls_cert.as_deref(),
                self.tls_key.as_deref(),
                self.tls_ca.as_deref(),
            )?,
            ..ChannelOptions::default()
        })
    }
}

impl CoordinatorSettings {
    /// Checks the worker list (at least one URL).
    pub fn check(&self) -> Result<()> {
        if self.workers.is_empty() {
            return Err(DataFusionError::Configuration(
                "no workers: give --workers (or DFSHIP_WORKERS, or coordinator.workers in the \
                 settings file) with the URL of each worker, e.g. http://10.0.0.5:50051, or \
                 dns://NAME:PORT, or file:///PATH"
                    .to_string(),
            ));
        }
        Ok(())
    }
}

/// A `--runner-user` value, checked (a user of this machine, a number, UID:GID or `worker`).
fn parse_runner_user(text: &str) -> std::result::Result<String, String> {
    RunnerUser::parse(text).map(|_| text.trim().to_string())
}

/// `"2.5GiB"` as `(2.5, "GiB")`; `None` when it does not start with a number.
fn number_and_unit(text: &str) -> Option<(f64, &str)> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    Some((number.parse().ok()?, unit.trim()))
}

/// [`parse_duration`], or 0.
pub fn parse_duration_or_zero(text: &str) -> std::result::Result<Duration, String> {
    if matches!(text.trim(), "0" | "0s" | "0ms") {
        return Ok(Duration::ZERO);
    }
    parse_duration(text)
}

/// `30`, `30s`, `0.5`, `500ms`, `2m`, `1h`.
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let text = text.trim();
    let (value, unit) = number_and_unit(text)
        .ok_or_else(|| format!("'{text}' is not a duration; write e.g. 30s, 500ms, 2m"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown unit '{other}' in '{text}'; use ms, s, m or h"
            ))
        }
    };
    if !(seconds > 0.0 && seconds.is_finite()) {
        return Err(format!("'{text}' must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// `1048576`, `512MiB`, `2GiB`, `900KiB`, `1G`, `64M`.
pub fn parse_bytes(text: &str) -> std::result::Result<u64, String> {
    let text = text.trim();
    let (value, unit) = number_and_unit(text)
        .ok_or_else(|| format!("'{text}' is not a size; write e.g. 512MiB or 2GiB"))?;
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit '{other}' in '{text}'; use KiB, MiB or GiB"
            ))
        }
    };
    let bytes = value * scale as f64;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("'{text}' is not a usable size"));
    }
    Ok(bytes as u64)
}

/// [`parse_bytes`] as a `usize`.
pub fn parse_size(text: &str) -> std::result::Result<usize, String> {
    parse_bytes(text).and_then(|bytes| {
        usize::try_from(bytes).map_err(|_| format!("'{text}' is too large for this machine"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3 days").is_err());
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("1.5G"), Ok(3 << 29));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("-1").is_err());
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("0").is_err());
    }
}
