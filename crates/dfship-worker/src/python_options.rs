//! [`PythonOptions`]: how a process runs Python UDFs, declared once for
//! every process that executes query stages — workers, and the `dfship`
//! CLI's coordinator (which runs the stages it keeps).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use datafusion::error::Result;
use dfship_codec::{PythonExecution, PythonMode};

/// Where and how Python UDFs run in this process.
#[derive(Debug, Clone, Args)]
pub struct PythonOptions {
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
    /// runner is then killed and the query fails naming the UDF (pool mode).
    #[arg(long, env = "DFSHIP_UDF_TIMEOUT", value_parser = parse_duration)]
    pub udf_timeout: Option<Duration>,

    /// Most memory each runner may use, e.g. `512MiB` or `2GiB` (pool mode).
    #[arg(long, env = "DFSHIP_RUNNER_MEMORY_LIMIT", value_parser = parse_bytes)]
    pub runner_memory_limit: Option<u64>,

    /// The Python interpreter runners run [default: `<python-env>/bin/python`,
    /// else `$VIRTUAL_ENV/bin/python`, else `python3`].
    #[arg(long, env = "DFSHIP_PYTHON_EXECUTABLE")]
    pub python_executable: Option<PathBuf>,
}

impl PythonOptions {
    /// The execution settings these options describe.
    pub fn execution(&self) -> PythonExecution {
        let mut execution = PythonExecution::default()
            .with_mode(self.python_mode)
            .with_udf_timeout(self.udf_timeout)
            .with_runner_memory_limit(self.runner_memory_limit);
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
        execution
    }

    /// Sets this process up to run Python UDFs this way: the environment
    /// for the embedded interpreter, and the runner pool or interpreter threads.
    pub fn apply(&self) -> Result<()> {
        if let Some(env) = &self.python_env {
            dfship_codec::use_python_environment(env)?;
        }
        dfship_codec::configure_python_execution(self.execution())
    }
}

/// `"2.5GiB"` as `(2.5, "GiB")`; `None` when it does not start with a number.
fn number_and_unit(text: &str) -> Option<(f64, &str)> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    Some((number.parse().ok()?, unit.trim()))
}

/// `30`, `30s`, `500ms`, `2m`, `1h`.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
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
