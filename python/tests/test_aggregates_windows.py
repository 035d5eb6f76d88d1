"""Python aggregate and window UDFs on a keyed cluster of 3 worker processes:
declared with ``dfship.udaf``/``udwf`` and run from SQL, or made by
datafusion-python (``datafusion.udaf``/``udwf``) and run from its plans in every
form. Results equal single-node datafusion-python; no worker registers
anything. One cluster for the file."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import datafusion
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import PLAN_FORMS, plan_in_form, sorted_rows
from datafusion import Accumulator
from datafusion.user_defined import WindowEvaluator

import dfship

# The accumulator and evaluator classes below travel by value (this module is
# not importable on the workers).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

KEY = "aggregates and windows: a key of enough length"


class WeightedMean(Accumulator):
    """Two state fields (weighted sum, weight); NULL inputs are skipped."""

    def __init__(self) -> None:
        self.total = 0.0
        self.weight = 0.0

    def update(self, values: pa.Array, weights: pa.Array) -> None:
        mask = pc.and_(pc.is_valid(values), pc.is_valid(weights))
        values, weights = pc.filter(values, mask), pc.filter(weights, mask)
        self.total += pc.sum(pc.multiply(values, weights)).as_py() or 0.0
        self.weight += pc.sum(weights).as_py() or 0.0

    def merge(self, states: list[pa.Array]) -> None:
        self.total += pc.sum(states[0]).as_py() or 0.0
        self.weight += pc.sum(states[1]).as_py() or 0.0

    def state(self) -> list[pa.Scalar]:
        return [pa.scalar(self.total), pa.scalar(self.weight)]

    def evaluate(self) -> pa.Scalar:
        return pa.scalar(round(self.total / self.weight, 6) if self.weight else None, pa.float64())


class CountOdd(Accumulator):
    def __init__(self) -> None:
        self.n = 0

    def update(self, values: pa.Array) -> None:
        self.n += pc.sum(pc.equal(pc.bit_wise_and(values, 1), 1)).as_py() or 0

    def merge(self, states: list[pa.Array]) -> None:
        self.n += pc.sum(states[0]).as_py() or 0

    def state(self) -> list[pa.Scalar]:
        return [pa.scalar(self.n)]

    def evaluate(self) -> pa.Scalar:
        return pa.scalar(self.n)


class DistinctCount(Accumulator):
    """A list state: the distinct values seen, as Arrow list<int64> between stages."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def update(self, values: pa.Array) -> None:
        self.seen.update(v for v in values.to_pylist() if v is not None)

    def merge(self, states: list[pa.Array]) -> None:
        for values in states[0].to_pylist():
            self.seen.update(values or [])

    def state(self) -> list[pa.Scalar]:
        return [pa.scalar(sorted(self.seen), type=pa.list_(pa.int64()))]

    def evaluate(self) -> pa.Scalar:
        return pa.scalar(len(self.seen))


class RunningSum(WindowEvaluator):
    def evaluate_all(self, values: list[pa.Array], num_rows: int) -> pa.Array:
        return pc.round(pc.cumulative_sum(pc.fill_null(values[0], 0)), 6)


class FrameMean(WindowEvaluator):
    def uses_window_frame(self) -> bool:
        return True

    def evaluate(self, values: list[pa.Array], eval_range: tuple[int, int]) -> pa.Scalar:
        start, end = eval_range
        mean = pc.mean(values[0].slice(start, end - start)).as_py()
        return pa.scalar(None if mean is None else round(mean, 6), pa.float64())


class RankTimesTen(WindowEvaluator):
    def include_rank(self) -> bool:
        return True

    def evaluate_all_with_rank(self, num_rows: int, ranks_in_partition: list[tuple[int, int]]) -> pa.Array:
        out: list[int] = []
        for rank, (start, end) in enumerate(ranks_in_partition):
            out.extend([(rank + 1) * 10] * (end - start))
        return pa.array(out, pa.int64())


F64, I64 = pa.float64(), pa.int64()
AGGREGATES = [
    ("wmean", WeightedMean, [F64, F64], F64, [F64, F64]),
    ("count_odd", CountOdd, [I64], I64, [I64]),
    ("distinct_count", DistinctCount, [I64], I64, [pa.list_(I64)]),
]
WINDOWS = [
    ("running", RunningSum, [F64], F64),
    ("frame_mean", FrameMean, [F64], F64),
    ("rank10", RankTimesTen, [], I64),
]

