"""What environments cost, side by side in one run (2 workers x 1 runner,
release wheel, one machine, so both workers share one environment cache):

- **requirements** (a wheel from a shipped wheelhouse, installed with pip
  into a venv layered on the worker's packages): the first query in a new
  environment (it builds), the next queries (built, runners entered), and
  the first query of a fresh cluster whose cache already holds it (runners
  start and enter, nothing is built); beside the same query with no
  environment;
- **a 5 MB working_dir**: the first query (the files reach each worker
  inside the UDF's pickle and are unpacked once) and the next ones (the
  payload store already holds the pickle: plans name it by digest), beside
  a fresh context each query (the files are pickled and checked again, the
  workers' payload stores still answer by digest).

Usage: python environments.py [--out DIR] [--runs N]. Writes
environments.md and environments.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

import dfship

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python" / "tests"))
from test_environments import wheel  # noqa: E402 - the tests' hand-made wheel

QUERY = "SELECT sum({udf}(v)) AS s FROM t"
# Which dfship wheel is installed here (benches/run.sh installs the release one).
WHEEL = os.environ.get("DFSHIP_BENCH_WHEEL", "release wheel")
ROWS = 200_000


def bonus(v: pa.Array) -> pa.Array:
    import pyarrow.compute as pc
    import tinypkg

    return pc.add(v, tinypkg.BONUS)


def plain(v: pa.Array) -> pa.Array:
    import pyarrow.compute as pc

    return pc.add(v, 1)


def from_working_dir(v: pa.Array) -> pa.Array:
    import pyarrow.compute as pc
    import settings_module

    return pc.add(v, settings_module.BONUS)


def timed(ctx: dfship.ClusterContext, udf: str) -> float:
    started = time.perf_counter()
    ctx.sql(QUERY.format(udf=udf)).collect()
    return time.perf_counter() - started


def context(cluster: dfship.LocalCluster, data: Path, **environment: Any) -> dfship.ClusterContext:
    ctx = cluster.context(**environment)
    ctx.register_parquet("t", str(data))
    return ctx


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "benches" / "results")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="dfship-bench-env-") as tmp:
        root = Path(tmp)
        data = root / "t"
        data.mkdir()
        pq.write_table(pa.table({"v": pa.array(range(ROWS), pa.int64())}), data / "part-0.parquet")
        wheelhouse = root / "wheelhouse"
        wheel(wheelhouse, "tinypkg", "1.0", "BONUS = 1\n")
        project = root / "project"
        project.mkdir()
        (project / "settings_module.py").write_text("BONUS = 3\n")
        (project / "blob.bin").write_bytes(os.urandom(5 * 2**20))
        cache = root / "cache"
        env = {"DFSHIP_ENVIRONMENT_CACHE": str(cache)}
        os.environ.update(env)  # this process's runners (a query's last stage) share it
        args_ = ["--python-runners", "1"]
        with dfship.LocalCluster(workers=2, worker_args=args_, env=env) as cluster:
            base = context(cluster, data)
            base.register_udf(dfship.udf([pa.int64()], pa.int64(), "immutable", name="plain")(plain))
            timed(base, "plain")
            results["no environment"] = [timed(base, "plain") for _ in range(args.runs)]

            ctx = context(cluster, data, requirements=["tinypkg==1.0"], wheelhouse=wheelhouse)
            ctx.register_udf(dfship.udf([pa.int64()], pa.int64(), "immutable", name="bonus")(bonus))
            results["requirements: first query (builds)"] = [timed(ctx, "bonus")]
            results["requirements: next queries"] = [timed(ctx, "bonus") for _ in range(args.runs)]
            build_log = (cache / "builds.log").read_text().split()
            build_seconds = float(build_log[2])

            shipped = context(cluster, data, working_dir=project)
            shipped.register_udf(
                dfship.udf([pa.int64()], pa.int64(), "immutable", name="wd")(from_working_dir)
            )
            results["5 MB working_dir: first query (ships, unpacks)"] = [timed(shipped, "wd")]
            results["5 MB working_dir: next queries"] = [timed(shipped, "wd") for _ in range(args.runs)]
            fresh = []
            for _ in range(args.runs):
                again = context(cluster, data, working_dir=project)
                again.register_udf(
                    dfship.udf([pa.int64()], pa.int64(), "immutable", name="wd")(from_working_dir)
                )
                fresh.append(timed(again, "wd"))
            results["5 MB working_dir: a new context per query"] = fresh
            archive_bytes = len(shipped.environment.archive) if shipped.environment else 0
        with dfship.LocalCluster(workers=2, worker_args=args_, env=env) as cluster:
            ctx = context(cluster, data, requirements=["tinypkg==1.0"], wheelhouse=wheelhouse)
            ctx.register_udf(dfship.udf([pa.int64()], pa.int64(), "immutable", name="bonus")(bonus))
            results["requirements: first query of a new cluster, cache built"] = [timed(ctx, "bonus")]
    lines = [
        "## What environments cost",
        "",
        f"`benches/e2e/environments.py`: `{QUERY.format(udf='udf')}` over {ROWS:,} rows, 2 workers x 1 "
        f"runner on one two-core machine (one shared environment cache), {WHEEL}, side by side in "
        f"one run; median of {args.runs} queries where several ran. pip installs one wheel from a "
        f"shipped wheelhouse (the build itself took {build_seconds:.2f} s, from the cache's log); the "
        f"working_dir zip is {archive_bytes / 2**20:.1f} MiB.",
        "",
        "| case | median (s) | best (s) | queries |",
        "|---|---|---|---|",
    ]
    for name, times in results.items():
        lines.append(f"| {name} | {statistics.median(times):.3f} | {min(times):.3f} | {len(times)} |")
    lines.append("")
    (args.out / "environments.md").write_text("\n".join(lines))
    (args.out / "environments.json").write_text(
        json.dumps(
            {
                "rows": ROWS,
                "build_seconds": build_seconds,
                "archive_bytes": archive_bytes,
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
