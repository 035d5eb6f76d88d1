//! The layers every setting comes from, derived from its one clap
//! declaration: flags and environment variables (clap), a TOML settings
//! file (its values become the declaration's defaults), and Python keyword
//! arguments (turned into flags). [`settings`] lists every setting with its
//! flag, variable, file key, keyword and default, for docs and tests.

use std::path::Path;

use clap::{Arg, ArgAction, Command, CommandFactory, FromArgMatches};

/// One setting as every layer names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// The group (a settings-file table).
    pub group: String,
    /// The field's name, also its Python keyword.
    pub keyword: String,
    /// `--flag`.
    pub flag: String,
    /// `DFSHIP_…`.
    pub env: Option<String>,
    /// `group.key` in a settings file (`None` for `--config` itself).
    pub file_key: Option<String>,
    /// The default, as the flag would take it.
    pub default: Option<String>,
    /// Whether it takes a list (comma-separated on the command line).
    pub list: bool,
    /// Whether it is a yes/no setting.
    pub boolean: bool,
    pub help: String,
}

/// The group each argument of `command` belongs to.
fn group_of(command: &Command, id: &str) -> String {
    command
        .get_groups()
        .find(|group| group.get_args().any(|arg| arg.as_str() == id))
        .map(|group| group.get_id().as_str().to_string())
        .unwrap_or_default()
}

/// A yes/no setting: `--flag` alone means yes (`--flag=false`, no).
fn is_boolean(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse)
        || arg
            .get_num_args()
            .is_some_and(|range| range.min_values() == 0 && range.max_values() == 1)
}

/// Every setting of `command`, in declaration order.
pub fn settings(command: &Command) -> Vec<Setting> {
    command
        .get_arguments()
        .filter(|arg| {
            arg.get_long().is_some() && !matches!(arg.get_id().as_str(), "help" | "version")
        })
        .map(|arg| {
            let keyword = arg.get_id().as_str().to_string();
            let group = group_of(command, &keyword);
            let file_key = (group != "file").then(|| {
                let key = keyword
                    .strip_prefix(&format!("{group}_"))
                    .unwrap_or(&keyword);
                format!("{group}.{key}")
            });
            let default = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .reduce(|a, b| format!("{a},{b}"));
            Setting {
                flag: format!("--{}", arg.get_long().unwrap_or_default()),
                env: arg.get_env().map(|e| e.to_string_lossy().into_owned()),
                list: arg.get_value_delimiter().is_some(),
                boolean: is_boolean(arg),
                help: arg.get_help().map(|h| h.to_string()).unwrap_or_default(),
                keyword,
                group,
                file_key,
                default,
            }
        })
        .collect()
}

/// A value given as a Python keyword argument.
#[derive(Debug, Clone, PartialEq)]
pub enum Keyword {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    List(Vec<String>),
}

impl Keyword {
    fn as_flag_value(&self) -> String {
        match self {
            Self::Bool(b) => b.to_string(),
            Self::Int(n) => n.to_string(),
            Self::Float(x) => x.to_string(),
            Self::Text(text) => text.clone(),
            Self::List(items) => items.join(","),
        }
    }
}

/// Python keyword arguments as the flags of `command` they stand for.
pub fn flags_from_keywords(
    command: &Command,
    keywords: &[(String, Keyword)],
) -> Result<Vec<String>, String> {
    let known = settings(command);
    keywords
        .iter()
        .map(|(name, value)| {
            let setting = known.iter().find(|s| &s.keyword == name).ok_or_else(|| {
                let names: Vec<&str> = known.iter().map(|s| s.keyword.as_str()).collect();
                format!(
                    "unknown setting '{name}'; the settings are: {}",
                    names.join(", ")
                )
            })?;
            if setting.boolean && !matches!(value, Keyword::Bool(_)) {
                return Err(format!(
                    "setting '{name}' takes True or False, got {value:?}"
                ));
            }
            Ok(format!("{}={}", setting.flag, value.as_flag_value()))
        })
        .collect()
}

/// A TOML value as the flag values it stands for.
fn file_values(key: &str, value: &toml::Value) -> Result<Vec<String>, String> {
    let one = |value: &toml::Value| match value {
        toml::Value::String(text) => Ok(text.clone()),
        toml::Value::Integer(n) => Ok(n.to_string()),
        toml::Value::Float(x) => Ok(x.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!(
            "'{key}' is {}, where a string, number or boolean was expected",
            other.type_str()
        )),
    };
    match value {
        toml::Value::Array(items) => items.iter().map(one).collect(),
        other => one(other).map(|v| vec![v]),
    }
}

