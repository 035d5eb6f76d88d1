"""Python UDFs as production workloads use them, on a cluster of 2 worker
processes with 2 runners each: class UDFs set up once per runner, accumulators
living in a runner (datafusion-python's own UDAF cases give its answers),
batch sizes, concurrency caps, async UDFs, and runners that misbehave. One
cluster for the file; every assertion is on real runner processes (their
pids) or on answers compared with datafusion-python."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import datafusion
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import sorted_rows
from datafusion import Accumulator, udaf

import dfship

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def pool_cluster() -> Iterator[dfship.LocalCluster]:
    with dfship.LocalCluster(workers=2, worker_args=["--python-runners", "2"]) as running:
        yield running


@pytest.fixture(scope="module")
def numbers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 files of 40,960 rows (5 batches each); group ``g`` lives in one file."""
    root = tmp_path_factory.mktemp("numbers")
    rows = 5 * 8192
    for part in range(4):
        ids = pa.array(range(part * rows, (part + 1) * rows), pa.int64())
        table = pa.table(
            {
                "id": ids,
                "g": pc.add(pc.bit_wise_and(ids, 7), part * 10),
                "v": pc.divide(pc.cast(pc.bit_wise_and(ids, 1023), pa.float64()), 8.0),
            }
        )
        pq.write_table(table, root / f"part-{part}.parquet")
    return root


@pytest.fixture
def ctx(pool_cluster: dfship.LocalCluster, numbers: Path) -> dfship.ClusterContext:
    context = pool_cluster.context()
    context.register_parquet("numbers", numbers)
    return context


def runner_pids(cluster: dfship.LocalCluster) -> dict[int, set[int]]:
    """The runner processes of each worker: worker pid -> its children's pids."""
    workers = {process.pid for process in cluster._processes}
    found: dict[int, set[int]] = {pid: set() for pid in workers}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent = int(fields[1])
        if parent in found:
            found[parent].add(int(entry.name))
    return found


# datafusion-python 55's own test_udaf.py cases, each result computed on the cluster.

TEST_TABLE = pa.record_batch([pa.array([1.0, 2.0, 3.0]), pa.array([4, 4, 6])], ["a", "b"])


class Summarize(Accumulator):
    """datafusion-python's test accumulator: its fresh state is not empty."""

    def __init__(self, initial_value: float = 0.0, as_scalar: bool = False) -> None:
        self._sum = initial_value
        self.as_scalar = as_scalar

    def state(self) -> list[Any]:
        return [pa.scalar(self._sum)] if self.as_scalar else [self._sum]

    def update(self, values: pa.Array) -> None:
        self._sum = self._sum + pc.sum(values).as_py()

    def merge(self, states: list[pa.Array]) -> None:
        self._sum = self._sum + pc.sum(states[0]).as_py()

    def evaluate(self) -> Any:
        return pa.scalar(self._sum) if self.as_scalar else self._sum


@pytest.mark.parametrize("as_scalar", [True, False])
def test_udaf_aggregate_with_arguments(pool_cluster: dfship.LocalCluster, as_scalar: bool) -> None:
    bias = 10.0
    summarize = dfship.udaf(
        lambda: Summarize(initial_value=bias, as_scalar=as_scalar),
        pa.float64(),
        pa.float64(),
        [pa.float64()],
        volatility="immutable",
        name="summarize",
    )
    ctx = pool_cluster.context()
    ctx.register_udaf(summarize)
    ctx.register_arrow("test_table", TEST_TABLE)
    for _ in range(2):  # a second run starts from a fresh state
        result = ctx.sql("SELECT summarize(a) FROM test_table").collect()
        assert result.column(0).to_pylist() == [bias + 1.0 + 2.0 + 3.0]


def test_udaf_decorator_aggregate_with_arguments(pool_cluster: dfship.LocalCluster) -> None:
    bias = 10.0

    @dfship.udaf(pa.float64(), pa.float64(), [pa.float64()], "immutable")
    def summarize() -> Summarize:
        return Summarize(bias)

    ctx = pool_cluster.context()
    ctx.register_udaf(summarize)
    ctx.register_arrow("test_table", TEST_TABLE)
    for _ in range(2):
        result = ctx.sql("SELECT summarize(a) FROM test_table").collect()
        assert result.column(0).to_pylist() == [bias + 1.0 + 2.0 + 3.0]


