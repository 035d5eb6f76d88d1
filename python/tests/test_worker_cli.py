"""``python -m dfship worker`` parses its command line with the worker's own
parser: the same flags, the same environment variables, the same errors;
its HTTP endpoint answers health and metrics."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pyarrow as pa
import pyarrow.compute as pc
from conftest import FILES, ROWS_PER_FILE

import dfship

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dfship", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_help_lists_every_worker_flag_and_its_environment_variable() -> None:
    done = _run("worker", "--help")
    assert done.returncode == 0, done.stderr
    for flag, variable in [
        ("--host", "DFSHIP_WORKER_HOST"),
        ("--port", "DFSHIP_WORKER_PORT"),
        ("--python-env", "DFSHIP_PYTHON_ENV"),
        ("--cluster-key-file", "DFSHIP_CLUSTER_KEY_FILE"),
        ("--strict", "DFSHIP_STRICT"),
        ("--max-payload-bytes", "DFSHIP_MAX_PAYLOAD_BYTES"),
        ("--warn-payload-bytes", "DFSHIP_WARN_PAYLOAD_BYTES"),
        ("--ffi-udf", "DFSHIP_FFI_UDFS"),
    ]:
        assert flag in done.stdout, flag
        assert variable in done.stdout, variable


def test_bad_flags_and_values_are_usage_errors() -> None:
    unknown = _run("worker", "--no-such-flag")
    assert unknown.returncode == 2
    assert "--no-such-flag" in unknown.stderr
    import os

    bad_bool = _run("worker", "--port", "0", env={**os.environ, "DFSHIP_STRICT": "maybe"})
    assert bad_bool.returncode == 2
    assert "maybe" in bad_bool.stderr


def test_unknown_command_and_no_command() -> None:
    assert _run("wroker").returncode == 2
    assert "worker" in _run().stdout


def test_health_readiness_and_metrics_of_a_worker(dataset: Path) -> None:
    """/livez, /readyz (503 once SIGTERM starts the drain) and /metrics
    counting the UDF calls this worker's runners made."""
    import urllib.error
    import urllib.request

    worker = subprocess.Popen(
        [sys.executable, "-m", "dfship", "worker", "--port", "0", "--http-port", "0", "--drain-notice", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert worker.stdout is not None
        url = worker.stdout.readline().split(" on ")[1].strip()
        http = worker.stdout.readline().split(" on ")[1].strip()

        def get(path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(http + path, timeout=5) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as error:
                return error.code, error.read().decode()

        assert get("/livez") == (200, "ok\n")
        assert get("/readyz") == (200, "ready\n")
        assert get("/nothing")[0] == 404
        # Unkeyed, like the worker started above.
        with dfship.LocalCluster(workers=1, key=False) as other:
            ctx = dfship.ClusterContext([url, other.urls[0]], bytes_per_partition=1)
            ctx.register_parquet("facts", dataset / "facts")
            ctx.register_udf(
                dfship.udf([pa.int64()], pa.int64(), "immutable", name="inc")(lambda v: pc.add(v, 1))
            )
            assert ctx.sql("SELECT sum(inc(id)) AS s FROM facts").collect().num_rows == 1
        status, metrics = get("/metrics")
        assert status == 200
        values = {
            line.split()[0]: float(line.split()[1])
            for line in metrics.splitlines()
            if line and line[0] != "#"
        }
        assert values["dfship_udf_calls_total"] >= 1, metrics
        assert values["dfship_runners_alive"] >= 1, metrics
        assert values["dfship_worker_draining"] == 0
        # Per-UDF figures: this worker ran some of `inc`'s rows, none failed.
        assert 0 < values['dfship_udf_rows_total{udf="inc"}'] <= FILES * ROWS_PER_FILE, metrics
        assert values['dfship_udf_batch_calls_total{udf="inc"}'] >= 1, metrics
        assert values['dfship_udf_seconds_total{udf="inc"}'] > 0, metrics
        assert values['dfship_udf_failures_total{udf="inc"}'] == 0, metrics
        assert values["dfship_rpcs_refused_total"] == 0, metrics
        assert values["dfship_worker_tasks_total"] >= 1, metrics
        # The pickle of `inc` is kept for later plans that name it by digest.
        assert values["dfship_payload_store_bytes"] > 0, metrics
        worker.terminate()  # SIGTERM: drain
        deadline = time.monotonic() + 2
        while get("/readyz")[0] != 503:
            assert time.monotonic() < deadline, "readiness did not turn 503 while draining"
            time.sleep(0.05)
        assert get("/readyz") == (503, "draining\n")
        assert get("/livez")[0] == 200
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()


def test_json_logs_name_the_query_of_each_request(dataset: Path) -> None:
    """``--log-format json``: every stderr line is a JSON object, and the
    lines a query's requests log carry its id in their span."""
    import json
    import os

    env = {**os.environ, "RUST_LOG": "info,dfship_distributed=debug"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "dfship", "worker", "--port", "0", "--http-port", "0", "--log-format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert worker.stdout is not None
        url = worker.stdout.readline().split(" on ")[1].strip()
        http = worker.stdout.readline().split(" on ")[1].strip()
        # Unkeyed, like the worker started above.
        with dfship.LocalCluster(workers=1, key=False) as other:
            ctx = dfship.ClusterContext([url, other.urls[0]], bytes_per_partition=1)
            ctx.register_parquet("facts", dataset / "facts")
            ctx.register_udf(
                dfship.udf([pa.int64()], pa.int64(), "immutable", name="inc")(lambda v: pc.add(v, 1))
            )
            query = "SELECT category, sum(inc(id)) AS s FROM facts GROUP BY category"
            assert ctx.sql(query).collect().num_rows == 4
        import urllib.request

        with urllib.request.urlopen(http + "/metrics", timeout=5) as response:
            metrics = response.read().decode()
        # The GROUP BY's final stage read the partial aggregates of both workers.
        received = next(
            line for line in metrics.splitlines() if line.startswith("dfship_received_bytes_total")
        )
        assert float(received.split()[1]) > 0, metrics
    finally:
        worker.send_signal(2)
        _, stderr = worker.communicate(timeout=30)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines
    records = [json.loads(line) for line in lines]  # every line parses
    assert all({"timestamp", "level", "fields"} <= set(r) for r in records)
    queries = {
        span["query_id"]
        for r in records
        for span in r.get("spans", [])
        if span.get("name") == "query" and "query_id" in span
    }
    assert len(queries) == 1, records[:5]
    assert any(r["fields"].get("message") == "worker started" for r in records)
