//! The cluster in containers: one coordinator and three workers, each in its
//! own container with its own address on a private Docker network, built by
//! `integration-tests/containers/images.sh` (no registry involved).
//!
//! These tests are `#[ignore]`d because they need those images; run them
//! with `integration-tests/containers/run.sh`, which builds the images, runs
//! the tests one at a time and removes everything afterwards (`.ci/run` does).
//! Each test's containers and network carry the label `dfship.test` and are
//! removed when the test ends, pass or fail.

use dfship_integration_tests::{AGGREGATE_WINDOW_MATRIX, MATRIX};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const NODE: &str = "dfship-node:bookworm";
const NODE_PY313: &str = "dfship-node:trixie";
const PORT: u16 = 8000;
const FFI: &str = "/opt/dfship/lib/libdfship_ffi_example.so:dfship_ffi_scalar_udf";

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("the docker client runs")
}

fn docker_ok(args: &[&str]) -> String {
    let output = docker(args);
    assert!(
        output.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// What a command run in the coordinator container did.
struct Run {
    success: bool,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// A private network with a coordinator container and worker containers.
struct Cluster {
    prefix: String,
    network: String,
    data: PathBuf,
    containers: Vec<String>,
}

struct WorkerSpec {
    name: &'static str,
    image: &'static str,
    /// The command before `args`: `dfship-worker` in the test images; none
    /// in the deployment image, whose entry point is `python3 -m dfship worker`.
    command: &'static [&'static str],
    args: Vec<&'static str>,
    /// Environment variables (`NAME=value`) of the worker's container.
    env: &'static [&'static str],
}

/// A worker without a key on the test's private network: it listens beyond
/// loopback, so it must be told the network is isolated (`--insecure`).
fn worker(name: &'static str) -> WorkerSpec {
    WorkerSpec {
        name,
        image: NODE,
        command: &["dfship-worker"],
        args: vec!["--ffi-udf", FFI, "--insecure"],
        env: &[],
    }
}

fn here() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("containers")
}

impl Cluster {
    /// Starts the workers and a coordinator; waits until every worker listens.
    fn start(test: &str, workers: Vec<WorkerSpec>) -> Self {
        Self::start_with(test, workers, |_| {})
    }