def test_partial_and_final_over_many_batches_match_datafusion_python(
    ctx: dfship.ClusterContext, numbers: Path
) -> None:
    # Each group lives in one file, so both engines give it exactly one partial
    # accumulator (5 batches of updates) and one final one: a fresh state of 10
    # counts twice. Rebuilding accumulators per batch would count it per batch.
    f64 = pa.float64()
    ours = dfship.udaf(lambda: Summarize(10.0), f64, f64, [f64], "immutable", "s10")
    ctx.register_udaf(ours)
    query = "SELECT g, s10(v) AS s FROM numbers GROUP BY g"
    plan = ctx.sql(query).explain()
    assert "Partial" in plan and "Final" in plan, plan
    local = datafusion.SessionContext(datafusion.SessionConfig().with_target_partitions(4))
    local.register_parquet("numbers", str(numbers))
    local.register_udaf(
        udaf(lambda: Summarize(10.0), pa.float64(), pa.float64(), [pa.float64()], "immutable", name="s10")
    )
    expected = local.sql(query).to_arrow_table()
    assert len(expected) == 32
    assert sorted_rows(ctx.sql(query).collect()) == sorted_rows(expected)
    total = pc.sum(local.sql("SELECT v FROM numbers").to_arrow_table().column(0)).as_py()
    assert sum(expected.column("s").to_pylist()) == pytest.approx(total + 32 * 20.0)


# Class UDFs: one instance per runner that serves them.


def test_a_class_udf_is_made_once_in_each_runner_that_serves_it(
    pool_cluster: dfship.LocalCluster, ctx: dfship.ClusterContext, tmp_path: Path
) -> None:
    log = tmp_path / "instances.log"

    @dfship.udf([pa.int64()], pa.int64(), "stable")
    class Model:
        def __init__(self) -> None:
            time.sleep(0.2)  # loading a model
            with open(log, "a") as out:
                out.write(f"{os.getppid()} {os.getpid()}\n")
            self.pid = os.getpid()

        def __call__(self, ids: pa.Array) -> pa.Array:
            return pa.array([self.pid] * len(ids), pa.int64())

    ctx.register_udf(Model)
    served: set[int] = set()
    for _ in range(3):
        served |= set(ctx.sql("SELECT model(id) AS pid FROM numbers").collect().column(0).to_pylist())
    made = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    pids = [pid for _, pid in made]
    assert len(pids) == len(set(pids)), f"a runner made its instance twice: {made}"
    assert set(pids) == served, "every runner that served a call made exactly one instance"
    workers = {process.pid for process in pool_cluster._processes}
    assert {parent for parent, _ in made} <= workers | {os.getpid()}
    assert len(served) >= 2, f"the work spread over several runners: {made}"


def test_an_init_failure_names_the_class(ctx: dfship.ClusterContext) -> None:
    @dfship.udf([pa.int64()], pa.int64(), "stable", name="needs_a_model")
    class NeedsModel:
        def __init__(self) -> None:
            raise FileNotFoundError("model.bin")

        def __call__(self, ids: pa.Array) -> pa.Array:
            return ids

    ctx.register_udf(NeedsModel)
    with pytest.raises(dfship.UdfLoadError, match=r"NeedsModel\(\) raised FileNotFoundError: model.bin"):
        ctx.sql("SELECT needs_a_model(id) FROM numbers").collect()


def test_concurrency_one_loads_the_udf_in_one_runner_per_worker(
    pool_cluster: dfship.LocalCluster, ctx: dfship.ClusterContext, tmp_path: Path
) -> None:
    log = tmp_path / "heavy.log"

    @dfship.udf([pa.int64()], pa.int64(), "stable", concurrency=1)
    class Heavy:
        def __init__(self) -> None:
            with open(log, "a") as out:
                out.write(f"{os.getppid()} {os.getpid()}\n")

        def __call__(self, ids: pa.Array) -> pa.Array:
            time.sleep(0.01)
            return pa.array([os.getpid()] * len(ids), pa.int64())

    ctx.register_udf(Heavy)
    for _ in range(2):
        pids = set(ctx.sql("SELECT heavy(id) FROM numbers").collect().column(0).to_pylist())
    made = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    by_worker: dict[int, set[int]] = {}
    for parent, pid in made:
        by_worker.setdefault(parent, set()).add(pid)
    assert all(len(runners) == 1 for runners in by_worker.values()), f"one loading runner per worker: {made}"
    assert pids <= {pid for _, pid in made}
    runners_by_worker = runner_pids(pool_cluster).values()
    assert all(len(runners) == 2 for runners in runners_by_worker), "each worker runs 2 runners"


