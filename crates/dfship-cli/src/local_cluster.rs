//! A local cluster: `dfship worker` processes on 127.0.0.1, stopped on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use datafusion::error::{DataFusionError, Result};

pub struct LocalCluster {
    pub urls: Vec<String>,
    /// Where each worker's log goes (none: inherited stderr).
    pub logs: Vec<PathBuf>,
    children: Vec<Child>,
}

impl LocalCluster {
    /// Starts `workers` worker processes of this very binary on free ports,
    /// each with `extra_args`. With `log_dir`, worker `i` logs to
    /// `log_dir/worker-i.log` instead of this process's stderr.
    pub fn start(workers: usize, extra_args: &[String], log_dir: Option<&Path>) -> Result<Self> {
        let exe = std::env::current_exe().map_err(|e| DataFusionError::External(Box::new(e)))?;
        let mut cluster = Self {
            urls: Vec::new(),
            logs: Vec::new(),
            children: Vec::new(),
        };
        for index in 0..workers {
            let mut command = Command::new(&exe);
            command.args(["worker", "--host", "127.0.0.1", "--port", "0"]);
            command.args(extra_args);
            if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
                command.arg("--python-env").arg(venv);
            }
            if let Some(dir) = log_dir {
                let path = dir.join(format!("worker-{index}.log"));
                let file = std::fs::File::create(&path).map_err(|e| {
                    DataFusionError::Execution(format!(
                        "cannot create the worker log {}: {e}",
                        path.display()
                    ))
                })?;
                command.stderr(file);
                cluster.logs.push(path);
            }
            let mut child = command.stdout(Stdio::piped()).spawn().map_err(|e| {
                DataFusionError::Execution(format!("cannot start a worker process: {e}"))
            })?;
            let stdout = child.stdout.take();
            cluster.children.push(child);
            let (sender, receiver) = mpsc::channel();
            std::thread::spawn(move || {
                let Some(stdout) = stdout else { return };
                for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                    if let Some(url) = line.strip_prefix("dfship-worker listening on ") {
                        let _ = sender.send(url.to_string());
                    }
                }
            });
            let url = receiver
                .recv_timeout(Duration::from_secs(60))
                .map_err(|_| {
                    DataFusionError::Execution(format!(
                        "a local worker did not start within 60 s; its error is in {}",
                        cluster
                            .logs
                            .last()
                            .map(|log| log.display().to_string())
                            .unwrap_or_else(|| "the output above".to_string())
                    ))
                })?;
            cluster.urls.push(url);
        }
        Ok(cluster)
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