MATRIX = {
    "group_by_with_nulls": "SELECT k, wmean(value, CAST(k AS DOUBLE)) AS m, count_odd(id) AS o "
    "FROM facts GROUP BY k",
    "empty_groups": "SELECT category, count_odd(id) AS o, wmean(value, CAST(k AS DOUBLE)) AS m "
    "FROM facts WHERE k IS NULL AND id % 2 = 0 GROUP BY category",
    "list_state": "SELECT category, distinct_count(k) AS d, distinct_count(id % 13) AS e "
    "FROM facts GROUP BY category",
    "whole_table": "SELECT wmean(value, CAST(id AS DOUBLE)) AS m, count_odd(id) AS o FROM facts",
    "having": "SELECT category, count_odd(id) AS o FROM facts GROUP BY category HAVING count_odd(id) > 299",
    "window_partition_order": "SELECT id, running(value) OVER (PARTITION BY category ORDER BY id) AS r "
    "FROM facts WHERE id < 300",
    "window_bounded_frame": "SELECT id, frame_mean(value) OVER (PARTITION BY k ORDER BY id "
    "ROWS BETWEEN 2 PRECEDING AND 1 FOLLOWING) AS r FROM facts WHERE id < 200",
    "window_rank": "SELECT id, rank10() OVER (PARTITION BY category ORDER BY k) AS r "
    "FROM facts WHERE id < 120",
    "aggregate_as_window": "SELECT id, count_odd(id) OVER (PARTITION BY category ORDER BY id) AS r "
    "FROM facts WHERE id < 150",
}


@pytest.fixture(scope="module")
def keyed3() -> Iterator[dfship.LocalCluster]:
    with dfship.LocalCluster(workers=3, env={"DFSHIP_CLUSTER_KEY": KEY}) as cluster:
        yield cluster


@pytest.fixture
def ctx(keyed3: dfship.LocalCluster, dataset: Path) -> dfship.ClusterContext:
    context = keyed3.context(bytes_per_partition=1, cluster_key=KEY.encode())
    context.register_parquet("facts", dataset / "facts")
    return context


@pytest.fixture
def local(dataset: Path) -> datafusion.SessionContext:
    """datafusion-python with the same UDFs, made with datafusion's own API."""
    context = datafusion.SessionContext()
    context.register_parquet("facts", str(dataset / "facts"))
    for name, accumulator, inputs, returns, states in AGGREGATES:
        context.register_udaf(datafusion.udaf(accumulator, inputs, returns, states, "immutable", name=name))
    for name, evaluator, inputs, returns in WINDOWS:
        context.register_udwf(datafusion.udwf(evaluator, inputs, returns, "immutable", name=name))
    return context


def register_dfship(ctx: dfship.ClusterContext) -> None:
    # The function form, and the decorator form (on the class itself).
    name, accumulator, inputs, returns, states = AGGREGATES[0]
    ctx.register_udaf(dfship.udaf(accumulator, inputs, returns, states, "immutable", name=name))
    for name, accumulator, inputs, returns, states in AGGREGATES[1:]:
        ctx.register_udaf(dfship.udaf(inputs, returns, states, "immutable", name)(accumulator))
    for name, evaluator, inputs, returns in WINDOWS:
        ctx.register_udwf(dfship.udwf(inputs, returns, "immutable", name)(evaluator))


def expected_rows(local: datafusion.SessionContext, query: str) -> list[tuple]:
    table = local.sql(query).to_arrow_table()
    assert table.num_rows > 0
    return sorted_rows(table)


@pytest.mark.parametrize("name", MATRIX)
def test_from_sql(name: str, ctx: dfship.ClusterContext, local: datafusion.SessionContext) -> None:
    register_dfship(ctx)
    query = MATRIX[name]
    df = ctx.sql(query)
    assert "Stage" in df.explain()
    before = ctx.shipped()
    assert sorted_rows(df.collect()) == expected_rows(local, query)
    assert ctx.shipped()[1] > before[1], "the UDFs travelled inline to the workers"