def test_batch_size_caps_the_rows_of_every_call(ctx: dfship.ClusterContext) -> None:
    @dfship.udf([pa.int64()], pa.int64(), "immutable", batch_size=64)
    def rows_seen(ids: pa.Array) -> pa.Array:
        return pa.array([len(ids)] * len(ids), pa.int64())

    ctx.register_udf(rows_seen)
    sizes = ctx.sql("SELECT rows_seen(id) AS n, count(*) AS c FROM numbers GROUP BY n").collect().to_pylist()
    assert max(row["n"] for row in sizes) == 64
    assert sum(row["c"] for row in sizes) == 4 * 5 * 8192


# Async UDFs.


def test_async_udf_calls_overlap_and_results_keep_their_order(ctx: dfship.ClusterContext) -> None:
    @dfship.udf([pa.int64()], pa.int64(), "immutable", batch_size=256, max_in_flight=64)
    async def slow_plus_one(ids: pa.Array) -> pa.Array:
        await asyncio.sleep(0.05)
        return pc.add(ids, 1)

    ctx.register_udf(slow_plus_one)
    started = time.monotonic()
    total = ctx.sql("SELECT sum(slow_plus_one(id) - id) AS n FROM numbers").collect().column(0)[0].as_py()
    elapsed = time.monotonic() - started
    assert total == 4 * 5 * 8192
    # 640 calls of 50 ms: 32 s one at a time, well under a second overlapped.
    assert elapsed < 8, f"async calls ran one at a time: {elapsed:.1f} s"


def test_an_async_udf_that_raises_is_a_udf_raised_error(ctx: dfship.ClusterContext) -> None:
    @dfship.udf([pa.int64()], pa.int64(), "immutable")
    async def flaky_service(ids: pa.Array) -> pa.Array:
        await asyncio.sleep(0.01)
        raise ConnectionError("the model service is down")

    ctx.register_udf(flaky_service)
    with pytest.raises(dfship.UdfRaisedError, match="ConnectionError: the model service is down"):
        ctx.sql("SELECT flaky_service(id) FROM numbers").collect()


def test_an_async_class_udf_keeps_one_instance_per_runner(ctx: dfship.ClusterContext, tmp_path: Path) -> None:
    log = tmp_path / "clients.log"

    @dfship.udf([pa.int64()], pa.int64(), "immutable", batch_size=4096)
    class Client:
        def __init__(self) -> None:
            with open(log, "a") as out:
                out.write(f"{os.getpid()}\n")
            self.calls = 0

        async def __call__(self, ids: pa.Array) -> pa.Array:
            self.calls += 1
            await asyncio.sleep(0.001)
            return pa.array([self.calls] * len(ids), pa.int64())

    ctx.register_udf(Client)
    calls = ctx.sql("SELECT max(client(id)) AS m FROM numbers").collect().column(0)[0].as_py()
    made = log.read_text().split()
    assert len(made) == len(set(made)), f"one instance per runner: {made}"
    # 40 calls of 4,096 rows over at most 4 instances: instances were reused.
    assert calls >= 40 // len(made) > 1


# Runners that misbehave.


