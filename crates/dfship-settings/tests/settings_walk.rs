//! Walks every setting: its flag, environment variable, settings-file key,
//! Python keyword and default are the ones this table pins, and a value
//! given through each of the four layers reaches the same field.

use clap::CommandFactory;
use dfship_settings::layers::{self, flags_from_keywords, settings, Keyword, Setting};
use dfship_settings::{CoordinatorOptions, WorkerOptions};

/// keyword | flag | variable | file key | default | a sample value
type Row = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
    &'static str,
);

const TABLE: &[Row] = &[
    (
        "host",
        "--host",
        "DFSHIP_WORKER_HOST",
        "worker.host",
        Some("127.0.0.1"),
        "0.0.0.0",
    ),
    (
        "port",
        "--port",
        "DFSHIP_WORKER_PORT",
        "worker.port",
        Some("50051"),
        "7001",
    ),
    (
        "insecure",
        "--insecure",
        "DFSHIP_INSECURE",
        "worker.insecure",
        Some("false"),
        "true",
    ),
    (
        "ffi_udfs",
        "--ffi-udf",
        "DFSHIP_FFI_UDFS",
        "functions.ffi_udfs",
        None,
        "a.so:f,b.so:g",
    ),
    (
        "cluster_key_file",
        "--cluster-key-file",
        "DFSHIP_CLUSTER_KEY_FILE",
        "security.cluster_key_file",
        None,
        "/etc/dfship/key",
    ),
    (
        "strict",
        "--strict",
        "DFSHIP_STRICT",
        "security.strict",
        Some("false"),
        "true",
    ),
    (
        "max_payload_bytes",
        "--max-payload-bytes",
        "DFSHIP_MAX_PAYLOAD_BYTES",
        "security.max_payload_bytes",
        Some("104857600"),
        "1048576",
    ),
    (
        "warn_payload_bytes",
        "--warn-payload-bytes",
        "DFSHIP_WARN_PAYLOAD_BYTES",
        "security.warn_payload_bytes",
        Some("10485760"),
        "4096",
    ),
    (
        "python_env",
        "--python-env",
        "DFSHIP_PYTHON_ENV",
        "python.env",
        None,
        "/opt/venv",
    ),
    (
        "python_mode",
        "--python-mode",
        "DFSHIP_PYTHON_MODE",
        "python.mode",
        Some("pool"),
        "in-process",
    ),
    (
        "python_runners",
        "--python-runners",
        "DFSHIP_PYTHON_RUNNERS",
        "python.runners",
        None,
        "3",
    ),
    (
        "udf_timeout",
        "--udf-timeout",
        "DFSHIP_UDF_TIMEOUT",
        "python.udf_timeout",
        None,
        "45",
    ),
    (
        "runner_replies_in_flight",
        "--runner-replies-in-flight",
        "DFSHIP_RUNNER_REPLIES_IN_FLIGHT",
        "python.runner_replies_in_flight",
        None,
        "536870912",
    ),
    (
        "runner_env_deny",
        "--runner-env-deny",
        "DFSHIP_RUNNER_ENV_DENY",
        "python.runner_env_deny",
        None,
        "AWS_SECRET_ACCESS_KEY,AWS_SESSION_TOKEN",
    ),
    (
        "runner_memory_limit",
        "--runner-memory-limit",
        "DFSHIP_RUNNER_MEMORY_LIMIT",
        "python.runner_memory_limit",
        None,
        "1073741824",
    ),
    (
        "python_executable",
        "--python-executable",
        "DFSHIP_PYTHON_EXECUTABLE",
        "python.executable",
        None,
        "/usr/bin/python3",
    ),
    (
        "tls_cert",
        "--tls-cert",
        "DFSHIP_TLS_CERT",
        "transport.tls_cert",
        None,
        "/etc/dfship/cert.pem",
    ),
    (
        "tls_key",
        "--tls-key",
        "DFSHIP_TLS_KEY",
        "transport.tls_key",
        None,
        "/etc/dfship/key.pem",
    ),
    (
        "tls_ca",
        "--tls-ca",
        "DFSHIP_TLS_CA",
        "transport.tls_ca",
        None,
        "/etc/dfship/ca.pem",
    ),
    (
        "max_message_bytes",
        "--max-message-bytes",
        "DFSHIP_MAX_MESSAGE_BYTES",
        "transport.max_message_bytes",
        Some("268435456"),
        "2097152",
    ),
    (
        "workers",
        "--workers",
        "DFSHIP_WORKERS",
        "coordinator.workers",
        None,
        "http://a:1,http://b:2",
    ),
    (
        "target_partitions",
        "--target-partitions",
        "DFSHIP_TARGET_PARTITIONS",
        "coordinator.target_partitions",
        None,
        "4",
    ),
    (
        "bytes_per_partition",
        "--bytes-per-partition",
        "DFSHIP_BYTES_PER_PARTITION",
        "coordinator.bytes_per_partition",
        None,
        "1000",
    ),
    (
        "max_tasks_per_stage",
        "--max-tasks-per-stage",
        "DFSHIP_MAX_TASKS_PER_STAGE",
        "coordinator.max_tasks_per_stage",
        None,
        "2",
    ),
    (
        "http_port",
        "--http-port",
        "DFSHIP_HTTP_PORT",
        "worker.http_port",
        None,
        "9090",
    ),
    (
        "drain_notice",
        "--drain-notice",
        "DFSHIP_DRAIN_NOTICE",
        "worker.drain_notice",
        Some("3"),
        "0",
    ),
    (
        "drain_timeout",
        "--drain-timeout",
        "DFSHIP_DRAIN_TIMEOUT",
        "worker.drain_timeout",
        Some("60"),
        "5",
    ),
    (
        "max_connections",
        "--max-connections",
        "DFSHIP_MAX_CONNECTIONS",
        "worker.max_connections",
        Some("1024"),
        "64",
    ),
    (
        "log_format",
        "--log-format",
        "DFSHIP_LOG_FORMAT",
        "worker.log_format",
        Some("text"),
        "json",
    ),
    (
        "max_attempts",
        "--max-attempts",
        "DFSHIP_MAX_ATTEMPTS",
        "coordinator.max_attempts",
        Some("3"),
        "5",
    ),
    (
        "probe_interval",
        "--probe-interval",
        "DFSHIP_PROBE_INTERVAL",
        "coordinator.probe_interval",
        Some("2"),
        "500ms",
    ),
    (
        "resolve_interval",
        "--resolve-interval",
        "DFSHIP_RESOLVE_INTERVAL",
        "coordinator.resolve_interval",
        Some("5"),
        "1",
    ),
    (
        "query_timeout",
        "--query-timeout",
        "DFSHIP_QUERY_TIMEOUT",
        "coordinator.query_timeout",
        None,
        "90s",
    ),
    (
        "udf_output",
        "--udf-output",
        "DFSHIP_UDF_OUTPUT",
        "coordinator.udf_output",
        Some("client"),
        "off",
    ),
    (
        "udf_output_max_lines",
        "--udf-output-max-lines",
        "DFSHIP_UDF_OUTPUT_MAX_LINES",
        "coordinator.udf_output_max_lines",
        Some("10000"),
        "50",
    ),
    (
        "udf_output_max_bytes",
        "--udf-output-max-bytes",
        "DFSHIP_UDF_OUTPUT_MAX_BYTES",
        "coordinator.udf_output_max_bytes",
        Some("1MiB"),
        "4KiB",
    ),
    (
        "runner_user",
        "--runner-user",
        "DFSHIP_RUNNER_USER",
        "python.runner_user",
        None,
        "10002:10002",
    ),
    (
        "runner_isolation",
        "--runner-isolation",
        "DFSHIP_RUNNER_ISOLATION",
        "python.runner_isolation",
        Some("shared"),
        "query",
    ),
    (
        "storage_options",
        "--storage-option",
        "DFSHIP_STORAGE_OPTIONS",
        "storage.options",
        None,
        "aws_endpoint=http://127.0.0.1:9000,aws_allow_http=true",
    ),
    (
        "cloud_metadata",
        "--cloud-metadata",
        "DFSHIP_CLOUD_METADATA",
        "storage.cloud_metadata",
        Some("false"),
        "true",
    ),
    ("config", "--config", "DFSHIP_CONFIG", "", None, ""),
];

