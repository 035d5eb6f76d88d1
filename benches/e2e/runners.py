"""Python UDFs as production workloads use them, on dfship (release binaries):

- model loading: a class UDF whose __init__ takes 2 s and builds a 50 MB
  table, 3 queries in a row in one coordinator, against the same model in a
  closure (built once on the coordinator and shipped in the plan);
- async: 10,000 rows, batch_size=50, each call awaiting 50 ms, one worker,
  against the same UDF written synchronously.

Usage: python runners.py [--out DIR] (benches/run.sh runs it). Writes
runners.md and runners.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time
from pathlib import Path

import run_e2e

HERE = Path(__file__).resolve().parent
UDFS = HERE / "runner_udfs"


def dfship_runs(urls: list[str], udf_file: Path, query: str, runs: int, args: argparse.Namespace):
    """Runs `query` `runs` times in one `dfship sql --repeat` process; returns every run's seconds."""
    data, bin_dir, venv = args.data, args.bin, args.venv
    started = time.monotonic()
    process = subprocess.run(
        [
            str(bin_dir / "dfship"),
            "sql",
            "--workers",
            ",".join(urls),
            "--udfs",
            str(udf_file),
            "--table",
            f"sales={data / 'sales'}",
            "--repeat",
            str(runs),
            query,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "VIRTUAL_ENV": str(venv)},
        check=False,
    )
    total = time.monotonic() - started
    if process.returncode != 0:
        raise RuntimeError(f"dfship sql failed for {query!r}:\n{process.stderr}")
    seen = [float(s) for s in re.findall(r"dfship-timing run=\d+ seconds=([0-9.]+)", process.stderr)]
    return seen, total


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--data", type=Path, default=run_e2e.ROOT / "target" / "bench-data-aggregates")
    parser.add_argument("--out", type=Path, default=run_e2e.ROOT / "benches" / "results")
    parser.add_argument("--bin", type=Path, default=run_e2e.ROOT / "target" / "release")
    parser.add_argument("--venv", type=Path, default=run_e2e.ROOT / ".venv")
    args = parser.parse_args()
    run_e2e.make_data(args.data, args.rows, 8)
    results: dict[str, dict] = {}
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on 2 cores, release binaries.",
        "",
    ]

    model_query = "SELECT sum(model(id)) AS s FROM sales WHERE id % 4 = 0"
    lines += [
        "### Model loading: 3 queries in a row (2 workers, 2 runners each)",
        "",
        "| model | query 1 s | query 2 s | query 3 s | coordinator process s (UDF file load included) |",
        "|---|---:|---:|---:|---:|",
    ]
    models = [
        ("class UDF (`__init__` per runner)", "model_class.py"),
        ("closure (50 MB pickle)", "model_closure.py"),
    ]
    for label, file in models:
        with run_e2e.dfship_workers(2, args.bin, args.venv) as (_, urls):
            runs, total = dfship_runs(urls, UDFS / file, model_query, 3, args)
        results[label] = {"runs": runs, "process": total}
        lines.append(f"| {label} | " + " | ".join(f"{r:.2f}" for r in runs) + f" | {total:.2f} |")

    service_query = "SELECT sum({udf}(id)) AS s FROM sales WHERE id < 10000"
    lines += [
        "",
        "### A UDF awaiting a 50 ms service per call (10,000 rows, batch_size=50, 1 worker)",
        "",
        "| UDF | median s | vs sync |",
        "|---|---:|---:|",
    ]
    timings = {}
    for udf in ["sync_lookup", "async_lookup"]:
        with run_e2e.dfship_workers(1, args.bin, args.venv) as (_, urls):
            runs, _ = dfship_runs(urls, UDFS / "service.py", service_query.format(udf=udf), 4, args)
        timings[udf] = run_e2e.summary(runs[1:])["median"]
        results[udf] = {"runs": runs}
    for udf in ["sync_lookup", "async_lookup"]:
        lines.append(f"| {udf} | {timings[udf]:.2f} | {timings['sync_lookup'] / timings[udf]:.1f}× faster |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runners.json").write_text(json.dumps(results, indent=2))
    (args.out / "runners.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