    /// [`Self::start`], after `prepare` has written what the workers need
    /// into the shared data folder (mounted at /data everywhere).
    fn start_with(test: &str, workers: Vec<WorkerSpec>, prepare: impl FnOnce(&Path)) -> Self {
        let prefix = format!("dfship-{test}");
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/containers/runs");
        let data = root.join(test);
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(data.join("keys")).unwrap();
        std::fs::write(
            data.join("keys/cluster.key"),
            "a shared secret for the cluster",
        )
        .unwrap();
        std::fs::write(data.join("keys/wrong.key"), "somebody else's secret").unwrap();
        // Keys readable by their owner (root) only, as a deployment keeps
        // them; a folder UDFs (run as nobody by root workers) may write to.
        use std::os::unix::fs::PermissionsExt;
        for key in ["cluster.key", "wrong.key"] {
            std::fs::set_permissions(
                data.join("keys").join(key),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
        }
        std::fs::create_dir_all(data.join("drop")).unwrap();
        std::fs::set_permissions(data.join("drop"), std::fs::Permissions::from_mode(0o777))
            .unwrap();
        prepare(&data);
        let mut cluster = Self {
            network: prefix.clone(),
            prefix,
            data,
            containers: Vec::new(),
        };
        cluster.remove_leftovers();
        docker_ok(&[
            "network",
            "create",
            "--label",
            "dfship.test",
            &cluster.network,
        ]);
        for spec in &workers {
            cluster.start_worker(spec);
        }
        let coordinator = cluster.container("coordinator");
        let data_mount = format!("{}:/data", cluster.data.display());
        let udfs = format!("{}:/udfs:ro", here().join("udfs").display());
        let coord_lib = format!("{}:/coord-lib:ro", here().join("coordinator-lib").display());
        docker_ok(&[
            "run",
            "-d",
            "--name",
            &coordinator,
            "--hostname",
            "coordinator",
            "--label",
            "dfship.test",
            "--network",
            &cluster.network,
            "-v",
            &data_mount,
            "-v",
            &udfs,
            "-v",
            &coord_lib,
            "-e",
            "PYTHONPATH=/coord-lib",
            "-e",
            "VIRTUAL_ENV=/opt/dfship/venv",
            NODE,
            "sleep",
            "infinity",
        ]);
        cluster.containers.push(coordinator);
        for spec in &workers {
            cluster.wait_ready(spec.name, 1);
        }
        cluster
    }

    fn container(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    fn url(&self, name: &str) -> String {
        format!("http://{}:{PORT}", self.container(name))
    }

    fn urls(&self, names: &[&str]) -> String {
        names
            .iter()
            .map(|n| self.url(n))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The DNS name every worker of this cluster answers to (a network alias).
    fn alias(&self) -> String {
        format!("{}-pool", self.prefix)
    }

    fn start_worker(&mut self, spec: &WorkerSpec) {
        let name = self.container(spec.name);
        let alias = self.alias();
        let data_mount = format!("{}:/data", self.data.display());
        let port = PORT.to_string();
        let mut args = vec![
            "run",
            "-d",
            "--name",
            &name,
            "--hostname",
            &name,
            "--label",
            "dfship.test",
            "--network",
            &self.network,
            "--network-alias",
            &alias,
            "-v",
            &data_mount,
        ];
        for variable in spec.env {
            args.extend(["-e", variable]);
        }
        args.push(spec.image);
        args.extend(spec.command.iter().copied());
        args.extend([
            "--host",
            "0.0.0.0",
            "--port",
            &port,
            "--python-env",
            "/opt/dfship/venv",
        ]);
        args.extend(spec.args.iter().copied());
        docker_ok(&args);
        self.containers.push(name);
    }

    /// Waits (60 s at most) until a worker has logged `starts` times that it listens.
    fn wait_ready(&self, worker: &str, starts: usize) {
        let name = self.container(worker);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let logs = docker(&["logs", &name]);
            let text = String::from_utf8_lossy(&logs.stdout).into_owned()
                + &String::from_utf8_lossy(&logs.stderr);
            if text.matches("dfship-worker listening on").count() >= starts {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "worker {name} did not start within 60 s:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs a command in the coordinator container, killed after `limit`.
    fn exec(&self, args: &[&str], limit: Duration) -> Run {
        self.exec_env(&[], args, limit)
    }

    /// [`Self::exec`] with `NAME=VALUE` variables set for the command.
    fn exec_env(&self, env: &[&str], args: &[&str], limit: Duration) -> Run {
        let started = Instant::now();
        let mut child = Command::new("docker")
            .arg("exec")
            .args(env.iter().flat_map(|pair| ["-e", pair]))
            .arg(self.container("coordinator"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("docker exec runs");
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let output = child.wait_with_output().unwrap();
        Run {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            took: started.elapsed(),
        }
    }

    /// `dfship sql` on the coordinator against `workers`, with a UDF file from containers/udfs.
    fn sql(&self, workers: &[&str], udfs: &str, query: &str, extra: &[&str]) -> Run {
        self.sql_at(&self.urls(workers), udfs, query, extra)
    }

    /// [`Self::sql`] against worker URLs written out (e.g. `https://…`).
    fn sql_at(&self, workers: &str, udfs: &str, query: &str, extra: &[&str]) -> Run {
        self.sql_on_table(workers, udfs, "/data/facts", query, extra, &[])
    }

    /// [`Self::sql_at`] with the facts table at `location` (a folder or a URL).
    fn sql_on_table(
        &self,
        workers: &str,
        udfs: &str,
        location: &str,
        query: &str,
        extra: &[&str],
        env: &[&str],
    ) -> Run {
        let udfs = format!("/udfs/{udfs}");
        let table = format!("facts={location}");
        let mut args = vec![
            "dfship",
            "sql",
            "--workers",
            workers,
            "--udfs",
            &udfs,
            "--table",
            &table,
            "--bytes-per-partition",
            "1",
        ];
        args.extend(extra.iter().copied());
        args.push(query);
        self.exec_env(env, &args, Duration::from_secs(180))
    }

    /// Writes the shared dataset (as the coordinator, into /data).
    fn write_dataset(&self) {
        let check = self.exec(
            &[
                "dfship-cluster-check",
                "--workers",
                "http://unused:1",
                "--data",
                "/data",
                "--write-only",
            ],
            Duration::from_secs(120),
        );
        assert!(check.success, "writing the dataset: {}", check.stderr);
    }

    fn remove_leftovers(&self) {
        let listed = docker_ok(&["ps", "-aq", "--filter", &format!("name=^{}-", self.prefix)]);
        for id in listed.split_whitespace() {
            docker(&["rm", "-f", id]);
        }
        docker(&["network", "rm", &self.network]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for name in &self.containers {
            docker(&["rm", "-f", name]);
        }
        docker(&["network", "rm", &self.network]);
    }
}

fn assert_ok(run: &Run, what: &str) {
    assert!(
        run.success,
        "{what} failed after {:?}:\n{}\n{}",
        run.took, run.stdout, run.stderr
    );
}

fn assert_fails_with(run: &Run, what: &str, needles: &[&str]) {
    assert!(!run.success, "{what} should fail:\n{}", run.stdout);
    for needle in needles {
        assert!(
            run.stderr.contains(needle),
            "{what}: the error names {needle:?}:\n{}",
            run.stderr
        );
    }
}

/// `SELECT sum(py_double(id))` over the dataset is 2 * (1 + ... + 4800).
const SUM_DOUBLE: &str = "SELECT sum(py_double(id)) AS s FROM facts";
const SUM_DOUBLE_VALUE: &str = "23044800";

/// Runs [`SUM_DOUBLE`] on `workers` and checks it succeeds with the right sum.
fn assert_sum_double(cluster: &Cluster, workers: &[&str], what: &str, extra: &[&str]) {
    let run = cluster.sql(workers, "basic.py", SUM_DOUBLE, extra);
    assert_ok(&run, what);
    assert!(
        run.stdout.contains(SUM_DOUBLE_VALUE),
        "{what}: {}",
        run.stdout
    );
}

#[test]
#[ignore = "needs the container images: run integration-tests/containers/run.sh"]
fn query_matrix_across_containers() {
    let cluster = Cluster::start("matrix", vec![worker("w1"), worker("w2"), worker("w3")]);
    let workers = cluster.urls(&["w1", "w2", "w3"]);
    // datafusion-python (in the coordinator container) makes plans with
    // scalar, aggregate and window UDFs; the check runs them on the cluster.
    cluster.write_dataset();
    let plans = cluster.exec(
        &[
            "/opt/dfship/venv/bin/python",
            "/udfs/dfpy_plans.py",
            "/data",
            "/data/dfpy",
        ],
        Duration::from_secs(300),
    );
    assert_ok(&plans, "datafusion-python making plans");
    let dfpy_plans = 2 * plans
        .stdout
        .lines()
        .filter(|l| l.starts_with("wrote "))
        .count();
    assert!(dfpy_plans >= 10, "{}", plans.stdout);
    let check = cluster.exec(
        &[
            "dfship-cluster-check",
            "--workers",
            &workers,
            "--data",
            "/data",
            "--ffi-udf",
            FFI,
            "--datafusion-python-plans",
            "/data/dfpy",
        ],
        Duration::from_secs(600),
    );
    println!("{}", check.stdout);
    assert_ok(&check, "the query matrix");
    let passed = check
        .stdout
        .lines()
        .filter(|l| l.starts_with("PASS "))
        .count();
    let expected = MATRIX.len() + AGGREGATE_WINDOW_MATRIX.len() + 1 + dfpy_plans;
    assert_eq!(
        passed, expected,
        "the scalar and aggregate/window matrices, the FFI query and the datafusion-python \
         plans pass:\n{}",
        check.stdout
    );
}

#[test]
#[ignore = "needs the container images: run integration-tests/containers/run.sh"]
fn a_module_only_the_coordinator_has() {
    let cluster = Cluster::start("module", vec![worker("w1"), worker("w2"), worker("w3")]);
    cluster.write_dataset();
    let all = ["w1", "w2", "w3"];
    let query = "SELECT max(with_bonus(id)) AS m FROM facts";
    // The workers' image has no coord_helper: it travels by value with the
    // UDF that imports it, found by dfship (no registration).
    let local = cluster.sql(&all, "local_module.py", query, &[]);
    assert_ok(&local, "a UDF importing a module only the coordinator has");
    assert!(
        local.stdout.contains("5800"),
        "4800 + 1000:\n{}",
        local.stdout
    );
    let by_value = cluster.sql(&all, "by_value.py", query, &[]);
    assert_ok(&by_value, "the same UDF with coord_helper pickled by value");
    assert!(
        by_value.stdout.contains("5800"),
        "4800 + 1000:\n{}",
        by_value.stdout
    );
    // A package (two modules) the workers' image lacks, shipped by the UDF
    // file's environment, unpacked into each worker's cache and imported
    // there by the runners (which run as nobody).
    let shipped = cluster.sql(
        &all,
        "shipped_package.py",
        "SELECT max(with_pkg_bonus(id)) AS m FROM facts",
        &[],
    );
    assert_ok(
        &shipped,
        "a package shipped with the UDF file's environment",
    );
    assert!(
        shipped.stdout.contains("6800"),
        "4800 + 2000:\n{}",
        shipped.stdout
    );
}

#[test]
#[ignore = "needs the container images: run integration-tests/containers/run.sh"]
fn what_a_udf_prints_on_a_worker_container_reaches_dfship_sql() {
    let cluster = Cluster::start("output", vec![worker("w1"), worker("w2")]);
    cluster.write_dataset();
    let run = cluster.sql(
        &["w1", "w2"],
        "basic.py",
        "SELECT sum(chatty_host(id)) AS s FROM facts",
        &[],
    );
    assert_ok(&run, "a query whose UDF prints");
    assert!(
        run.stdout.contains("11522400"),
        "1 + ... + 4800:\n{}",
        run.stdout
    );
    // Each line names its UDF and worker, and came from that worker's container.
    for name in ["w1", "w2"] {
        let host = cluster.container(name);
        let line = format!("(chatty_host, {host}:{PORT}) hello from {host} (");
        assert!(run.stderr.contains(&line), "{line:?} in:\n{}", run.stderr);
    }
    // The same lines are in the workers' own logs.
    let logs = docker(&["logs", &cluster.container("w1")]);
    let text =
        String::from_utf8_lossy(&logs.stdout).into_owned() + &String::from_utf8_lossy(&logs.stderr);
    assert!(text.contains("hello from"), "{text}");
}

#[test]
#[ignore = "needs the container images: run integration-tests/containers/run.sh"]
fn a_worker_on_another_python_version() {
    let skewed = WorkerSpec {
        name: "py313",
        image: NODE_PY313,
        command: &[],
        args: vec!["--insecure"],
        env: &[],
    };
    let cluster = Cluster::start("skew", vec![worker("w1"), worker("w2"), skewed]);
    cluster.write_dataset();
    // Listed first, the Python 3.13 worker takes the first task of the stage.
    let run = cluster.sql(&["py313", "w1", "w2"], "basic.py", SUM_DOUBLE, &[]);
    assert_fails_with(
        &run,
        "a query reaching the Python 3.13 worker",
        &["3.11", "3.13", &cluster.container("py313")],
    );
    assert_sum_double(
        &cluster,
        &["w1", "w2"],
        "the next query on the Python 3.11 workers",
        &[],
    );
}

/// What [`break_a_worker_mid_query`] saw.
struct Broken {
    run: Run,
    /// From the fault to the end of the query.
    after_fault: Duration,
}

/// Starts a slow query calling `udf` on all three workers, breaks `w3` with
/// `fault` once it is under way, and returns how the query ended.
fn break_a_worker_mid_query(cluster: &Cluster, udf: &str, fault: &[&str]) -> Broken {
    // Listed first, w3 takes the first task of the stage.
    let workers = cluster.urls(&["w3", "w1", "w2"]);
    let container = cluster.container("coordinator");
    let query = format!("SELECT count(*) AS c, sum({udf}(id)) AS s FROM facts");
    let started = Instant::now();
    let child = Command::new("docker")
        .args([
            "exec",
            &container,
            "dfship",
            "sql",
            "--workers",
            &workers,
            "--udfs",
            "/udfs/basic.py",
            "--table",
            "facts=/data/facts",
            "--bytes-per-partition",
            "1",
            &query,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    docker_ok(fault);
    let broken_at = Instant::now();
    // Detection (keepalive: about 15 s for a silent peer), then a re-run.
    let deadline = broken_at + Duration::from_secs(60);
    let mut child = child;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "the query still runs 60 s after `docker {}`",
                fault.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().unwrap();
    let run = Run {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        took: started.elapsed(),
    };
    println!(
        "`docker {}` after {:?}: the query ended {:?} later (success: {})",
        fault.join(" "),
        broken_at - started,
        broken_at.elapsed(),
        run.success
    );
    Broken {
        run,
        after_fault: broken_at.elapsed(),
    }
}

/// The query of [`break_a_worker_mid_query`] gave the whole answer, after
/// planning again without w3.
fn assert_recovered(broken: &Broken) {
    assert_ok(&broken.run, "the query that lost w3");
    assert!(
        broken.run.stdout.contains("4800") && broken.run.stdout.contains(SUM_DOUBLE_VALUE),
        "the whole answer: {}",
        broken.run.stdout
    );
    assert!(
        broken
            .run
            .stderr
            .contains("planning the query again on the live workers"),
        "it was retried:\n{}",
        broken.run.stderr
    );
}

#[test]
#[ignore = "needs the container images: run integration-tests/containers/run.sh"]
fn kill_9_of_a_worker_mid_query() {
    let cluster = Cluster::start("kill", vec![worker("w1"), worker("w2"), worker("w3")]);
    cluster.write_dataset();
    let w3 = cluster.container("w3");
    let broken = break_a_worker_mid_query(
        &cluster,
        "slow_double_immutable",
        &["kill", "--signal", "KILL", &w3],
    );
    assert_recovered(&broken);

    // A volatile UDF must not run twice: the query fails, naming the worker.
    docker_ok(&["start", &w3]);
    cluster.wait_ready("w3", 2);
    let broken =
        break_a_worker_mid_query(&cluster, "slow_double", &["kill", "--signal", "KILL", &w3]);
    assert_fails_with(
        &broken.run,
        "a query with a volatile UDF that lost w3",
        &[&w3, "not retried", "slow_double"],
    );
    assert!(broken.after_fault < Duration::from_secs(30));

    assert_sum_double(
        &cluster,
        &["w1", "w2", "w3"],
        "the next query, w3 listed but gone",
        &[],
    );
    docker_ok(&["start", &w3]);
    cluster.wait_ready("w3", 3);
    assert_sum_double(
        &cluster,
        &["w1", "w2", "w3"],
        "a query on the restarted worker",
        &[],
    );
}

#[test]
#[ignore = "needs the container images: run integration-tests/containers/run.sh"]
fn a_worker_cut_off_the_network_mid_query() {
    let cluster = Cluster::start("partition", vec![worker("w1"), worker("w2"), worker("w3")]);
    cluster.write_dataset();
    let w3 = cluster.container("w3");
    let broken = break_a_worker_mid_query(
        &cluster,
        "slow_double_immutable",
        &["network", "disconnect", &cluster.network, &w3],
    );
    assert_recovered(&broken);

    docker_ok(&["network", "connect", &cluster.network, &w3]);
    assert_sum_double(
        &cluster,
        &["w1", "w2", "w3"],
        "a query once the worker is reachable again",
        &[],
    );
}

/// `dfship sql --repeat-for` on the coordinator, in the background.
fn query_loop(cluster: &Cluster, workers: &str, seconds: u32) -> std::process::Child {
    let repeat_for = seconds.to_string();
    Command::new("docker")
        .args(["exec", &cluster.container("coordinator"), "dfship", "sql"])
        .args(["--workers", workers, "--udfs", "/udfs/basic.py"])
        .args(["--table", "facts=/data/facts", "--bytes-per-partition", "1"])
        .args(["--probe-interval", "0.5", "--repeat-for", &repeat_for])
        .arg(SUM_DOUBLE)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("docker exec runs")
}

#[test]
#[ignore = "needs the container images: run integration-tests/containers/run.sh"]
fn a_rolling_restart_under_load_fails_no_query_and_needs_no_retry() {
    let cluster = Cluster::start("roll", vec![worker("w1"), worker("w2"), worker("w3")]);
    cluster.write_dataset();
    let workers = cluster.urls(&["w1", "w2", "w3"]);
    let loops: Vec<_> = (0..4).map(|_| query_loop(&cluster, &workers, 60)).collect();
    std::thread::sleep(Duration::from_secs(5));
    for name in ["w1", "w2", "w3"] {
        let container = cluster.container(name);
        let stopping = Instant::now();
        // SIGTERM: the worker drains (finishes its queries) and exits 0.
        docker_ok(&["stop", "--time", "60", &container]);
        let code = docker_ok(&["inspect", "-f", "{{.State.ExitCode}}", &container]);
        println!("{name} drained in {:?}", stopping.elapsed());
        assert_eq!(code.trim(), "0", "a drained worker exits 0");
        docker_ok(&["start", &container]);
        cluster.wait_ready(name, 2);
        std::thread::sleep(Duration::from_secs(3));
    }
    let mut runs = 0;
    for child in loops {
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "a query loop failed:\n{stdout}\n{stderr}"
        );
        assert!(stdout.contains(SUM_DOUBLE_VALUE), "{stdout}");
        let timings: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("dfship-timing"))
            .collect();
        let digests: std::collections::HashSet<&str> = timings
            .iter()
            .filter_map(|l| l.split("result=").nth(1))
            .collect();
        assert_eq!(digests.len(), 1, "every answer is the same: {timings:?}");
        assert!(
            stderr.contains("dfship-retries") && stderr.contains("retries=0 "),
            "no query needed a retry:\n{stderr}"
        );
        runs += timings.len();
    }
    println!("{runs} queries during the rolling restart, none failed or retried");
    assert!(runs >= 40, "the loops kept querying: {runs} queries");
}

#[test]
#[ignore = "needs the container images: run integration-tests/containers/run.sh"]
fn workers_found_through_a_dns_name_that_scales() {
    let mut cluster = Cluster::start("dns", vec![worker("w1"), worker("w2"), worker("w3")]);
    cluster.write_dataset();
    let pool = format!("dns://{}:{PORT}", cluster.alias());
    let hosts = |cluster: &Cluster| -> usize {
        let run = cluster.sql_at(
            &pool,
            "basic.py",
            "SELECT count(DISTINCT whoami(id)) AS n FROM facts",
            &[],
        );
        assert_ok(&run, "a query on the workers DNS gives");
        let n = run
            .stdout
            .lines()
            .filter_map(|l| l.trim_matches(|c| c == '|' || c == ' ').parse().ok())
            .next();
        let n = n.unwrap_or_else(|| panic!("no count in {}", run.stdout));
        let explain = cluster.exec(
            &[
                "dfship",
                "explain",
                "--workers",
                &pool,
                "--udfs",
                "/udfs/basic.py",
                "--table",
                "facts=/data/facts",
                "--bytes-per-partition",
                "1",
                "SELECT count(DISTINCT whoami(id)) AS n FROM facts",
            ],
            Duration::from_secs(60),
        );
        println!(
            "{n} workers answered; the plan:\n{}\n{}",
            explain.stdout, explain.stderr
        );
        n
    };
    assert_eq!(hosts(&cluster), 3, "the 3 workers behind the name");
    cluster.start_worker(&worker("w4"));
    cluster.wait_ready("w4", 1);
    assert_eq!(hosts(&cluster), 4, "a worker that joined takes work");
    docker_ok(&["rm", "-f", &cluster.container("w3")]);
    docker_ok(&["rm", "-f", &cluster.container("w4")]);
    assert_eq!(hosts(&cluster), 2, "workers that left are not planned on");
    assert_sum_double(&cluster, &["w1", "w2"], "the sum on the 2 left", &[]);
}

#[test]
#[ignore = "needs the container images: run integration-tests/containers/run.sh"]
fn a_cluster_with_a_key() {
    let keyed = |name| WorkerSpec {
        name,
        image: NODE,
        command: &["dfship-worker"],
        args: vec!["--cluster-key-file", "/data/keys/cluster.key"],
        env: &[],
    };
    let cluster = Cluster::start("key", vec![keyed("w1"), keyed("w2"), keyed("w3")]);
    cluster.write_dataset();
    let all = ["w1", "w2", "w3"];
    let right = ["--cluster-key-file", "/data/keys/cluster.key"];
    let wrong = ["--cluster-key-file", "/data/keys/wrong.key"];

    assert_sum_double(
        &cluster,
        &all,
        "a query signed with the cluster key",
        &right,
    );

    // Aggregate and window UDFs reach keyed workers as signed frames; an
    // unkeyed coordinator is refused.
    let query = "SELECT category, py_spread(id) AS s, max(p) AS n FROM (SELECT id, category, \
                 py_position(id) OVER (PARTITION BY category ORDER BY id) AS p FROM facts) \
                 GROUP BY category ORDER BY category";
    let run = cluster.sql(&all, "aggregates.py", query, &right);
    assert_ok(&run, "aggregate and window UDFs with the key");
    assert!(
        run.stdout.contains("| cat_0    | 4796 | 1200 |"),
        "spread and position per category:\n{}",
        run.stdout
    );
    let unsigned = cluster.sql(&all, "aggregates.py", query, &[]);
    assert_fails_with(
        &unsigned,
        "aggregate and window UDFs without the key",
        &["requires the cluster key"],
    );

    let marker = cluster.data.join("drop/unpickled.marker");
    let query = "SELECT marker(id) FROM facts";
    // Every RPC is refused before anything is decoded, let alone unpickled.
    let forged = cluster.sql(&all, "unpickle_marker.py", query, &wrong);
    assert_fails_with(
        &forged,
        "a coordinator with the wrong key",
        &[
            "did not prove that it holds the cluster key",
            "nothing was sent to it",
        ],
    );
    let unsigned = cluster.sql(&all, "unpickle_marker.py", query, &[]);
    assert_fails_with(
        &unsigned,
        "a coordinator without a key",
        &["requires the cluster key"],
    );
    assert!(!exists(&marker), "no worker unpickled the refused payloads");

    // A client on the cluster network without the key runs no plan at all:
    // a scan returns nothing, and a plan that writes files writes none.
    let scan = cluster.sql(&all, "basic.py", "SELECT * FROM facts", &[]);
    assert_fails_with(
        &scan,
        "a scan without the key",
        &["requires the cluster key"],
    );
    assert!(
        !scan.stdout.contains("cat_"),
        "no rows came back:\n{}",
        scan.stdout
    );
    let write = cluster.sql(
        &all,
        "basic.py",
        "COPY (SELECT id, category FROM facts) TO '/tmp/exfiltrated/' STORED AS CSV",
        &[],
    );
    assert_fails_with(
        &write,
        "a write without the key",
        &["requires the cluster key"],
    );
    for worker in all {
        let listed = docker(&["exec", &cluster.container(worker), "ls", "/tmp/exfiltrated"]);
        assert!(
            !listed.status.success(),
            "worker {worker} wrote no file for an unauthenticated client"
        );
    }

    // A UDF hunting for the key in every ancestor's /proc files and in the
    // key file the worker's command line names finds nothing: root workers
    // run UDFs as nobody and are not dumpable, and the key file is root's
    // (mode 0600); its path on the command line leads nowhere.
    let hunt = cluster.sql(
        &all,
        "key_hunt.py",
        "SELECT DISTINCT hunt(id) AS h FROM facts",
        &right,
    );
    assert_ok(&hunt, "the key hunt");
    assert!(
        !hunt.stdout.contains("a shared secret for the cluster"),
        "a UDF found the key:\n{}",
        hunt.stdout
    );
    assert!(
        hunt.stdout.contains("uid=65534")
            && hunt
                .stdout
                .contains("/data/keys/cluster.key=PermissionError")
            && hunt.stdout.contains("/environ=PermissionError"),
        "UDFs ran as nobody and were refused the key file and the worker's environment:\n{}",
        hunt.stdout
    );

    // Control: signed with the right key, the payload is unpickled and runs its code.
    let _ = cluster.sql(&all, "unpickle_marker.py", query, &right);
    assert!(
        exists(&marker),
        "the control payload really creates the marker when unpickled"
    );
}

fn exists(path: &Path) -> bool {
    path.exists()
}

#[test]
#[ignore = "needs the container images: run integration-tests/containers/run.sh"]
fn a_cluster_with_mutual_tls() {
    let names: Vec<String> = ["w1", "w2", "w3"]
        .iter()
        .map(|w| format!("dfship-tls-{w}"))
        .collect();
    let mutual = |name| WorkerSpec {
        name,
        image: NODE,
        command: &["dfship-worker"],
        args: vec![
            "--tls-cert",
            "/data/tls/cert.pem",
            "--tls-key",
            "/data/tls/key.pem",
            "--tls-ca",
            "/data/tls/ca.pem",
        ],
        env: &[],
    };
    // One certificate, valid for every worker's name, signed by a fresh CA.
    let cluster = Cluster::start_with(
        "tls",
        vec![mutual("w1"), mutual("w2"), mutual("w3")],
        |data| {
            dfship_distributed::generate_tls_files(&data.join("tls"), &names)
                .expect("generate certificates");
        },
    );
    cluster.write_dataset();
    let https: Vec<String> = names
        .iter()
        .map(|n| format!("https://{n}:{PORT}"))
        .collect();
    let https = https.join(",");
    let run =
        |workers: &str, extra: &[&str]| cluster.sql_at(workers, "basic.py", SUM_DOUBLE, extra);
    let client_certificate = [
        "--tls-ca",
        "/data/tls/ca.pem",
        "--tls-cert",
        "/data/tls/cert.pem",
        "--tls-key",
        "/data/tls/key.pem",
    ];
    let ok = run(&https, &client_certificate);
    assert_ok(&ok, "a query over mutual TLS");
    assert!(ok.stdout.contains(SUM_DOUBLE_VALUE), "{}", ok.stdout);

    let plaintext = cluster.urls(&["w1", "w2", "w3"]);
    let refused = run(&plaintext, &[]);
    // The coordinator may reach any of the three first: the error names whichever it was.
    assert_fails_with(&refused, "a plaintext client", &["dfship-tls-w"]);
    let no_certificate = run(&https, &["--tls-ca", "/data/tls/ca.pem"]);
    assert!(
        !no_certificate.success,
        "a TLS client without a certificate is refused:\n{}",
        no_certificate.stdout
    );
    let no_tls = run(&https, &[]);
    assert_fails_with(&no_tls, "a client without TLS settings", &["--tls-ca"]);
}

/// `deploy/compose.yaml` brought up for real, with the deployment image.
struct Compose {
    project: String,
    key: PathBuf,
}

impl Compose {
    fn file() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/compose.yaml")
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("docker-compose")
            .arg("-p")
            .arg(&self.project)
            .arg("-f")
            .arg(Self::file())
            .args(args)
            .env("DFSHIP_IMAGE", NODE_PY313)
            .env("DFSHIP_CLUSTER_KEY_FILE", &self.key)
            .stdin(Stdio::null())
            .output()
            .expect("docker-compose runs (images.sh installs it)")
    }

    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "docker-compose {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The worker containers, with `health` (e.g. "healthy") if given.
    fn workers(&self, health: Option<&str>) -> Vec<String> {
        let project = format!("label=com.docker.compose.project={}", self.project);
        let mut args = vec![
            "ps",
            "-q",
            "--filter",
            &project,
            "--filter",
            "label=com.docker.compose.service=worker",
        ];
        let health = health.map(|h| format!("health={h}"));
        if let Some(health) = &health {
            args.extend(["--filter", health]);
        }
        docker_ok(&args).lines().map(str::to_string).collect()
    }

    /// Scales the workers to `n` and waits (90 s at most) until exactly `n` are healthy.
    fn scale(&self, n: usize) {
        self.ok(&[
            "up",
            "-d",
            "--no-recreate",
            "--scale",
            &format!("worker={n}"),
            "worker",
        ]);
        let deadline = Instant::now() + Duration::from_secs(90);
        while self.workers(Some("healthy")).len() != n || self.workers(None).len() != n {
            assert!(
                Instant::now() < deadline,
                "{n} healthy workers within 90 s: {} running, {} healthy\n{}",
                self.workers(None).len(),
                self.workers(Some("healthy")).len(),
                String::from_utf8_lossy(&self.run(&["logs", "--tail=20", "worker"]).stdout)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The demo queries from the coordinator service (compose names do not resolve on the host).
    fn demo(&self) -> String {
        self.ok(&[
            "run",
            "--rm",
            "-T",
            "coordinator",
            "--workers=dns://worker:8000",
            "--cluster-key-file=/run/secrets/cluster_key",
            "--data-dir=/var/lib/dfship/demo",
            "--rows=40000",
        ])
    }

    /// `udfs/key_hunt.py` on every row of the demo's trips, from a coordinator
    /// container (after [`Self::demo`] wrote them): what its runners found.
    fn hunt(&self) -> String {
        let udfs = format!("{}:/udfs:ro", here().join("udfs").display());
        // The image has `python -m dfship worker|demo`; the query runs
        // through the Python package, as a user's coordinator would.
        let script = "import runpy, dfship\n\
             hunt = runpy.run_path('/udfs/key_hunt.py')['hunt']\n\
             ctx = dfship.ClusterContext(['dns://worker:8000'], \
             cluster_key_file='/run/secrets/cluster_key', bytes_per_partition=1)\n\
             ctx.register_udf(hunt)\n\
             ctx.register_parquet('trips', '/var/lib/dfship/demo/trips')\n\
             for row in ctx.sql('SELECT DISTINCT hunt(trip_id) AS h FROM trips').collect().to_pylist():\n\
             \x20   print(row['h'])\n";
        self.ok(&[
            "run",
            "--rm",
            "-T",
            "-v",
            &udfs,
            "--entrypoint",
            "python3",
            "coordinator",
            "-c",
            script,
        ])
    }

    /// `dfship_udf_calls_total` of a worker container, from its /metrics.
    fn udf_calls(container: &str) -> f64 {
        let metrics = docker_ok(&[
            "exec",
            container,
            "python3",
            "-c",
            "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8080/metrics').read().decode())",
        ]);
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("dfship_udf_calls_total "))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_else(|| panic!("no dfship_udf_calls_total in:\n{metrics}"))
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        let _ = self.run(&["down", "-v", "--remove-orphans", "-t", "5"]);
    }
}

#[test]
#[ignore = "needs the container images: run integration-tests/containers/run.sh"]
fn the_compose_deployment_scales_between_queries() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/containers/runs/compose");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("cluster.key");
    std::fs::write(&key, format!("compose test key {:?}", Instant::now())).unwrap();
    // The image's user (10001) reads the key; as the compose file's comment says.
    use std::os::unix::fs::PermissionsExt;
    let mode = if std::os::unix::fs::chown(&key, Some(10001), Some(10001)).is_ok() {
        0o400
    } else {
        0o444
    };
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
    let compose = Compose {
        project: "dfship-compose-test".to_string(),
        key,
    };
    let _ = compose.run(&["down", "-v", "--remove-orphans", "-t", "1"]);

    compose.scale(2);
    let two = compose.demo();
    assert!(
        two.contains("5 queries ok; live workers 2"),
        "2 workers:\n{two}"
    );
    assert!(!two.contains("False"), "mean_fare equals avg:\n{two}");

    // The deployment image runs workers and UDFs as one unprivileged user
    // (10001), with no capability: a UDF hunting for the key in every
    // ancestor's /proc files and in the key file finds nothing (the worker
    // is not dumpable; Landlock closes the key file to its runners).
    let key_text = std::fs::read_to_string(&compose.key).unwrap();
    let hunt = compose.hunt();
    assert!(
        !hunt.contains(key_text.trim()),
        "a UDF found the key:\n{hunt}"
    );
    assert!(
        hunt.contains("uid=10001")
            && hunt.contains("/run/secrets/cluster_key=PermissionError")
            && hunt.contains("/environ=PermissionError"),
        "UDFs ran as the image's user and were refused the key file and the worker's \
         environment:\n{hunt}"
    );

    compose.scale(4);
    let four = compose.demo();
    assert!(
        four.contains("5 queries ok; live workers 4"),
        "4 workers:\n{four}"
    );
    let busy = compose
        .workers(None)
        .iter()
        .filter(|w| Compose::udf_calls(w) > 0.0)
        .count();
    assert!(busy >= 2, "UDF calls on {busy} of 4 workers");

    // Scaling down stops two workers with SIGTERM (they drain); the next
    // coordinator resolves the name to the two left.
    compose.scale(2);
    let back = compose.demo();
    assert!(
        back.contains("5 queries ok; live workers 2"),
        "back to 2 workers:\n{back}"
    );
    // Results do not depend on how many workers ran them.
    let results = |out: &str| -> Vec<String> {
        out.lines()
            .filter(|l| !l.contains(" rows in ") && !l.starts_with("demo:"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(results(&two), results(&four));
    assert_eq!(results(&two), results(&back));
}

/// The S3-compatible server of [`tables_and_results_on_s3_across_containers`]:
/// moto (in the bookworm image's venv) under the network alias `s3`.
const S3_ENDPOINT: &str = "http://s3:5000";
const S3_ENV: &[&str] = &[
    "AWS_ACCESS_KEY_ID=dfship-containers",
    "AWS_SECRET_ACCESS_KEY=a-secret-only-the-workers-and-coordinator-know",
    "AWS_REGION=us-east-1",
    "AWS_ENDPOINT_URL=http://s3:5000",
    "AWS_ALLOW_HTTP=true",
];

/// `dfship sql` on the coordinator with the facts table at `location`,
/// knowing the S3 server from explicit storage options, given in
/// `DFSHIP_STORAGE_OPTIONS` (a command line refuses the secret among them;
/// flags would override the variable whole).
fn sql_on(cluster: &Cluster, workers: &str, location: &str, query: &str) -> Run {
    let options: Vec<String> = S3_ENV
        .iter()
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap();
            let key = match name {
                "AWS_ENDPOINT_URL" => "aws_endpoint".to_string(),
                other => other.to_ascii_lowercase(),
            };
            format!("{key}={value}")
        })
        .collect();
    let variable = format!("DFSHIP_STORAGE_OPTIONS={}", options.join(","));
    cluster.sql_on_table(workers, "basic.py", location, query, &[], &[&variable])
}

#[test]
#[ignore = "needs the container images: run integration-tests/containers/run.sh"]
fn tables_and_results_on_s3_across_containers() {
    let on_s3 = |name| WorkerSpec {
        name,
        image: NODE,
        command: &["dfship-worker"],
        args: vec!["--insecure"],
        env: S3_ENV,
    };
    let mut cluster = Cluster::start("s3", vec![on_s3("w1"), on_s3("w2"), on_s3("w3")]);
    // The server runs in its own container: the host's loopback is out of
    // the containers' reach.
    let server = cluster.container("s3");
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &server,
        "--label",
        "dfship.test",
        "--network",
        &cluster.network,
        "--network-alias",
        "s3",
        NODE,
        "/opt/dfship/venv/bin/python",
        "-m",
        "moto.server",
        "-H",
        "0.0.0.0",
        "-p",
        "5000",
    ]);
    cluster.containers.push(server);
    cluster.write_dataset();
    // Upload the dataset (boto3 comes with moto in the image's venv),
    // waiting for the server to answer first.
    let upload = cluster.exec(
        &[
            "/opt/dfship/venv/bin/python",
            "-c",
            "import boto3, pathlib, sys, time\n\
             s3 = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1',\n\
                 aws_access_key_id='dfship-containers', aws_secret_access_key='x')\n\
             for _ in range(150):\n\
             \x20   try:\n\
             \x20       s3.create_bucket(Bucket='dfship'); break\n\
             \x20   except Exception:\n\
             \x20       time.sleep(0.2)\n\
             for path in sorted(pathlib.Path('/data/facts').glob('*.parquet')):\n\
             \x20   s3.upload_file(str(path), 'dfship', 'facts/' + path.name)\n\
             \x20   print('uploaded', path.name)\n",
            S3_ENDPOINT,
        ],
        Duration::from_secs(120),
    );
    assert_ok(&upload, "uploading the dataset to the S3 server");
    assert!(upload.stdout.contains("uploaded"), "{}", upload.stdout);

    let workers = cluster.urls(&["w1", "w2", "w3"]);
    let query = "SELECT category, sum(py_double(id)) AS s, count(*) AS c FROM facts \
                 GROUP BY category ORDER BY category";
    let local = sql_on(&cluster, &workers, "/data/facts", query);
    assert_ok(&local, "the query on the shared folder");
    let remote = sql_on(&cluster, &workers, "s3://dfship/facts/", query);
    assert_ok(&remote, "the query on s3://");
    assert_eq!(remote.stdout, local.stdout, "the same result from S3");
    assert!(local.stdout.contains("cat_0"), "{}", local.stdout);

    // Each worker read its part of the bucket with its own credentials.
    let readers = ["w1", "w2", "w3"]
        .iter()
        .filter(|w| {
            let logs = docker(&["logs", &cluster.container(w)]);
            let text = String::from_utf8_lossy(&logs.stderr).into_owned()
                + &String::from_utf8_lossy(&logs.stdout);
            text.lines()
                .any(|l| l.contains("object store ready") && l.contains("s3://dfship/"))
        })
        .count();
    assert!(readers >= 2, "the scan ran on {readers} of 3 workers");

    // A result written back to the bucket by COPY, then read from there.
    let copy = sql_on(
        &cluster,
        &workers,
        "s3://dfship/facts/",
        "COPY (SELECT id, py_double(id) AS d FROM facts WHERE id % 10 = 0) \
         TO 's3://dfship/out/doubled/' STORED AS PARQUET",
    );
    assert_ok(&copy, "COPY … TO s3://");
    let back = sql_on(
        &cluster,
        &workers,
        "s3://dfship/out/doubled/",
        "SELECT count(*) AS n, sum(d) AS s FROM facts",
    );
    assert_ok(&back, "reading the copied result from s3://");
    // ids 10, 20, ..., 4800: 480 rows, sum(2 * id) = 2 * 10 * (1 + ... + 480).
    assert!(
        back.stdout.contains("480") && back.stdout.contains("2308800"),
        "{}",
        back.stdout
    );
}
