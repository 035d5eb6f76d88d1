"""What authentication and runner isolation cost per query, side by side in
one run: three local clusters of 2 workers x 2 runners, the same small
query with a Python UDF on each, one after the other:

- open: no cluster key;
- keyed: the cluster key (identity challenge per connection, a proof per
  request, a tag per request message);
- keyed + query isolation (`--runner-isolation query`): each query gets
  runners of its own, replaced by fresh processes when it ends.

Queries run back to back (a query's replacements are still starting when
the next one comes: it waits for them) and with a pause between them (the
replacements are ready by then). Also: how long a runner's start takes
(its imports and pyarrow's compute warm-up, in a bare `python -c`), the work
query isolation adds per runner a query uses.

Usage: python isolation.py [--out DIR] [--runs N] [--pause S]. Writes
isolation.md and isolation.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cloudpickle
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import dfship

cloudpickle.register_pickle_by_value(sys.modules[__name__])

QUERY = "SELECT g, sum(scaled(v)) AS s, count(*) AS c FROM t GROUP BY g ORDER BY g"


def scaled(v: pa.Array) -> pa.Array:
    return pc.multiply(pc.sqrt(v), 2.5)


def write_data(root: Path, rows: int, files: int = 4) -> None:
    per_file = rows // files
    for part in range(files):
        ids = pa.array(range(part * per_file, (part + 1) * per_file), pa.int64())
        table = pa.table({"g": pc.bit_wise_and(ids, 7), "v": pc.cast(ids, pa.float64())})
        pq.write_table(table, root / f"part-{part}.parquet")


RUNNER_START = (
    "import pyarrow as pa, pyarrow.compute as pc, pyarrow.ipc, cloudpickle; pc.add(pa.array([0]), 1)"
)


def runner_start_seconds(samples: int = 5) -> float:
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", RUNNER_START], check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(ctx: dfship.ClusterContext, runs: int, pause: float) -> list[float]:
    ctx.sql(QUERY).collect()  # warm: runners, payloads
    times = []
    for _ in range(runs):
        if pause:
            time.sleep(pause)
        started = time.perf_counter()
        ctx.sql(QUERY).collect()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--pause", type=float, default=1.5)
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    udf = dfship.udf([pa.float64()], pa.float64(), "immutable", name="scaled")(scaled)
    setups = [
        ("open", {"key": False}, []),
        ("keyed", {}, []),
        ("keyed + query isolation", {}, ["--runner-isolation", "query"]),
    ]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="dfship-bench-isolation-") as tmp:
        data = Path(tmp) / "t"
        data.mkdir()
        write_data(data, args.rows)
        for name, options, flags in setups:
            worker_args = ["--python-runners", "2", *flags]
            with dfship.LocalCluster(workers=2, worker_args=worker_args, **options) as cluster:
                ctx = cluster.context(bytes_per_partition=1)
                ctx.register_udf(udf)
                ctx.register_parquet("t", str(data))
                back_to_back = measure(ctx, args.runs, 0.0)
                paused = measure(ctx, args.runs, args.pause)
            results[name] = {
                "back_to_back_median_s": statistics.median(back_to_back),
                "paused_median_s": statistics.median(paused),
            }
    start = runner_start_seconds()
    base = results["open"]
    lines = [
        "## Authentication and runner isolation: cost per query",
        "",
        f"`benches/e2e/isolation.py`: `{QUERY}` over {args.rows:,} rows in 4 Parquet files, the "
        "vectorized UDF `scaled(v)`; 2 workers x 2 runners on one two-core machine, each setup its "
        f"own local cluster, one after the other in one run. Median of {args.runs} queries after "
        f"a warm-up, back to back and with {args.pause} s between queries.",
        "",
        "| setup | back to back | vs open | with pauses | vs open |",
        "|---|---|---|---|---|",
    ]
    for name, measured in results.items():
        lines.append(
            f"| {name} | {measured['back_to_back_median_s'] * 1000:.0f} ms | "
            f"{measured['back_to_back_median_s'] / base['back_to_back_median_s']:.2f}x | "
            f"{measured['paused_median_s'] * 1000:.0f} ms | "
            f"{measured['paused_median_s'] / base['paused_median_s']:.2f}x |"
        )
    lines += [
        "",
        f"A runner's start (a bare `python -c` importing pyarrow and cloudpickle and making "
        f"pyarrow's first compute call, as a runner does before READY): {start * 1000:.0f} ms "
        "(median of 5). Query isolation replaces every runner a query used once it ends: that "
        "start, on the worker's cores, is its cost per query and runner used; back to back, the "
        "next query waits for it, with pauses the replacements are ready before it comes.",
    ]
    text = "\n".join(lines) + "\n"
    (args.out / "isolation.md").write_text(text)
    record = {"results": results, "runner_start_s": start, "rows": args.rows, "runs": args.runs}
    (args.out / "isolation.json").write_text(json.dumps(record, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