fn row(keyword: &str) -> &'static Row {
    TABLE
        .iter()
        .find(|r| r.0 == keyword)
        .unwrap_or_else(|| panic!("setting '{keyword}' is not in this test's table: add it"))
}

fn check_declarations(found: &[Setting]) {
    for setting in found {
        let (keyword, flag, env, file_key, default, _) = row(&setting.keyword);
        assert_eq!(setting.flag, *flag, "{keyword}");
        assert_eq!(setting.env.as_deref(), Some(*env), "{keyword}");
        assert_eq!(
            setting.file_key.as_deref().unwrap_or(""),
            *file_key,
            "{keyword}"
        );
        assert_eq!(setting.default.as_deref(), *default, "{keyword}");
        assert!(!setting.help.is_empty(), "{keyword} has help text");
    }
}

/// The value of `setting` through each layer parses to the same options.
fn check_layers<T>(program: &str, found: &[Setting])
where
    T: CommandFactory + clap::FromArgMatches + PartialEq + std::fmt::Debug + WithConfig,
{
    let dir = tempfile::tempdir().unwrap();
    let defaults: T = layers::parse_from([program]).unwrap();
    for setting in found.iter().filter(|s| s.keyword != "config") {
        let (_, _, env, _, _, sample) = row(&setting.keyword);
        let flag = format!("{}={sample}", setting.flag);
        let via_flag: T = layers::parse_from([program, flag.as_str()])
            .unwrap_or_else(|e| panic!("{}: {e}", setting.keyword));
        assert_ne!(
            via_flag, defaults,
            "{}: the sample differs from the default",
            setting.keyword
        );

        std::env::set_var(env, sample);
        let via_env: T = layers::parse_from([program]).unwrap();
        std::env::remove_var(env);
        assert_eq!(via_env, via_flag, "{} through {env}", setting.keyword);

        let (group, key) = setting
            .file_key
            .as_deref()
            .unwrap()
            .split_once('.')
            .unwrap();
        let literal = if setting.list {
            let items: Vec<String> = sample.split(',').map(|v| format!("{v:?}")).collect();
            format!("[{}]", items.join(", "))
        } else if setting.boolean || sample.parse::<i64>().is_ok() {
            sample.to_string()
        } else {
            format!("{sample:?}")
        };
        let file = dir.path().join(format!("{}.toml", setting.keyword));
        std::fs::write(&file, format!("[{group}]\n{key} = {literal}\n")).unwrap();
        let config = format!("--config={}", file.display());
        let via_file: T = layers::parse_from([program, config.as_str()]).unwrap();
        assert_eq!(
            via_file,
            via_flag.clone_with_config(&file),
            "{} through {}",
            setting.keyword,
            file.display()
        );

        let keyword = if setting.boolean {
            Keyword::Bool(sample == &"true")
        } else if setting.list {
            Keyword::List(sample.split(',').map(str::to_string).collect())
        } else {
            Keyword::Text(sample.to_string())
        };
        let flags =
            flags_from_keywords(&T::command(), &[(setting.keyword.clone(), keyword)]).unwrap();
        let via_keyword: T =
            layers::parse_from(std::iter::once(program.to_string()).chain(flags)).unwrap();
        assert_eq!(
            via_keyword, via_flag,
            "{} as a Python keyword",
            setting.keyword
        );
    }
}