def test_a_forged_reply_replaces_its_runner_and_no_other_query_sees_it(
    pool_cluster: dfship.LocalCluster, ctx: dfship.ClusterContext
) -> None:
    @dfship.udf([pa.int64()], pa.int64(), "volatile")
    def forger(ids: pa.Array) -> pa.Array:
        import struct

        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, pa.schema([pa.field("result", pa.int64())])) as writer:
            writer.write_batch(pa.record_batch([pa.array([666] * len(ids), pa.int64())], names=["result"]))
        body = sink.getvalue().to_pybytes()
        for guess in range(1, 50):  # answers for calls it guesses the ids of
            os.write(3, struct.pack("<BQQ", 12, guess, len(body)) + body)
        return ids

    @dfship.udf([pa.int64()], pa.int64(), "immutable")
    def honest(ids: pa.Array) -> pa.Array:
        time.sleep(0.001)
        return pc.multiply(ids, 2)

    ctx.register_udf(forger)
    ctx.register_udf(honest)
    expected = ctx.sql("SELECT sum(id) * 2 AS s FROM numbers").collect().column(0)[0].as_py()
    results: list[Any] = []

    def honest_queries() -> None:
        for _ in range(4):
            results.append(ctx.sql("SELECT sum(honest(id)) AS s FROM numbers").collect().column(0)[0].as_py())

    threads = [threading.Thread(target=honest_queries) for _ in range(2)]
    for thread in threads:
        thread.start()
    with pytest.raises(dfship.UdfRaisedError, match="broke the runner protocol"):
        ctx.sql("SELECT forger(id) FROM numbers").collect()
    for thread in threads:
        thread.join()
    assert results == [expected] * 8, "every other query's answer is right"
    assert ctx.sql("SELECT sum(honest(id)) AS s FROM numbers").collect().column(0)[0].as_py() == expected


class SlowSum(Accumulator):
    def __init__(self) -> None:
        self.total = 0.0

    def update(self, values: pa.Array) -> None:
        time.sleep(0.05)
        self.total += pc.sum(values).as_py() or 0.0

    def merge(self, states: list[pa.Array]) -> None:
        self.total += pc.sum(states[0]).as_py() or 0.0

    def state(self) -> list[Any]:
        return [self.total]

    def evaluate(self) -> Any:
        return self.total


def test_an_accumulators_runner_killed_mid_query_gives_a_clear_error_or_the_right_answer(
    pool_cluster: dfship.LocalCluster, ctx: dfship.ClusterContext
) -> None:
    ctx.register_udaf(dfship.udaf(SlowSum, pa.float64(), pa.float64(), [pa.float64()], "immutable"))
    query = "SELECT g, slowsum(v) AS s FROM numbers GROUP BY g"
    expected = sorted_rows(ctx.sql("SELECT g, sum(v) AS s FROM numbers GROUP BY g").collect())
    killed: list[int] = []

    def kill_a_runner() -> None:
        time.sleep(0.4)
        for runners in runner_pids(pool_cluster).values():
            for pid in sorted(runners)[:1]:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return

    killer = threading.Thread(target=kill_a_runner)
    killer.start()
    try:
        answer = sorted_rows(ctx.sql(query).collect())
    except dfship.UdfRaisedError as error:
        message = str(error)
        assert "slowsum" in message and ("lived in a runner that is gone" in message or "crashed" in message)
    else:
        assert answer == expected
    killer.join()
    assert killed, "a runner was killed during the query"
    # The workers serve on, with replacement runners.
    assert sorted_rows(ctx.sql(query).collect()) == expected


def test_extension_types_reach_the_udf_and_come_back_checked(ctx: dfship.ClusterContext) -> None:
    """datafusion-python's test_udf_with_metadata, on the cluster."""
    from uuid import UUID

    @dfship.udf([pa.string()], pa.uuid(), "stable")
    def uuid_from_string(uuid_string: pa.Array) -> pa.Array:
        return pa.array((UUID(s).bytes for s in uuid_string.to_pylist()), pa.uuid())

    @dfship.udf([pa.uuid()], pa.int64(), "stable")
    def uuid_version(uuid: pa.Array) -> pa.Array:
        return pa.array((s.version for s in uuid.to_pylist()), pa.int64())

    @dfship.udf([pa.string()], pa.uuid(), "stable")
    def plain_bytes(uuid_string: pa.Array) -> pa.Array:
        return pa.array((UUID(s).bytes for s in uuid_string.to_pylist()), pa.binary(16))

    for declared in (uuid_from_string, uuid_version, plain_bytes):
        ctx.register_udf(declared)
    query = "SELECT uuid_version(uuid_from_string(uuid())) AS v FROM numbers WHERE id < 5"
    versions = ctx.sql(query).collect()
    assert versions.column(0).to_pylist() == [4, 4, 4, 4, 4]
    with pytest.raises(dfship.UdfResultError, match=r"extension type arrow.uuid"):
        ctx.sql("SELECT plain_bytes(uuid()) FROM numbers WHERE id < 5").collect()
