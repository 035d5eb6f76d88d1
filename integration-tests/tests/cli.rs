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
