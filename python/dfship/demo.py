"""``python -m dfship demo --workers URLS``: the demo queries on a running cluster.

A smoke test for a deployed cluster (compose, Kubernetes): it makes a small
``trips``/``zones`` dataset in memory (it travels inside the plans, so no
shared filesystem is needed), runs the queries of ``dfship demo`` with their
Python UDFs shipped inline, and prints each result and the workers it saw.
Exit status 0 when every query succeeded.

    python -m dfship demo --workers dns://dfship-workers:8000 \\
        --cluster-key-file /run/secrets/cluster_key
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib import resources
from pathlib import Path

import pyarrow as pa

CITIES = [" Lisbon", "Porto ", "FARO", "braga", "Lisbon"]
ZONES = [("lisbon", "South"), ("faro", "South"), ("porto", "North"), ("braga", "North")]


def trips(rows: int) -> pa.Table:
    """The same columns as ``dfship demo``'s generated Parquet files."""
    ids = range(rows)
    return pa.table(
        {
            "trip_id": pa.array(ids, pa.int64()),
            "city": pa.array([CITIES[v % 5] for v in ids], pa.string()),
            "distance_km": pa.array([(v * 7919) % 2500 / 100.0 for v in ids], pa.float64()),
            "fare": pa.array([(v * 104729) % 6000 / 100.0 for v in ids], pa.float64()),
        }
    )


def zones() -> pa.Table:
    return pa.table({"key": [k for k, _ in ZONES], "zone": [z for _, z in ZONES]})


def write_dataset(root: Path, rows: int, files: int = 8) -> dict[str, str]:
    """``trips`` in ``files`` Parquet files and ``zones`` under ``root``; their folders by table."""
    import pyarrow.parquet as pq

    folders = {"trips": root / "trips", "zones": root / "zones"}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.parquet"):
            old.unlink()
    table = trips(rows)
    per_file = max(1, -(-rows // files))
    for index, start in enumerate(range(0, rows, per_file)):
        pq.write_table(table.slice(start, per_file), folders["trips"] / f"part-{index}.parquet")
    pq.write_table(zones(), folders["zones"] / "zones.parquet")
    return {name: str(folder) for name, folder in folders.items()}


def queries() -> list[tuple[str, str]]:
    """``(title, sql)`` of ``_demo_queries.sql``, shared with the Rust CLI's demo."""
    text = resources.files("dfship").joinpath("_demo_queries.sql").read_text()
    out: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("-- title: "):
            out.append((line.removeprefix("-- title: ").strip(), []))
        elif out and not line.startswith("--"):
            out[-1][1].append(line.split(";")[0])
    return [(title, " ".join(" ".join(lines).split())) for title, lines in out]


def _format(table: pa.Table) -> str:
    rows = table.to_pylist()
    lines = [" | ".join(table.column_names)]
    lines += [" | ".join(str(row[name]) for name in table.column_names) for row in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m dfship demo", description=__doc__.split("\n\n")[1])
    parser.add_argument(
        "--workers",
        default=os.environ.get("DFSHIP_WORKERS"),
        help="worker URLs (comma-separated), dns://NAME:PORT or file:///PATH (env DFSHIP_WORKERS)",
    )
    parser.add_argument(
        "--cluster-key-file", help="the cluster key (else DFSHIP_CLUSTER_KEY, as for workers)"
    )
    parser.add_argument(
        "--data-dir",
        help="write the dataset as Parquet files here, a folder every worker reads at the same path "
        "(else the tables are in memory: they travel in the plans and their scans, with the UDFs "
        "evaluated on them, run in this process)",
    )
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the trips table")
    parser.add_argument("--repeat", type=int, default=1, help="run the queries this many times")
    args = parser.parse_args(argv)
    if not args.workers:
        parser.error("--workers (or DFSHIP_WORKERS) is required: e.g. --workers dns://dfship-workers:8000")

    import cloudpickle

    from dfship import ClusterContext, _demo_udfs

    # The UDFs travel inline, by value: the workers need not have this module.
    cloudpickle.register_pickle_by_value(_demo_udfs)
    # Small files spread over every worker, as in `dfship demo`.
    ctx = ClusterContext(args.workers, cluster_key_file=args.cluster_key_file, bytes_per_partition=1)
    if args.data_dir:
        for name, path in write_dataset(Path(args.data_dir), args.rows).items():
            ctx.register_parquet(name, path)
    else:
        ctx.register_arrow("trips", trips(args.rows))
        ctx.register_arrow("zones", zones())
    for udf in (
        _demo_udfs.fare_per_km,
        _demo_udfs.fare_band,
        _demo_udfs.is_long_trip,
        _demo_udfs.city_key,
        _demo_udfs.MeanFare,
        _demo_udfs.RunningRevenue,
    ):
        ctx.register_udf(udf)  # type: ignore[arg-type]
    for run in range(args.repeat):
        for title, sql in queries():
            started = time.monotonic()
            table = ctx.sql(sql).collect()
            took = time.monotonic() - started
            print(f"\n== {title}\n{_format(table)}\n{table.num_rows} rows in {took:.2f} s")
        live = [url for url, state, _ in ctx.workers_status() if state == "live"]
        print(
            f"\ndemo: run {run + 1}: {len(queries())} queries ok; live workers {len(live)}: {', '.join(live)}"
        )
    stats = ctx.retry_stats()
    print(f"demo: retries {stats}")
    sys.stdout.flush()
    return 0
