//! `dfship sql` and `dfship explain` against spawned workers, with UDFs
//! declared in a Python file with `dfship.udf`.

use std::path::{Path, PathBuf};
use std::process::Command;

use dfship_integration_tests::*;

fn dfship() -> PathBuf {
    let path = worker_binary().with_file_name("dfship");
    assert!(
        path.exists(),
        "no {}; build it with `cargo build -p dfship-cli`",
        path.display()
    );
    path
}

const UDFS: &str = r#"
import pyarrow as pa
import pyarrow.compute as pc
from dfship import udf

OFFSET = 1000

@udf([pa.int64()], pa.int64(), "immutable")
def shifted(values):
    return pc.add(values, OFFSET)

loud = udf(lambda s: pc.utf8_upper(s), [pa.string()], pa.string(), "stable", name="loud")
"#;

fn run(args: &[&str], dir: &Path, urls: &[String]) -> (bool, String, String) {
    let output = Command::new(dfship())
        .args(args)
        .arg("--workers")
        .arg(urls.join(","))
        .arg("--udfs")
        .arg(dir.join("udfs.py"))
        .args(["--bytes-per-partition", "1"])
        .arg("--table")
        .arg(format!("facts={}", dir.join("facts").display()))
        .env("VIRTUAL_ENV", venv())
        .output()
        .expect("dfship runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_and_explain_with_a_udf_file() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path()).await.unwrap();
    // Plus an aggregate and a window UDF (the container tests' file).
    let aggregates = include_str!("../containers/udfs/aggregates.py");
    std::fs::write(dir.path().join("udfs.py"), format!("{UDFS}\n{aggregates}")).unwrap();
    let cluster = SpawnedCluster::start(2, &[]);

    let query = "SELECT loud(category) AS c, max(shifted(id)) AS m FROM facts GROUP BY loud(category) ORDER BY c";
    let (ok, stdout, stderr) = run(&["sql", query], dir.path(), &cluster.urls);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("| CAT_0 | 5800 |"), "{stdout}");
    assert!(stdout.contains("| CAT_3 | 5799 |"), "{stdout}");

    let (ok, stdout, stderr) = run(&["explain", query], dir.path(), &cluster.urls);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("Stage"), "{stdout}");
    assert!(
        stdout.contains("loud: Python UDF, travels inline"),
        "{stdout}"
    );
    assert!(
        stdout.contains("shifted: Python UDF, travels inline"),
        "{stdout}"
    );

    let out = dir.path().join("result.parquet");
    let (ok, _, stderr) = run(
        &["sql", "--output", out.to_str().unwrap(), query],
        dir.path(),
        &cluster.urls,
    );
    assert!(ok, "{stderr}");
    let ctx = datafusion::prelude::SessionContext::new();
    let rows = ctx
        .read_parquet(out.to_str().unwrap(), Default::default())
        .await
        .unwrap()
        .count()
        .await
        .unwrap();
    assert_eq!(rows, 4);

    // Aggregate and window UDFs from the same file.
    let query = "SELECT category, max(p) AS last FROM (SELECT category, \
                 py_position(id) OVER (PARTITION BY category ORDER BY id) AS p FROM facts) \
                 GROUP BY category ORDER BY category";
    let (ok, stdout, stderr) = run(&["sql", query], dir.path(), &cluster.urls);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("| cat_0    | 1200 |"), "{stdout}");
    let (ok, stdout, stderr) = run(&["explain", query], dir.path(), &cluster.urls);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("py_position: Python window UDF, travels inline inside its window node"),
        "{stdout}"
    );
    let query = "SELECT py_spread(id) AS s FROM facts";
    let (ok, stdout, stderr) = run(&["sql", query], dir.path(), &cluster.urls);
    assert!(ok, "{stderr}");
    let (ok, explained, stderr2) = run(&["explain", query], dir.path(), &cluster.urls);
    assert!(ok, "{stderr2}");
    assert!(
        explained.contains("py_spread: Python aggregate UDF, travels inline"),
        "{explained}"
    );
    assert!(stdout.contains("| 4799 |"), "{stdout}");

    let (ok, _, stderr) = run(
        &["sql", "SELECT nope(id) FROM facts"],
        dir.path(),
        &cluster.urls,
    );
    assert!(!ok && stderr.contains("nope"), "{stderr}");
}

/// Each call of `slow` records its start and its worker (the runner's
/// parent) to `$DFSHIP_TEST_CALLS`, prints a line, then sleeps.
const SLOW_UDFS: &str = r#"
import os, time
import pyarrow as pa
import pyarrow.compute as pc
from dfship import udf

CALLS = os.environ["DFSHIP_TEST_CALLS"]

@udf([pa.int64()], pa.int64(), "immutable", batch_size=16)
def slow(values):
    with open(CALLS, "a") as out:
        out.write(f"{time.time()} {os.getppid()}\n")
    print(f"slow call on {len(values)} rows")
    time.sleep(0.25)
    return pc.multiply(values, 2)
"#;

/// (start time, worker pid) of every `slow` call so far.
fn slow_calls(path: &Path) -> Vec<(f64, u32)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (at, pid) = line.split_once(' ')?;
            Some((at.parse().ok()?, pid.parse().ok()?))
        })
        .collect()
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_shows_udf_output_and_ctrl_c_stops_the_query_on_every_worker() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path()).await.unwrap();
    std::fs::write(dir.path().join("udfs.py"), SLOW_UDFS).unwrap();
    // Runners may run as another user (root's runners run as nobody).
    let calls_dir = dir.path().join("calls");
    std::fs::create_dir(&calls_dir).unwrap();
    std::fs::set_permissions(&calls_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let calls = calls_dir.join("calls.log");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cluster = SpawnedCluster::start(2, &["--python-runners", "2"]);
    let command = |query: &str| {
        let mut command = Command::new(dfship());
        command
            .args(["sql", query, "--workers"])
            .arg(cluster.urls.join(","))
            .arg("--udfs")
            .arg(dir.path().join("udfs.py"))
            .args(["--bytes-per-partition", "1", "--table"])
            .arg(format!("facts={}", dir.path().join("facts").display()))
            .env("VIRTUAL_ENV", venv())
            .env("DFSHIP_TEST_CALLS", &calls);
        command
    };

    // What the UDF prints reaches dfship's stderr, labelled.
    let output = command("SELECT sum(slow(id)) AS s FROM facts WHERE id <= 64")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("(slow, 127.0.0.1:") && stderr.contains(") slow call on 16 rows"),
        "{stderr}"
    );
    std::fs::remove_file(&calls).unwrap();

    // Ctrl-C while calls run on both workers.
    let child = command("SELECT sum(slow(id)) AS s FROM facts")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while slow_calls(&calls).len() < 8 {
        assert!(std::time::Instant::now() < deadline, "no UDF calls in 60 s");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let sent = now();
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    let exited = now() - sent;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted (Ctrl-C)"), "{stderr}");
    assert!(
        exited < 2.0,
        "dfship took {exited:.2} s to stop after SIGINT"
    );
    std::thread::sleep(std::time::Duration::from_secs(3));
    let started = slow_calls(&calls);
    let late: Vec<f64> = started
        .iter()
        .map(|(at, _)| at - sent)
        .filter(|after| *after >= 2.0)
        .collect();
    assert!(late.is_empty(), "UDF calls started {late:?} s after SIGINT");
    let workers: std::collections::BTreeSet<u32> = started.iter().map(|(_, pid)| *pid).collect();
    for pid in cluster.pids() {
        assert!(workers.contains(&pid), "{workers:?} {:?}", cluster.pids());
    }
}
