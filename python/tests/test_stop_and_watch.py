"""A query you can stop and watch, on one cluster of 2 worker processes x 2
runners: Ctrl-C (SIGINT to a client process), ``timeout=`` and
``query_timeout`` stop the query on every worker (each UDF call records its
start, its worker's pid and its end to a file, so "no new call" is counted,
not assumed); an async UDF's coroutines are cancelled; what UDFs print, log
and warn reaches the client labelled with its worker and UDF, and the
workers' logs; ``udf_output`` ``worker``/``off`` keep it from the client; a
UDF printing a million lines is bounded everywhere (lines, bytes, each
process's peak memory)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import counting_parquet

import dfship

cloudpickle.register_pickle_by_value(sys.modules[__name__])

FILES = 8
ROWS = 512
SLICE_SECONDS = 0.25


@pytest.fixture(scope="module")
def cluster() -> Iterator[dfship.LocalCluster]:
    with dfship.LocalCluster(workers=2, worker_args=["--python-runners", "2"]) as running:
        yield running


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return counting_parquet(tmp_path_factory.mktemp("stop-and-watch"), FILES, ROWS, column="x")


@pytest.fixture
def calls(tmp_path: Path) -> Path:
    """A file each UDF call appends a line to; open to runners of any user."""
    folder = tmp_path / "calls"
    folder.mkdir()
    folder.chmod(0o777)
    return folder / "calls.log"


# The client scripts and the test share these UDF sources.
SLOW = """
import os, time
import pyarrow as pa, pyarrow.compute as pc
import dfship

def make_slow(calls, seconds):
    @dfship.udf([pa.int64()], pa.int64(), "immutable", name="slow", batch_size=16)
    def slow(x):
        with open(calls, "a") as out:
            out.write(f"start {time.time()} {os.getppid()}\\n")
        time.sleep(seconds)
        with open(calls, "a") as out:
            out.write(f"end {time.time()} {os.getppid()}\\n")
        return pc.multiply(x, 2)
    return slow
"""

namespace: dict[str, Any] = {"__name__": __name__}
exec(compile(SLOW, "<slow>", "exec"), namespace)  # noqa: S102 - the test's own UDF source
make_slow = namespace["make_slow"]


def starts(calls: Path) -> list[tuple[float, int]]:
    """(time, worker pid) of every call that started."""
    if not calls.exists():
        return []
    found = []
    for line in calls.read_text().splitlines():
        kind, at, pid = line.split()
        if kind == "start":
            found.append((float(at), int(pid)))
    return found


def wait_for_calls(calls: Path, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while len(starts(calls)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} UDF calls started in {timeout} s"
        time.sleep(0.05)


def assert_stopped_everywhere(calls: Path, stopped_at: float, cluster: dfship.LocalCluster) -> float:
    """No call started 2 s or more after ``stopped_at`` (checked 3 s after it);
    returns the time from ``stopped_at`` to the last call's start."""
    time.sleep(max(0.0, stopped_at + 3.0 - time.time()))
    started = starts(calls)
    late = [at - stopped_at for at, _ in started if at >= stopped_at + 2.0]
    assert not late, f"UDF calls started {late} s after the query was stopped"
    workers = {pid for _, pid in started}
    assert set(cluster.pids) <= workers, (workers, cluster.pids)
    return max(at for at, _ in started) - stopped_at


def quick_query_seconds(cluster: dfship.LocalCluster, data: Path) -> float:
    """A small UDF query on the same workers: how long it takes."""
    ctx = cluster.context(bytes_per_partition=1)
    ctx.register_parquet("t", data)
    ctx.register_udf(dfship.udf([pa.int64()], pa.int64(), "immutable", name="inc")(lambda x: pc.add(x, 1)))
    started = time.perf_counter()
    total = ctx.sql("SELECT sum(inc(x)) AS s FROM t").collect().to_pylist()[0]["s"]
    assert total == sum(range(FILES * ROWS)) + FILES * ROWS
    return time.perf_counter() - started


