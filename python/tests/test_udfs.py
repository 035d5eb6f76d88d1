"""UDF shapes, modules imported by UDFs, errors, tables and codec options."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

import dfship

SUM_IDS = sum(range(1, 2401))


def test_lambda_closure_and_decorator(ctx: dfship.ClusterContext) -> None:
    offset = 1000  # captured by value with the closure
    ctx.register_udf(
        dfship.udf(lambda a: pc.add(a, offset), [pa.int64()], pa.int64(), "stable", name="shift")
    )

    @dfship.udf([pa.string()], pa.string(), "immutable")
    def shout(values: pa.Array) -> pa.Array:
        return pc.utf8_upper(values)

    ctx.register_udf(shout)
    table = ctx.sql("SELECT sum(shift(id)) AS s, max(shout(category)) AS m FROM facts").collect()
    assert table.to_pylist() == [{"s": SUM_IDS + 1000 * 2400, "m": "CAT_3"}]


def test_explain_shows_stages_and_inline_udfs(ctx: dfship.ClusterContext) -> None:
    ctx.register_udf(
        dfship.udf(lambda a: pc.multiply(a, 2), [pa.int64()], pa.int64(), "immutable", name="dbl")
    )
    text = ctx.sql("SELECT category, sum(dbl(id)) FROM facts GROUP BY category").explain()
    assert "Stage" in text
    assert "dbl: Python UDF, travels inline" in text


def test_a_udf_exception_reaches_python_and_the_cluster_recovers(ctx: dfship.ClusterContext) -> None:
    def explode(values: pa.Array) -> pa.Array:
        raise ValueError(f"cannot handle {len(values)} values today")

    ctx.register_udf(dfship.udf(explode, [pa.int64()], pa.int64(), "immutable", name="explode"))
    with pytest.raises(dfship.UdfRaisedError) as raised:
        ctx.sql("SELECT explode(id) FROM facts").collect()
    assert "ValueError" in str(raised.value)
    assert "cannot handle" in str(raised.value)
    assert "explode" in str(raised.value)
    assert ctx.sql("SELECT count(*) AS c FROM facts").collect().to_pylist() == [{"c": 2400}]


def test_a_udf_returning_bad_data_is_a_result_error(ctx: dfship.ClusterContext) -> None:
    ctx.register_udf(dfship.udf(lambda a: a[:1], [pa.int64()], pa.int64(), "immutable", name="short"))
    with pytest.raises(dfship.UdfResultError, match="one value per input row"):
        ctx.sql("SELECT short(id) FROM facts").collect()
    as_text = dfship.udf(
        lambda a: pc.cast(a, pa.string()), [pa.int64()], pa.int64(), "immutable", name="as_text"
    )
    ctx.register_udf(as_text)
    with pytest.raises(dfship.UdfResultError, match="declared to return Int64 but returned Utf8"):
        ctx.sql("SELECT as_text(id) FROM facts").collect()
    assert ctx.sql("SELECT count(*) AS c FROM facts").collect().to_pylist() == [{"c": 2400}]


def test_planning_errors_are_python_exceptions(ctx: dfship.ClusterContext) -> None:
    with pytest.raises(dfship.PlanningError, match="no_such_table"):
        ctx.sql("SELECT * FROM no_such_table")
    with pytest.raises(TypeError, match="dfship.udf"):
        ctx.register_udf(lambda a: a)  # type: ignore[arg-type]


def test_in_memory_tables_csv_and_pandas(ctx: dfship.ClusterContext, dataset: Path, tmp_path: Path) -> None:
    ctx.register_udf(
        dfship.udf(lambda a: pc.multiply(a, 10), [pa.int64()], pa.int64(), "immutable", name="ten")
    )
    ctx.register_arrow("mem_table", pa.table({"x": pa.array([1, 2, 3], pa.int64())}))
    ctx.register_arrow("mem_batch", pa.record_batch({"x": pa.array([4, 5], pa.int64())}))
    assert ctx.sql("SELECT sum(ten(x)) AS s FROM mem_table").collect().to_pylist() == [{"s": 60}]
    assert ctx.sql("SELECT sum(ten(x)) AS s FROM mem_batch").collect().to_pylist() == [{"s": 90}]

    pandas = pytest.importorskip("pandas")
    ctx.register_arrow("mem_pandas", pandas.DataFrame({"x": [7, 8]}))
    frame = ctx.sql("SELECT ten(x) AS y FROM mem_pandas ORDER BY y").to_pandas()
    assert frame["y"].tolist() == [70, 80]

    csv = tmp_path / "numbers.csv"
    csv.write_text("x,label\n1,a\n2,b\n3,c\n")
    ctx.register_csv("numbers", csv)
    assert ctx.sql("SELECT sum(ten(x)) AS s FROM numbers").collect().to_pylist() == [{"s": 60}]


HELPER = """
import pyarrow.compute as pc

BONUS = 500


def add_bonus(values):
    return pc.add(values, BONUS)
"""


def _helper_module(tmp_path: Path, name: str) -> object:
    """A module importable here (sys.path) but not on the workers."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(HELPER))
    sys.path.insert(0, str(tmp_path))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))