trait WithConfig: Sized {
    fn clone_with_config(&self, file: &std::path::Path) -> Self;
}

impl WithConfig for WorkerOptions {
    fn clone_with_config(&self, file: &std::path::Path) -> Self {
        let mut copy = self.clone();
        copy.file.config = Some(file.to_path_buf());
        copy
    }
}

impl WithConfig for CoordinatorOptions {
    fn clone_with_config(&self, file: &std::path::Path) -> Self {
        let mut copy = self.clone();
        copy.file.config = Some(file.to_path_buf());
        copy
    }
}

#[test]
fn every_worker_setting_has_its_flag_variable_file_key_keyword_and_default() {
    let found = settings(&WorkerOptions::command());
    check_declarations(&found);
    check_layers::<WorkerOptions>("dfship-worker", &found);
}

#[test]
fn every_coordinator_setting_has_its_flag_variable_file_key_keyword_and_default() {
    let found = settings(&CoordinatorOptions::command());
    check_declarations(&found);
    check_layers::<CoordinatorOptions>("coordinator", &found);
}

#[test]
fn the_table_has_no_setting_that_neither_side_declares() {
    let worker = settings(&WorkerOptions::command());
    let coordinator = settings(&CoordinatorOptions::command());
    for (keyword, ..) in TABLE {
        assert!(
            worker
                .iter()
                .chain(&coordinator)
                .any(|s| &s.keyword == keyword),
            "{keyword} is in the table but declared nowhere"
        );
    }
}