CLIENT = (
    SLOW
    + """
import sys, time
workers, key_file, data, calls = sys.argv[1:5]
ctx = dfship.ClusterContext(workers.split(","), cluster_key_file=key_file, bytes_per_partition=1)
ctx.register_udf(make_slow(calls, %(seconds)r))
ctx.register_parquet("t", data)
df = ctx.sql("SELECT sum(slow(x)) AS s FROM t")
print("RUNNING", flush=True)
try:
    df.collect()
except KeyboardInterrupt:
    print("INTERRUPTED", time.time(), flush=True)
    sys.exit(3)
print("FINISHED", flush=True)
"""
)


def test_ctrl_c_stops_the_query_on_every_worker_within_a_second(
    cluster: dfship.LocalCluster, data: Path, calls: Path, tmp_path: Path
) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT % {"seconds": SLICE_SECONDS})
    client = subprocess.Popen(
        [
            sys.executable,
            str(script),
            ",".join(cluster.urls),
            str(cluster.key_file),
            str(data),
            str(calls),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Calls under way on both workers before Ctrl-C.
        wait_for_calls(calls, 8)
        sent = time.time()
        client.send_signal(signal.SIGINT)
        out, err = client.communicate(timeout=30)
    finally:
        client.kill()
    assert client.returncode == 3, (out, err)
    interrupted = float(re.search(r"INTERRUPTED (\S+)", out).group(1))  # type: ignore[union-attr]
    to_interrupt = interrupted - sent
    assert to_interrupt < 1.0, f"KeyboardInterrupt came {to_interrupt:.2f} s after SIGINT"
    last_call = assert_stopped_everywhere(calls, sent, cluster)
    # The slow query's work is gone from the runners: a new query runs at once.
    quick = quick_query_seconds(cluster, data)
    assert quick < 5.0, f"the next query took {quick:.1f} s"
    print(
        f"SIGINT -> KeyboardInterrupt {to_interrupt:.3f} s; "
        f"last UDF call started {last_call:+.3f} s; next query {quick:.2f} s"
    )


@pytest.mark.parametrize("how", ["timeout", "query_timeout"])
def test_a_timeout_stops_the_query_on_every_worker(
    cluster: dfship.LocalCluster, data: Path, calls: Path, how: str
) -> None:
    limit = 1.5
    ctx = cluster.context(
        bytes_per_partition=1, **({"query_timeout": limit} if how == "query_timeout" else {})
    )
    ctx.register_udf(make_slow(str(calls), SLICE_SECONDS))
    ctx.register_parquet("t", data)
    df = ctx.sql("SELECT sum(slow(x)) AS s FROM t")
    started = time.time()
    with pytest.raises(
        dfship.QueryTimeoutError, match=r"\[query-timeout\].*1.5 s.*cancelled on every worker"
    ):
        df.collect(**({"timeout": limit} if how == "timeout" else {}))
    failed = time.time()
    assert limit <= failed - started < limit + 1.0, failed - started
    assert starts(calls), "the query ran UDF calls before it timed out"
    assert_stopped_everywhere(calls, failed, cluster)
    assert quick_query_seconds(cluster, data) < 5.0
    # A bad timeout is refused before anything runs.
    with pytest.raises(dfship.PlanningError, match="positive number of seconds"):
        df.collect(timeout=-1)


def test_an_async_udf_s_coroutines_are_cancelled(
    cluster: dfship.LocalCluster, data: Path, calls: Path
) -> None:
    record = str(calls)

    async def waits(x: pa.Array) -> pa.Array:
        import asyncio
        import uuid

        me = uuid.uuid4().hex
        with open(record, "a") as out:
            out.write(f"started {me} {os.getppid()}\n")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            with open(record, "a") as out:
                out.write(f"cancelled {me} {os.getppid()}\n")
            raise
        return x

    udf = dfship.udf([pa.int64()], pa.int64(), "immutable", name="waits")(waits)
    ctx = cluster.context(bytes_per_partition=1)
    ctx.register_udf(udf)
    ctx.register_parquet("t", data)

    def seen(kind: str) -> dict[str, int]:
        lines = calls.read_text().splitlines() if calls.exists() else []
        return {line.split()[1]: int(line.split()[2]) for line in lines if line.startswith(kind)}

    with pytest.raises(dfship.QueryTimeoutError):
        ctx.sql("SELECT sum(waits(x)) AS s FROM t").collect(timeout=5.0)
    started = seen("started")
    assert set(started.values()) == set(cluster.pids), f"coroutines ran under {started}, not {cluster.pids}"
    deadline = time.monotonic() + 10
    while set(seen("cancelled")) != set(started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert seen("cancelled") == started, "every coroutine that started got CancelledError"


def noisy_udf() -> dfship.PythonUDF:
    def noisy(x: pa.Array) -> pa.Array:
        import logging
        import warnings

        print(f"noisy saw {len(x)} rows from {x[0]}")
        print("to stderr", file=sys.stderr)
        logging.getLogger("noisy.log").warning("a record about %d rows", len(x))
        warnings.warn("careful with these rows", stacklevel=1)
        return pc.multiply(x, 2)

    return dfship.udf([pa.int64()], pa.int64(), "immutable", name="noisy")(noisy)


def test_what_udfs_print_log_and_warn_reaches_the_client_and_the_worker_logs(
    cluster: dfship.LocalCluster, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ctx = cluster.context(bytes_per_partition=1)
    ctx.register_udf(noisy_udf())
    ctx.register_parquet("t", data)
    df = ctx.sql("SELECT sum(noisy(x)) AS s FROM t")
    received: list[dict[str, Any]] = []
    assert df.collect(on_output=received.append).to_pylist() == [{"s": 2 * sum(range(FILES * ROWS))}]
    assert received == df.udf_output()
    ports = {url.rsplit(":", 1)[1] for url in cluster.urls}
    by_worker = {line["worker"].rsplit(":", 1)[1] for line in received}
    assert by_worker == ports, received
    assert {line["udf"] for line in received} == {"noisy"}
    streams = {line["stream"] for line in received}
    assert {"stdout", "stderr", "logging", "warning"} <= streams, streams
    texts = [line["text"] for line in received]
    assert any(re.fullmatch(r"noisy saw \d+ rows from \d+", t) for t in texts), texts
    assert any(t.startswith("WARNING noisy.log: a record about") for t in texts), texts
    assert any(t.endswith("UserWarning: careful with these rows") for t in texts), texts
    assert all(line["stage"] is not None and line["task"] is not None for line in received)
    # Every file's first value was seen by exactly one call.
    seen = sorted(int(m.group(1)) for t in texts if (m := re.search(r"from (\d+)$", t)))
    assert {v // ROWS for v in seen} == set(range(FILES)), seen
    # The workers' logs have them too, with the query they belong to.
    for index in range(2):
        logs = "\n".join(cluster.logs(index))
        assert re.search(r"noisy saw \d+ rows", logs), logs[-2000:]
        assert "query_id" in logs
    # Without on_output, lines go to sys.stderr with their UDF and worker.
    capsys.readouterr()
    df.collect()
    err = capsys.readouterr().err
    for port in ports:
        assert re.search(rf"\(noisy, 127\.0\.0\.1:{port}\) noisy saw \d+ rows", err), err


@pytest.mark.parametrize("mode", ["worker", "off"])
def test_udf_output_worker_or_off_shows_nothing_on_the_client(
    cluster: dfship.LocalCluster, data: Path, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    marker = f"quiet-{mode}-{time.time()}"

    def quiet(x: pa.Array) -> pa.Array:
        print(marker)
        return x

    ctx = cluster.context(bytes_per_partition=1, udf_output=mode)
    ctx.register_udf(dfship.udf([pa.int64()], pa.int64(), "immutable", name="quiet")(quiet))
    ctx.register_parquet("t", data)
    capsys.readouterr()
    received: list[dict[str, Any]] = []
    df = ctx.sql("SELECT sum(quiet(x)) AS s FROM t")
    df.collect(on_output=received.append)
    assert received == [] and df.udf_output() == []
    assert marker not in capsys.readouterr().err
    logged = any(marker in line for index in range(2) for line in cluster.logs(index))
    assert logged == (mode == "worker")


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def processes(cluster: dfship.LocalCluster) -> dict[int, str]:
    """Each worker and each of its runners, by pid."""
    found = {pid: "worker" for pid in cluster.pids}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = next(
                    int(line.split()[1])
                    for line in (entry / "status").read_text().splitlines()
                    if line.startswith("PPid:")
                )
            except (OSError, StopIteration):
                continue
            if ppid in cluster.pids:
                found[int(entry.name)] = "runner"
    return found


def test_a_million_lines_are_capped_and_memory_stays_bounded(
    cluster: dfship.LocalCluster, data: Path
) -> None:
    total = 1_000_000
    per_call = total // FILES

    def chatty(x: pa.Array) -> pa.Array:
        for i in range(per_call):
            print(f"line {i} of a chatty call")
        return x

    def silent(x: pa.Array) -> pa.Array:
        return x

    ctx = cluster.context(bytes_per_partition=1, udf_output_max_lines=2000)
    ctx.register_parquet("t", data)
    ctx.register_udf(dfship.udf([pa.int64()], pa.int64(), "immutable", name="chatty")(chatty))
    ctx.register_udf(dfship.udf([pa.int64()], pa.int64(), "immutable", name="silent")(silent))
    # One call per file: each prints its share of the million lines.
    ctx.sql("SELECT sum(silent(x)) AS s FROM t").collect()
    before = {pid: peak_rss_kib(pid) for pid in processes(cluster)}
    client_before = peak_rss_kib(os.getpid())
    received: list[dict[str, Any]] = []
    started = time.perf_counter()
    result = ctx.sql("SELECT sum(chatty(x)) AS s FROM t").collect(on_output=received.append)
    seconds = time.perf_counter() - started
    assert result.to_pylist() == [{"s": sum(range(FILES * ROWS))}]
    lines = [line for line in received if line["stream"] != "dropped"]
    dropped = [line for line in received if line["stream"] == "dropped"]
    assert len(lines) <= 2000, len(lines)
    assert len(dropped) == 1, dropped
    count = int(re.search(r"dropped (\d+) lines", dropped[0]["text"]).group(1))  # type: ignore[union-attr]
    assert count + len(lines) == total, (count, len(lines))
    assert received[-1] is dropped[0], "the dropped line comes last"
    growth = {}
    for pid, role in processes(cluster).items():
        grown = peak_rss_kib(pid) - before.get(pid, 0)
        growth[f"{role} {pid}"] = grown
    growth["client"] = peak_rss_kib(os.getpid()) - client_before
    # Kept whole, a million lines would be ~100 MB in a runner and a worker.
    assert all(kib < 48 * 1024 for kib in growth.values()), growth
    print(f"a million lines in {seconds:.2f} s; peak RSS growth (KiB): {growth}")


def test_ctrl_c_during_output_and_progress_in_a_script(
    cluster: dfship.LocalCluster, data: Path, tmp_path: Path
) -> None:
    """``progress=True`` off a terminal draws nothing and does not get in the way."""
    script = tmp_path / "progress.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import pyarrow as pa, pyarrow.compute as pc
            import dfship
            workers, key_file, data = sys.argv[1:4]
            ctx = dfship.ClusterContext(workers.split(","), cluster_key_file=key_file, bytes_per_partition=1)
            ctx.register_udf(dfship.udf([pa.int64()], pa.int64(), "immutable", name="hi")(
                lambda x: (print("hi from a UDF"), x)[1]))
            ctx.register_parquet("t", data)
            print(ctx.sql("SELECT sum(hi(x)) AS s FROM t").collect(progress=True).to_pylist())
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script), ",".join(cluster.urls), str(cluster.key_file), str(data)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str([{"s": sum(range(FILES * ROWS))}])
    assert re.search(r"\(hi, 127\.0\.0\.1:\d+\) hi from a UDF", done.stderr), done.stderr
    assert "\r[" not in done.stderr, "no terminal bar off a terminal"