/// `command` with the values of the settings file `path` as its defaults.
pub fn with_file_defaults(command: Command, path: &Path) -> Result<Command, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the settings file {}: {e}", path.display()))?;
    let table: toml::Table = text.parse().map_err(|e| {
        format!(
            "the settings file {} is not valid TOML: {e}",
            path.display()
        )
    })?;
    let known = settings(&command);
    let mut command = command;
    for (group, entries) in &table {
        let toml::Value::Table(entries) = entries else {
            return Err(format!(
                "{}: '{group}' must be a table such as [{group}]",
                path.display()
            ));
        };
        for (key, value) in entries {
            let file_key = format!("{group}.{key}");
            let setting = known
                .iter()
                .find(|s| s.file_key.as_deref() == Some(file_key.as_str()))
                .ok_or_else(|| {
                    let keys: Vec<&str> =
                        known.iter().filter_map(|s| s.file_key.as_deref()).collect();
                    format!(
                        "{}: unknown setting '{file_key}' (for this program: {})",
                        path.display(),
                        keys.join(", ")
                    )
                })?;
            let values =
                file_values(&file_key, value).map_err(|e| format!("{}: {e}", path.display()))?;
            let id = setting.keyword.clone();
            command = command.mut_arg(id, |arg| arg.default_values(values));
        }
    }
    Ok(command)
}

/// Parses `argv` (program name first) with every layer: the settings file
/// named by `--config`/`DFSHIP_CONFIG` gives defaults, then environment
/// variables and flags. For a command with subcommands, the file applies to
/// the subcommand given.
pub fn parse_from<T, I, S>(argv: I) -> Result<T, clap::Error>
where
    T: CommandFactory + FromArgMatches,
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString> + Clone,
{
    let argv: Vec<std::ffi::OsString> = argv.into_iter().map(Into::into).collect();
    let mut command = T::command();
    if let Some((subcommand, path)) = config_path(&command, &argv) {
        command = match subcommand {
            Some(name) => {
                let sub = command
                    .find_subcommand(&name)
                    .cloned()
                    .ok_or_else(|| file_error(format!("no subcommand '{name}'")))?;
                let layered = with_file_defaults(sub, &path).map_err(file_error)?;
                command.mut_subcommand(name, |_| layered)
            }
            None => with_file_defaults(command, &path).map_err(file_error)?,
        };
    }
    let matches = command.try_get_matches_from(argv)?;
    T::from_arg_matches(&matches)
}

/// [`parse_from`] this process's own command line, refusing secrets on it
/// first ([`refuse_secret_flags`]).
pub fn parse_command_line<T>() -> Result<T, clap::Error>
where
    T: CommandFactory + FromArgMatches,
{
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    refuse_secret_flags(&argv)?;
    parse_from(argv)
}

/// Whether a storage option's key names a credential (its value is a secret).
pub fn is_secret_storage_key(key: &str) -> bool {
    let key = key.trim().to_ascii_lowercase();
    [
        "secret",
        "token",
        "password",
        "account_key",
        "access_key",
        "sas_key",
        "client_assertion",
    ]
    .iter()
    .any(|word| key.contains(word))
        && !key.ends_with("access_key_id")
}

