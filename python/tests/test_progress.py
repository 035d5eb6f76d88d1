"""Progress of a running query, from the workers' ObservabilityService.

datafusion-distributed 4.0 keeps every task of a query on its worker until
the coordinator closes the query, so mid-query a worker can say which tasks
it holds (running) but not which have finished; done rises to the total at
the end, while the rows the Python UDFs have processed rise as they run
(see crates/dfship-distributed/src/progress.rs).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import cloudpickle
import pyarrow as pa
import pyarrow.compute as pc

import dfship

cloudpickle.register_pickle_by_value(sys.modules[__name__])

QUERY = (
    "SELECT d.ucat, count(*) AS c, sum(slow_inc(f.id)) AS s FROM facts f "
    "JOIN dim d ON f.category = d.category GROUP BY d.ucat ORDER BY d.ucat"
)


@dfship.udf([pa.int64()], pa.int64(), "immutable", name="slow_inc", batch_size=50)
def slow_inc(values: pa.Array) -> pa.Array:
    time.sleep(0.3)
    return pc.add(values, 1)


def test_progress_of_a_three_stage_query_comes_from_every_worker(dataset: Path) -> None:
    with dfship.LocalCluster(workers=3) as cluster:
        ctx = cluster.context(bytes_per_partition=1)
        ctx.register_parquet("facts", dataset / "facts")
        ctx.register_parquet("dim", dataset / "dim")
        ctx.register_udf(slow_inc)
        df = ctx.sql(QUERY)
        expected = df.collect()  # warm: runners hold the UDF
        views: list[dict[str, Any]] = []
        threads: set[str] = set()

        def record(progress: dict[str, Any]) -> None:
            views.append(progress)
            threads.add(threading.current_thread().name)

        table = ctx.sql(QUERY).collect(progress=record)
    assert table == expected
    # Three stages on the workers (broadcast dim, join + partial aggregate, final aggregate).
    first, last = views[0], views[-1]
    assert len(first["stages"]) >= 3, first
    assert first["total"] == sum(s["tasks"] for s in first["stages"]) >= 6
    assert not first["finished"] and first["done"] == 0
    # Mid-query: some view shows tasks held by workers in every stage.
    during = [v for v in views if not v["finished"] and all(s["running"] > 0 for s in v["stages"])]
    assert during, views
    assert all(s["running"] <= s["tasks"] for v in views for s in v["stages"])
    # Rows through the Python UDF rise while the query runs, to every row.
    from conftest import FILES, ROWS_PER_FILE

    rows = [sum(s["rows"] for s in v["stages"]) for v in views]
    assert rows == sorted(rows), rows
    # Several views before the end, at least two of them with rows counted
    # but not all (figures come per batch: each parquet file is one here).
    assert len([v for v in views if not v["finished"]]) >= 3, rows
    partial = {r for r, v in zip(rows, views, strict=True) if not v["finished"]}
    assert len(partial & set(range(1, FILES * ROWS_PER_FILE))) >= 2, rows
    assert rows[-1] == FILES * ROWS_PER_FILE, rows
    # Never falls back; ends with every task done.
    done = [v["done"] for v in views]
    assert done == sorted(done), done
    assert last["finished"] and last["done"] == last["total"] == first["total"], last
    assert all(not v["finished"] for v in views[:-1])


def test_a_progress_callback_that_raises_does_not_stop_the_query(dataset: Path, ctx: Any) -> None:
    calls = []

    def broken(progress: dict[str, Any]) -> None:
        calls.append(progress)
        raise RuntimeError("a bug in the caller's progress display")

    hook_seen: list[BaseException | None] = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: hook_seen.append(unraisable.exc_value)
    try:
        table = ctx.sql("SELECT category, count(*) AS c FROM facts GROUP BY category").collect(
            progress=broken
        )
    finally:
        sys.unraisablehook = old_hook
    assert table.num_rows == 4
    assert calls and hook_seen
    assert all(isinstance(e, RuntimeError) for e in hook_seen)


def test_progress_true_without_a_terminal_draws_nothing(ctx: Any, capfd: Any) -> None:
    table = ctx.sql("SELECT category, count(*) AS c FROM facts GROUP BY category").collect(progress=True)
    assert table.num_rows == 4
    assert "tasks" not in capfd.readouterr().err


def test_a_query_the_workers_never_see_still_reports_its_end(ctx: Any) -> None:
    views: list[dict[str, Any]] = []
    ctx.sql("SELECT 1 AS one").collect(progress=views.append)
    assert views == [{"stages": [], "done": 0, "total": 0, "finished": True}]


@dfship.udf([pa.int64()], pa.int64(), "immutable", name="plus_one")
def plus_one(values: pa.Array) -> pa.Array:
    return pc.add(values, 1)


def test_explain_analyze_shows_each_udf_per_stage_from_every_worker(dataset: Path) -> None:
    from conftest import FILES, ROWS_PER_FILE

    with dfship.LocalCluster(workers=3) as cluster:
        ctx = cluster.context(bytes_per_partition=1)
        ctx.register_parquet("facts", dataset / "facts")
        ctx.register_udf(plus_one)
        text = ctx.sql("SELECT category, sum(plus_one(id)) AS s FROM facts GROUP BY category").explain(
            analyze=True
        )
    assert "metrics=[" in text and "DistributedExec" in text
    assert "4 rows in" in text
    lines = [line.strip() for line in text.splitlines() if ": plus_one: " in line]
    assert lines, text
    figures = [dict(part.split("=") for part in line.split(": plus_one: ")[1].split()) for line in lines]
    # Every row went through the UDF once, spread over several tasks.
    assert sum(int(f["rows"]) for f in figures) == FILES * ROWS_PER_FILE, lines
    assert sum(int(f["tasks"]) for f in figures) >= 2, lines
    assert all(f["failures"] == "0" and float(f["waiting"].rstrip("s")) > 0 for f in figures), lines
    assert any(line.startswith("Stage ") for line in lines), lines
