"""Aggregate and window UDFs: datafusion-python against dfship, side by side.

Usage: python aggregates.py [--rows N] [--runs N] [--out DIR] (benches/run.sh runs it)

The same accumulator and evaluator classes (benches/e2e/udfs.py) run in
datafusion-python, which calls a Python accumulator once per group per batch
(DataFusion's per-group adapter) on one interpreter, and on dfship workers,
whose accumulators live in runners (one call per batch covering every group
it touches; states leave the runner only when DataFusion asks). A GROUP BY
with 10 groups and one with 1,024 show both; a window function over 1,024
partitions shows the per-partition cost; a window function of its frame
(ROWS 5 PRECEDING and UNBOUNDED PRECEDING, 20,000 rows in 2 partitions)
shows frames fetched in one call per partition against datafusion-python's
call per row. Writes aggregates.md and aggregates.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import run_e2e
import udfs

QUERIES = {
    "udaf_10_groups": "SELECT category, wmean(value, qty) AS m FROM sales GROUP BY category",
    "udaf_1024_groups": "SELECT store, wmean(value, qty) AS m FROM sales GROUP BY store",
    "udwf_1024_partitions": "SELECT max(r) AS m FROM (SELECT running(value) OVER "
    "(PARTITION BY store ORDER BY id) AS r FROM sales)",
    "udwf_frames_rows_5": "SELECT max(m) AS m FROM (SELECT frame_mean(value) OVER (PARTITION BY id % 2 "
    "ORDER BY id ROWS BETWEEN 5 PRECEDING AND CURRENT ROW) AS m FROM sales WHERE id < 20000)",
    "udwf_frames_unbounded": "SELECT max(m) AS m FROM (SELECT frame_mean(value) OVER (PARTITION BY id % 2 "
    "ORDER BY id ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS m FROM sales WHERE id < 20000)",
}


def bench_datafusion(data: Path, runs: int) -> dict[str, list[float]]:
    import datafusion

    ctx = datafusion.SessionContext()
    ctx.register_parquet("sales", str(data / "sales"))
    for u in udfs.AGGREGATES:
        ctx.register_udaf(
            datafusion.udaf(
                u.accumulator, u.input_types, u.return_type, u.state_types, u.volatility, name=u.name
            )
        )
    for u in udfs.WINDOWS:
        ctx.register_udwf(
            datafusion.udwf(u.evaluator, u.input_types, u.return_type, u.volatility, name=u.name)
        )
    return {name: run_e2e.timed(runs, lambda q=q: ctx.sql(q).collect()) for name, q in QUERIES.items()}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data", type=Path, default=run_e2e.ROOT / "target" / "bench-data-aggregates")
    parser.add_argument("--out", type=Path, default=run_e2e.ROOT / "benches" / "results")
    parser.add_argument("--bin", type=Path, default=run_e2e.ROOT / "target" / "release")
    parser.add_argument("--venv", type=Path, default=run_e2e.ROOT / ".venv")
    args = parser.parse_args()

    run_e2e.make_data(args.data, args.rows, args.files)
    results = {"datafusion-python": bench_datafusion(args.data, args.runs)}
    for label, workers, extra in [
        ("dfship 1 worker", 1, ()),
        ("dfship 2 workers", 2, ()),
        ("dfship 1 worker in-process", 1, ("--python-mode", "in-process")),
    ]:
        print(f"{label} ...", flush=True)
        results[label], _, _ = run_e2e.bench_dfship(
            args.data, args.runs, workers, args.bin, args.venv, queries=QUERIES, extra_args=extra
        )
    table = {system: {q: run_e2e.summary(t) for q, t in per.items()} for system, per in results.items()}
    base = table["datafusion-python"]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {args.rows:,} rows, "
        f"median of {args.runs} runs after a warm-up.",
        "",
        "| query | system | median s | spread | vs datafusion-python |",
        "|---|---|---:|---:|---:|",
    ]
    for query in QUERIES:
        for system, per in table.items():
            s = per[query]
            lines.append(
                f"| {query} | {system} | {s['median']:.2f} | {s['spread_pct']:.0f}% | "
                f"{s['median'] / base[query]['median']:.2f}× time |"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "aggregates.json").write_text(json.dumps({"summary": table, "times": results}, indent=2))
    (args.out / "aggregates.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
