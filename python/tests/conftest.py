"""Fixtures: a Parquet dataset, a local cluster of worker processes, and a
single-node datafusion-python context to compare results with."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datafusion
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dfship

FILES = 6
ROWS_PER_FILE = 400


def counting_parquet(root: Path, files: int, rows: int, column: str = "v") -> Path:
    """``files`` Parquet files in ``root`` whose int64 ``column`` counts from 0
    to ``files * rows - 1``, ``rows`` per file."""
    for part in range(files):
        values = pa.array(range(part * rows, (part + 1) * rows), pa.int64())
        pq.write_table(pa.table({column: values}), root / f"part-{part}.parquet")
    return root


def write_dataset(root: Path) -> Path:
    facts = root / "facts"
    facts.mkdir(parents=True)
    start = datetime.datetime(2023, 11, 14, 22, 0, 0)
    for part in range(FILES):
        ids = list(range(part * ROWS_PER_FILE + 1, (part + 1) * ROWS_PER_FILE + 1))
        table = pa.table(
            {
                "id": pa.array(ids, pa.int64()),
                "k": pa.array([None if v % 5 == 0 else v % 7 for v in ids], pa.int64()),
                "category": pa.array([f"cat_{v % 4}" for v in ids], pa.string()),
                "value": pa.array([v / 3.0 for v in ids], pa.float64()),
                "ts": pa.array([start + datetime.timedelta(hours=v) for v in ids], pa.timestamp("ns")),
                "tags": pa.array([[v % 3, v % 5] for v in ids], pa.list_(pa.int64())),
            }
        )
        pq.write_table(table, facts / f"part-{part}.parquet")
    dim = root / "dim"
    dim.mkdir()
    pq.write_table(
        pa.table(
            {
                "category": [f"cat_{i}" for i in range(4)],
                "ucat": [f"CAT_{i}" for i in range(4)],
                "weight": pa.array([10, 11, 12, 13], pa.int64()),
            }
        ),
        dim / "dim.parquet",
    )
    return root


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("dataset"))


@pytest.fixture(scope="session")
def cluster() -> Iterator[dfship.LocalCluster]:
    with dfship.LocalCluster(workers=2) as running:
        yield running


@pytest.fixture
def ctx(cluster: dfship.LocalCluster, dataset: Path) -> dfship.ClusterContext:
    context = cluster.context(bytes_per_partition=1)
    context.register_parquet("facts", dataset / "facts")
    context.register_parquet("dim", dataset / "dim")
    return context


@pytest.fixture
def local(dataset: Path) -> datafusion.SessionContext:
    context = datafusion.SessionContext()
    context.register_parquet("facts", str(dataset / "facts"))
    context.register_parquet("dim", str(dataset / "dim"))
    return context


def sorted_rows(table: pa.Table) -> list[tuple]:
    """Rows in a canonical order, for order-insensitive comparison."""
    rows = [tuple(row.values()) for row in table.to_pylist()]
    return sorted(rows, key=repr)


PLAN_FORMS = ["logical", "physical", "logical_bytes", "physical_bytes"]


def plan_in_form(df: datafusion.DataFrame, form: str) -> Any:
    """The plan of a datafusion-python DataFrame in one of ``PLAN_FORMS``.

    Take it before the DataFrame runs: once a join has run, datafusion 55
    serializes its populated dynamic filter in a form that nobody,
    datafusion-python included, can decode (an upstream bug)."""
    return {
        "logical": df.logical_plan,
        "physical": df.execution_plan,
        "logical_bytes": lambda: df.logical_plan().to_bytes(),
        "physical_bytes": lambda: df.execution_plan().to_bytes(),
    }[form]()