/// Refuses a credential given with `--storage-option` on a command line:
/// every user of the machine can read a process's arguments
/// (`/proc/<pid>/cmdline`, `ps`). The variable (`DFSHIP_STORAGE_OPTIONS`,
/// `AWS_SECRET_ACCESS_KEY`, …) or the settings file keep it private.
pub fn refuse_secret_flags(argv: &[std::ffi::OsString]) -> Result<(), clap::Error> {
    let mut next_is_option = false;
    for arg in argv.iter().skip(1) {
        let arg = arg.to_string_lossy();
        let value = if next_is_option {
            next_is_option = false;
            Some(arg.as_ref())
        } else if arg == "--storage-option" {
            next_is_option = true;
            None
        } else {
            arg.strip_prefix("--storage-option=")
        };
        let Some(value) = value else {
            continue;
        };
        for pair in value.split(',') {
            let key = pair.split_once('=').map_or(pair, |(key, _)| key);
            if is_secret_storage_key(key) {
                return Err(clap::Error::raw(
                    clap::error::ErrorKind::ValueValidation,
                    format!(
                        "--storage-option {key}=… puts a credential on the command line, where \
                         every user of this machine can read it (ps, /proc/<pid>/cmdline); give \
                         it in the environment ({} or DFSHIP_STORAGE_OPTIONS) or in the \
                         settings file's [storage] storage_options instead\n",
                        key.trim().to_ascii_uppercase()
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn file_error(detail: String) -> clap::Error {
    clap::Error::raw(clap::error::ErrorKind::InvalidValue, format!("{detail}\n"))
}

/// The settings file given to `command` (or to the subcommand in `argv`).
fn config_path(
    command: &Command,
    argv: &[std::ffi::OsString],
) -> Option<(Option<String>, std::path::PathBuf)> {
    let matches = command
        .clone()
        .ignore_errors(true)
        .try_get_matches_from(argv)
        .ok()?;
    if let Some((name, sub)) = matches.subcommand() {
        return sub
            .try_get_one::<std::path::PathBuf>("config")
            .ok()
            .flatten()
            .map(|path| (Some(name.to_string()), path.clone()));
    }
    matches
        .try_get_one::<std::path::PathBuf>("config")
        .ok()
        .flatten()
        .map(|path| (None, path.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CoordinatorOptions, WorkerOptions};

    #[test]
    fn credentials_on_the_command_line_are_refused_and_other_storage_options_pass() {
        let argv = |args: &[&str]| -> Vec<std::ffi::OsString> {
            std::iter::once("dfship-worker")
                .chain(args.iter().copied())
                .map(Into::into)
                .collect()
        };
        for refused in [
            &["--storage-option", "aws_secret_access_key=abc"][..],
            &["--storage-option=aws_region=x,aws_session_token=t"],
            &["--storage-option", "AZURE_STORAGE_ACCOUNT_KEY=k"],
            &["--storage-option", "google_service_account_key={}"],
        ] {
            let error = refuse_secret_flags(&argv(refused)).unwrap_err().to_string();
            assert!(error.contains("command line"), "{error}");
        }
        refuse_secret_flags(&argv(&[
            "--storage-option",
            "aws_access_key_id=AKIA,aws_region=eu-west-1",
            "--storage-option=aws_endpoint=http://127.0.0.1:9000",
            "--max-connections",
            "aws_secret_access_key",
        ]))
        .unwrap();
    }

    #[test]
    fn keywords_become_flags_and_unknown_ones_are_refused() {
        let command = CoordinatorOptions::command();
        let flags = flags_from_keywords(
            &command,
            &[
                ("python_runners".into(), Keyword::Int(3)),
                ("strict".into(), Keyword::Bool(false)),
                (
                    "workers".into(),
                    Keyword::List(vec!["http://a:1".into(), "http://b:2".into()]),
                ),
            ],
        )
        .unwrap();
        assert_eq!(
            flags,
            [
                "--python-runners=3",
                "--strict=false",
                "--workers=http://a:1,http://b:2"
            ]
        );
        let error =
            flags_from_keywords(&command, &[("runners".into(), Keyword::Int(3))]).unwrap_err();
        assert!(
            error.contains("unknown setting 'runners'") && error.contains("python_runners"),
            "{error}"
        );
        let error =
            flags_from_keywords(&command, &[("strict".into(), Keyword::Int(1))]).unwrap_err();
        assert!(error.contains("True or False"), "{error}");
    }

    #[test]
    fn a_settings_file_gives_defaults_that_flags_override() {
        let dir = std::env::temp_dir().join(format!("dfship-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("worker.toml");
        std::fs::write(
            &file,
            "[worker]\nport = 7000\n[python]\nrunners = 3\nudf_timeout = \"45s\"\n[functions]\nffi_udfs = [\"a.so:f\", \"b.so:g\"]\n",
        )
        .unwrap();
        let config = format!("--config={}", file.display());
        let options: WorkerOptions = parse_from(["w", &config, "--port", "7001"]).unwrap();
        assert_eq!(options.worker.port, 7001, "a flag wins over the file");
        assert_eq!(options.python.python_runners, Some(3));
        assert_eq!(
            options.python.udf_timeout,
            Some(std::time::Duration::from_secs(45))
        );
        assert_eq!(options.functions.ffi_udfs, ["a.so:f", "b.so:g"]);
        std::fs::write(&file, "[python]\nrunner = 3\n").unwrap();
        let error = parse_from::<WorkerOptions, _, _>(["w", &config])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("unknown setting 'python.runner'") && error.contains("python.runners"),
            "{error}"
        );
        std::fs::write(&file, "python = 3\n").unwrap();
        let error = parse_from::<WorkerOptions, _, _>(["w", &config])
            .unwrap_err()
            .to_string();
        assert!(error.contains("must be a table"), "{error}");
    }
}