def test_a_udf_importing_a_helper_module(cluster: dfship.LocalCluster, dataset: Path, tmp_path: Path) -> None:
    helper = _helper_module(tmp_path, "dfship_test_helper")

    def with_bonus(values: pa.Array) -> pa.Array:
        return helper.add_bonus(values)  # type: ignore[attr-defined]

    declared = dfship.udf(with_bonus, [pa.int64()], pa.int64(), "immutable", name="with_bonus")
    query = "SELECT max(with_bonus(id)) AS m FROM facts"

    # The workers cannot import the module, and need not: its file lies
    # outside the standard library and the installed packages, so it travels
    # by value with the UDF (a module that cannot: test_local_modules.py).
    ctx = cluster.context(bytes_per_partition=1)
    ctx.register_parquet("facts", dataset / "facts")
    ctx.register_udf(declared)
    assert ctx.sql(query).collect().to_pylist() == [{"m": 2900}]
    import cloudpickle

    registry = cloudpickle.cloudpickle._PICKLE_BY_VALUE_MODULES
    assert "dfship_test_helper" not in registry, "registered for one pickling only"

    # A module the user registered by value stays registered.
    cloudpickle.register_pickle_by_value(helper)
    try:
        ctx = cluster.context(bytes_per_partition=1)
        ctx.register_parquet("facts", dataset / "facts")
        ctx.register_udf(dfship.udf(with_bonus, [pa.int64()], pa.int64(), "immutable", name="with_bonus"))
        assert ctx.sql(query).collect().to_pylist() == [{"m": 2900}]
        assert "dfship_test_helper" in registry
    finally:
        cloudpickle.unregister_pickle_by_value(helper)


@pytest.mark.parametrize(
    "strict",
    [{"worker_args": ["--strict"]}, {"env": {"DFSHIP_STRICT": "1"}}, {"env": {"DFSHIP_STRICT": "true"}}],
    ids=["flag", "env-1", "env-true"],
)
def test_strict_workers_refuse_inline_udfs(dataset: Path, strict: dict[str, object]) -> None:
    # Two workers: with one, a single-task stage may run on the coordinator itself.
    with dfship.LocalCluster(workers=2, **strict) as cluster:  # type: ignore[arg-type]
        ctx = cluster.context(bytes_per_partition=1)
        ctx.register_parquet("facts", dataset / "facts")
        ctx.register_udf(dfship.udf(lambda a: a, [pa.int64()], pa.int64(), "immutable", name="same"))
        with pytest.raises(dfship.PayloadRefusedError, match="strict mode"):
            ctx.sql("SELECT sum(same(id)) FROM facts").collect()


def test_a_cluster_key(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "cluster.key"
    key.write_text("a long enough shared secret")
    # Workers get the key from the environment, the coordinator from a file,
    # the environment, or not at all.
    monkeypatch.delenv("DFSHIP_CLUSTER_KEY", raising=False)
    with dfship.LocalCluster(workers=2, env={"DFSHIP_CLUSTER_KEY": key.read_text()}) as keyed:
        udf = dfship.udf(lambda a: pc.add(a, 1), [pa.int64()], pa.int64(), "immutable", name="inc")
        for options, environment, error in [
            ({"cluster_key_file": key}, None, None),
            ({}, key.read_text(), None),
            ({}, None, "requires the cluster key"),
            (
                {"cluster_key": b"another secret of enough length"},
                None,
                "did not prove that it holds the cluster key",
            ),
        ]:
            if environment is None:
                monkeypatch.delenv("DFSHIP_CLUSTER_KEY", raising=False)
            else:
                monkeypatch.setenv("DFSHIP_CLUSTER_KEY", environment)
            ctx = keyed.context(bytes_per_partition=1, **options)
            ctx.register_parquet("facts", dataset / "facts")
            ctx.register_udf(udf)
            if error is None:
                assert ctx.sql("SELECT sum(inc(id)) AS s FROM facts").collect().to_pylist() == [
                    {"s": SUM_IDS + 2400}
                ]
            else:
                with pytest.raises(dfship.AuthenticationError, match=error):
                    ctx.sql("SELECT sum(inc(id)) AS s FROM facts").collect()


def test_a_lost_worker_is_a_worker_lost_error(dataset: Path) -> None:
    cluster = dfship.LocalCluster(workers=2).start()
    try:
        # No retry, and no probe that could notice the loss before the query.
        ctx = cluster.context(bytes_per_partition=1, max_attempts=1, probe_interval=3600)
        ctx.register_parquet("facts", dataset / "facts")
        ctx.sql("SELECT count(*) FROM facts").collect()  # the first probe round
        cluster._processes[1].kill()
        cluster._processes[1].wait()
        with pytest.raises(dfship.WorkerLostError, match=cluster.urls[1].removeprefix("http://")):
            ctx.sql("SELECT category, count(*) FROM facts GROUP BY category").collect()
    finally:
        cluster.stop()


def test_every_error_class_is_a_dfship_error() -> None:
    import dfship.errors

    for name in dfship.errors.__all__:
        assert issubclass(getattr(dfship, name), dfship.DfshipError), name
        assert issubclass(getattr(dfship, name), Exception), name