@pytest.mark.parametrize("form", PLAN_FORMS)
@pytest.mark.parametrize("name", MATRIX)
def test_from_datafusion_python_plans(
    name: str, form: str, ctx: dfship.ClusterContext, local: datafusion.SessionContext
) -> None:
    """datafusion-python's DFPYUDA/DFPYUDW payloads are trusted by the user's own
    coordinator and reach the keyed workers as signed frames."""
    query = MATRIX[name]
    plan = plan_in_form(local.sql(query), form)
    distributed = ctx.execute_datafusion_plan(plan)
    assert sorted_rows(distributed.collect()) == expected_rows(local, query)


def test_partial_and_final_aggregation_run_in_different_stages(ctx: dfship.ClusterContext) -> None:
    register_dfship(ctx)
    shown = ctx.sql("SELECT category, wmean(value, value) FROM facts GROUP BY category").explain()
    assert "mode=Partial" in shown and "mode=FinalPartitioned" in shown, shown


def test_an_unkeyed_client_is_still_refused(keyed3: dfship.LocalCluster, dataset: Path) -> None:
    unkeyed = keyed3.context(bytes_per_partition=1)
    unkeyed.register_parquet("facts", dataset / "facts")
    register_dfship(unkeyed)
    with pytest.raises(dfship.AuthenticationError, match="requires the cluster key"):
        unkeyed.sql("SELECT category, count_odd(id) FROM facts GROUP BY category").collect()


class BadState(CountOdd):
    def state(self) -> list[pa.Scalar]:
        return [pa.scalar(self.n), pa.scalar(self.n)]


class RaisingMerge(CountOdd):
    def merge(self, states: list[pa.Array]) -> None:
        raise ValueError("merge is broken on purpose")


class WrongLength(WindowEvaluator):
    def evaluate_all(self, values: list[pa.Array], num_rows: int) -> pa.Array:
        return pa.array([1.0] * (num_rows + 1))


BROKEN: list[tuple[Any, str, type[Exception], str]] = [
    (
        dfship.udaf(BadState, [I64], I64, [I64], "immutable", name="bad_state"),
        "SELECT category, bad_state(id) FROM facts GROUP BY category",
        dfship.UdfResultError,
        "state() returned 2 values, but the aggregate declares 1 state fields",
    ),
    (
        dfship.udaf(RaisingMerge, [I64], I64, [I64], "immutable", name="raising_merge"),
        "SELECT raising_merge(id) FROM facts",
        dfship.UdfRaisedError,
        "merge is broken on purpose",
    ),
    (
        dfship.udwf(WrongLength, [F64], F64, "immutable", name="wrong_length"),
        "SELECT id, wrong_length(value) OVER (PARTITION BY category) FROM facts",
        dfship.UdfResultError,
        "it must return exactly one value per input row",
    ),
]


@pytest.mark.parametrize("declaration, query, error, needle", BROKEN, ids=[b[0].name for b in BROKEN])
def test_broken_accumulators_and_evaluators_get_clear_errors(
    declaration: Any,
    query: str,
    error: type[Exception],
    needle: str,
    ctx: dfship.ClusterContext,
    local: datafusion.SessionContext,
) -> None:
    ctx.register_udf(declaration)
    with pytest.raises(error) as raised:
        ctx.sql(query).collect()
    message = str(raised.value)
    assert needle in message and f"'{declaration.name}'" in message, message
    # The same workers keep serving.
    register_dfship(ctx)
    query = MATRIX["group_by_with_nulls"]
    assert sorted_rows(ctx.sql(query).collect()) == expected_rows(local, query)


def test_declarations_are_checked() -> None:
    with pytest.raises(ValueError, match="at least one state type"):
        dfship.udaf(CountOdd, [I64], I64, [], "immutable")
    with pytest.raises(TypeError, match="state_types"):
        dfship.udaf(CountOdd, [I64], I64, ["int64"], "immutable")
    with pytest.raises(TypeError, match="evaluator class or factory"):
        dfship.udwf(42, [I64], I64, "immutable")
    with pytest.raises(ValueError, match="volatility"):
        dfship.udwf(RunningSum, [F64], F64, "sometimes")
    assert dfship.udaf(CountOdd, I64, I64, I64, "immutable").name == "countodd"
