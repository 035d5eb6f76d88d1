"""A query survives a lost worker: on a cluster of 3 worker processes, a
worker killed with SIGKILL while it runs its share of a query (shuffle
stages included) is left out, the query is planned again on the 2 left and
gives the right answer; the next query runs on the 2 alone; the worker
restarted on its port is planned on again. Runners that crash are replayed
once (immutable UDFs only). Every check counts real processes (the worker
each UDF batch ran under) or compares with answers computed by pyarrow."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import dfship

cloudpickle.register_pickle_by_value(sys.modules[__name__])

FILES = 9
ROWS = 4 * 8192


@pytest.fixture(scope="module")
def cluster() -> Iterator[dfship.LocalCluster]:
    with dfship.LocalCluster(workers=3, worker_args=["--python-runners", "1"]) as running:
        yield running


@pytest.fixture(scope="module")
def numbers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("numbers")
    for part in range(FILES):
        ids = pa.array(range(part * ROWS, (part + 1) * ROWS), pa.int64())
        table = pa.table({"id": ids, "g": pc.bit_wise_and(ids, 15), "v": pc.bit_wise_and(ids, 1023)})
        pq.write_table(table, root / f"part-{part}.parquet", row_group_size=8192)
    return root


@pytest.fixture
def marks(tmp_path: Path) -> Path:
    """A folder where each UDF batch leaves a file named by the pid of the
    worker (or coordinator) whose runner ran it."""
    folder = tmp_path / "marks"
    folder.mkdir()
    return folder


@pytest.fixture(autouse=True)
def every_worker_back(cluster: dfship.LocalCluster) -> Iterator[None]:
    yield
    for index, process in enumerate(cluster._processes):
        if process.poll() is not None:
            cluster.restart(index)


def expected(numbers: Path) -> list[dict[str, Any]]:
    table = pq.read_table(numbers)
    table = table.append_column("w", pc.multiply(table["v"], 2))
    grouped = table.group_by("g").aggregate([("w", "sum"), ("id", "count")])
    rows = [{"g": r["g"], "s": r["w_sum"], "c": r["id_count"]} for r in grouped.to_pylist()]
    return sorted(rows, key=lambda r: r["g"])


QUERY = """
SELECT a.g AS g, sum(a.w) AS s, count(*) AS c
FROM (SELECT g, id, tagged(v) AS w FROM numbers) a JOIN numbers b ON a.id = b.id
GROUP BY a.g ORDER BY a.g
"""


def tagged_udf(marks: Path, delay: float, volatility: str = "immutable") -> dfship.PythonUDF:
    folder = str(marks)

    def tagged(v: pa.Array) -> pa.Array:
        time.sleep(delay)
        with open(os.path.join(folder, str(os.getppid())), "a") as out:
            out.write(f"{len(v)}\n")
        return pc.multiply(v, 2)

    return dfship.udf([pa.int64()], pa.int64(), volatility, name="tagged")(tagged)


def context(cluster: dfship.LocalCluster, numbers: Path, udf: Any, **options: Any) -> Any:
    """A context whose first probe round is done and found every worker live
    (so a query started next is planned on all three)."""
    ctx = cluster.context(bytes_per_partition=1, **options)
    ctx.register_parquet("numbers", numbers)
    ctx.register_udf(udf)
    ctx.sql("SELECT count(*) FROM numbers").collect()
    assert all(state == "live" for _, state, _ in ctx.workers_status()), ctx.workers_status()
    return ctx


def ran_on(marks: Path) -> set[int]:
    return {int(p.name) for p in marks.iterdir()}


def wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_worker_killed_mid_query_is_left_out_and_taken_back(
    cluster: dfship.LocalCluster, numbers: Path, marks: Path
) -> None:
    ctx = context(cluster, numbers, tagged_udf(marks, 0.15), probe_interval=0.5)
    victim = cluster.pids[1]
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["rows"] = ctx.sql(QUERY).collect().to_pylist()
        except Exception as error:  # reported below
            result["error"] = error

    query = threading.Thread(target=run)
    query.start()
    # The victim has run UDF batches of this query (it holds scan and
    # shuffle tasks of every stage) when it is killed.
    wait_for(lambda: victim in ran_on(marks), "the victim to run a UDF batch")
    cluster.kill(1)
    query.join(timeout=180)
    assert "error" not in result, result.get("error")
    assert result["rows"] == expected(numbers)
    assert ctx.retry_stats()["retries"] >= 1
    status = {url: state for url, state, _ in ctx.workers_status()}
    assert status[cluster.urls[1]] == "down"

    # The next query runs on the 2 left, without retrying.
    retries = ctx.retry_stats()["retries"]
    for mark in marks.iterdir():
        mark.unlink()
    assert ctx.sql(QUERY).collect().to_pylist() == expected(numbers)
    assert ctx.retry_stats()["retries"] == retries
    workers = set(cluster.pids)
    assert ran_on(marks) & workers == {cluster.pids[0], cluster.pids[2]}

    # Restarted on its port, it answers a probe and is planned on again.
    cluster.restart(1)
    wait_for(
        lambda: all(state == "live" for _, state, _ in ctx.workers_status()),
        "the restarted worker to be taken back",
    )
    for mark in marks.iterdir():
        mark.unlink()
    assert ctx.sql(QUERY).collect().to_pylist() == expected(numbers)
    assert ran_on(marks) & set(cluster.pids) == set(cluster.pids)
    assert ctx.retry_stats()["retries"] == retries


def test_without_retries_a_lost_worker_fails_the_query_naming_it(
    cluster: dfship.LocalCluster, numbers: Path, marks: Path
) -> None:
    ctx = context(cluster, numbers, tagged_udf(marks, 0.0), max_attempts=1, probe_interval=3600)
    assert ctx.sql(QUERY).collect().to_pylist() == expected(numbers)
    cluster.kill(2)  # after the first probe round: found only by the query
    with pytest.raises(dfship.WorkerLostError, match=cluster.urls[2].removeprefix("http://")):
        ctx.sql(QUERY).collect()
    assert ctx.retry_stats() == {"queries": 3, "retries": 0, "exhausted": 0}


def test_after_a_worker_restarts_the_first_query_runs_on_it_without_a_retry(
    cluster: dfship.LocalCluster, numbers: Path, marks: Path
) -> None:
    """A query that failed because a worker was down leaves nothing behind
    in the other workers' connections to it: tonic used to keep the error
    of a reconnect attempt made for a cancelled request and hand it to the
    next request, failing the first query after the worker came back (a
    volatile UDF cannot be retried). Three rounds, every worker used."""
    udf = tagged_udf(marks, 0.0, "volatile")
    for _ in range(3):
        failing = context(cluster, numbers, udf, max_attempts=1, probe_interval=3600)
        cluster.kill(2)  # the probes do not run: the query plans on it
        with pytest.raises(dfship.WorkerLostError):
            failing.sql(QUERY).collect()
        cluster.restart(2)
        for mark in marks.iterdir():
            mark.unlink()
        # A new session (its first probe round finds every worker live).
        ctx = context(cluster, numbers, udf, max_attempts=1, probe_interval=3600)
        assert ctx.sql(QUERY).collect().to_pylist() == expected(numbers)
        assert ran_on(marks) & set(cluster.pids) == set(cluster.pids)
        assert ctx.retry_stats()["retries"] == 0


def test_a_volatile_udf_is_not_run_twice(cluster: dfship.LocalCluster, numbers: Path, marks: Path) -> None:
    ctx = context(cluster, numbers, tagged_udf(marks, 0.15, "volatile"), probe_interval=3600)
    victim = cluster.pids[0]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            ctx.sql(QUERY).collect()
        except dfship.DfshipError as error:
            errors.append(error)

    query = threading.Thread(target=run)
    query.start()
    wait_for(lambda: victim in ran_on(marks) or not query.is_alive(), "the victim to run a UDF batch")
    logs = "\n".join(f"worker {i}: {line}" for i in range(3) for line in cluster.logs(i)[-15:])
    assert victim in ran_on(marks), f"the query ended before the victim ran a batch: {errors}\n{logs}"
    cluster.kill(0)
    query.join(timeout=180)
    assert len(errors) == 1, "the query must fail, not be retried"
    assert isinstance(errors[0], dfship.WorkerLostError)
    assert "not retried" in str(errors[0]) and "tagged" in str(errors[0]), errors[0]
    assert ctx.retry_stats()["retries"] == 0


def test_when_every_attempt_finds_no_worker_the_error_lists_each(
    cluster: dfship.LocalCluster, numbers: Path, marks: Path
) -> None:
    ctx = context(cluster, numbers, tagged_udf(marks, 0.0), max_attempts=3, probe_interval=0.2)
    assert ctx.sql(QUERY).collect().to_pylist() == expected(numbers)  # probes start
    for index in range(3):
        cluster.kill(index)
    wait_for(
        lambda: all(state == "down" for _, state, _ in ctx.workers_status()),
        "the probes to find every worker down",
    )
    with pytest.raises(dfship.WorkerLostError) as failure:
        ctx.sql(QUERY).collect()
    text = str(failure.value)
    assert "each of its 3 attempts" in text, text
    for attempt in (1, 2, 3):
        assert f"attempt {attempt}: " in text, text
    for url in cluster.urls:
        assert url in text, text
    assert ctx.retry_stats() == {"queries": 3, "retries": 2, "exhausted": 1}


def test_copy_that_loses_a_worker_writes_its_files_once(
    cluster: dfship.LocalCluster, numbers: Path, marks: Path, tmp_path: Path
) -> None:
    ctx = context(cluster, numbers, tagged_udf(marks, 0.15), probe_interval=0.5)
    out = tmp_path / "out"
    victim = cluster.pids[2]
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            ctx.sql(f"COPY ({QUERY}) TO '{out}/' STORED AS PARQUET").collect()
            result["done"] = True
        except Exception as error:
            result["error"] = error

    query = threading.Thread(target=run)
    query.start()
    wait_for(lambda: victim in ran_on(marks), "the victim to run a UDF batch")
    cluster.kill(2)
    query.join(timeout=180)
    assert "error" not in result, result.get("error")
    assert ctx.retry_stats()["retries"] >= 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dfship-staging")]
    written = pq.read_table(out).to_pylist()
    assert sorted(written, key=lambda r: r["g"]) == expected(numbers)


def test_a_copy_that_fails_leaves_no_output(
    cluster: dfship.LocalCluster, numbers: Path, marks: Path, tmp_path: Path
) -> None:
    def boom(v: pa.Array) -> pa.Array:
        if pc.max(v).as_py() > 1000:
            raise ValueError("late failure")
        return v

    ctx = context(cluster, numbers, tagged_udf(marks, 0.0))
    ctx.register_udf(dfship.udf([pa.int64()], pa.int64(), "immutable", name="boom")(boom))
    out = tmp_path / "out.parquet"
    with pytest.raises(dfship.UdfRaisedError, match="late failure"):
        ctx.sql(f"COPY (SELECT id, boom(v) AS b FROM numbers) TO '{out}' STORED AS PARQUET").collect()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marks"]


def test_a_runner_that_crashes_once_is_replayed_and_one_that_always_crashes_is_named(
    cluster: dfship.LocalCluster, numbers: Path, tmp_path: Path
) -> None:
    flag = str(tmp_path / "crashed-once")

    def crash_once(v: pa.Array) -> pa.Array:
        try:
            os.close(os.open(flag, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return pc.add(v, 1)
        os.kill(os.getpid(), signal.SIGSEGV)
        raise AssertionError("unreachable")

    def crash_always(v: pa.Array) -> pa.Array:
        os.kill(os.getpid(), signal.SIGSEGV)
        raise AssertionError("unreachable")

    ctx = cluster.context()
    ctx.register_parquet("numbers", numbers)
    ctx.register_udf(dfship.udf([pa.int64()], pa.int64(), "immutable", name="crash_once")(crash_once))
    ctx.register_udf(dfship.udf([pa.int64()], pa.int64(), "immutable", name="crash_always")(crash_always))
    ctx.register_udf(dfship.udf([pa.int64()], pa.int64(), "volatile", name="crash_volatile")(crash_always))
    total = pc.sum(pq.read_table(numbers)["v"]).as_py() + FILES * ROWS
    assert ctx.sql("SELECT sum(crash_once(v)) AS s FROM numbers").collect().to_pylist() == [{"s": total}]
    assert os.path.exists(flag)

    with pytest.raises(dfship.DfshipError) as always:
        ctx.sql("SELECT sum(crash_always(v)) AS s FROM numbers").collect()
    text = str(always.value)
    assert "crash_always" in text and "replayed once" in text, text
    assert text.count("SIGSEGV") >= 2, text

    with pytest.raises(dfship.DfshipError) as volatile:
        ctx.sql("SELECT sum(crash_volatile(v)) AS s FROM numbers").collect()
    text = str(volatile.value)
    assert "crash_volatile" in text and "not replayed" in text, text


def test_a_rolling_restart_under_load_fails_no_query_and_needs_no_retry(
    cluster: dfship.LocalCluster, numbers: Path, marks: Path
) -> None:
    ctx = context(cluster, numbers, tagged_udf(marks, 0.02), probe_interval=0.5)
    want = expected(numbers)
    stop = threading.Event()
    answers: list[bool] = []
    failures: list[BaseException] = []

    def loop() -> None:
        while not stop.is_set():
            try:
                answers.append(ctx.sql(QUERY).collect().to_pylist() == want)
            except Exception as error:
                failures.append(error)

    loops = [threading.Thread(target=loop) for _ in range(2)]
    for thread in loops:
        thread.start()
    try:
        for index in range(3):
            time.sleep(1.0)
            old = cluster.pids[index]
            assert cluster.drain(index) == 0, "a drained worker exits 0"
            cluster.restart(index)
            assert cluster.pids[index] != old
            wait_for(
                lambda: all(state == "live" for _, state, _ in ctx.workers_status()),
                f"worker {index} to be taken back",
            )
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in loops:
            thread.join(timeout=180)
    assert not failures, failures[:3]
    assert len(answers) >= 6 and all(answers), answers
    assert ctx.retry_stats()["retries"] == 0
