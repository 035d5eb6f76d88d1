"""What bringing UDF output back costs, side by side in one run: one local
cluster of 2 workers x 2 runners, the same query over the same data with

- a silent vectorized UDF;
- the same UDF printing one line per batch (``udf_output="client"``, the
  default: lines go to the workers' logs and come back to this process);
- the same, ``udf_output="worker"`` (the workers' logs only).

Also the capture's own cost per call when a UDF prints nothing: the runner's
per-call capture set-up and tear-down (a ``Capture``, the context variable,
the empty body check), timed on its own in the runner's code.

Usage: python udf_output.py [--out DIR] [--runs N] [--rows N]. Writes
udf_output.md and udf_output.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import timeit
import types
from pathlib import Path

import cloudpickle
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import dfship

cloudpickle.register_pickle_by_value(sys.modules[__name__])

QUERY = "SELECT sum({udf}(v)) AS s FROM t"
FILES = 8


def silent(v: pa.Array) -> pa.Array:
    return pc.multiply(v, 2)


def printing(v: pa.Array) -> pa.Array:
    print(f"a batch of {len(v)} rows, first {v[0]}")
    return pc.multiply(v, 2)


def write_data(root: Path, rows: int) -> None:
    per_file = rows // FILES
    for part in range(FILES):
        ids = pa.array(range(part * per_file, (part + 1) * per_file), pa.int64())
        pq.write_table(pa.table({"v": ids}), root / f"part-{part}.parquet", row_group_size=8192)


def timed(ctx: dfship.ClusterContext, udf: str, runs: int) -> list[float]:
    query = QUERY.format(udf=udf)
    ctx.sql(query).collect(on_output=lambda line: None)  # warm: runners, payloads
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        ctx.sql(query).collect(on_output=lambda line: None)
        times.append(time.perf_counter() - started)
    return times


def capture_cost_us(samples: int = 200_000) -> float:
    """Microseconds per call of the runner's capture when the UDF writes nothing."""
    root = Path(__file__).resolve().parents[2]
    source = (root / "crates" / "dfship-runtime" / "runner" / "dfship_runner.py").read_text()
    runner = types.ModuleType("dfship_runner")
    exec(compile(source, "dfship_runner.py", "exec"), runner.__dict__)  # noqa: S102 - the project's own runner

    def one_call() -> None:
        capture = runner.Capture()
        token = runner._capture.set(capture)
        runner._capture.reset(token)
        if capture.body() is not None:
            raise AssertionError("a silent call has no output")

    seconds = min(timeit.repeat(one_call, number=samples, repeat=5))
    return seconds / samples * 1e6


def spread(times: list[float]) -> str:
    return f"{min(times):.3f}–{max(times):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--rows", type=int, default=4_000_000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float | list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="dfship-bench-output-") as tmp:
        data = Path(tmp) / "t"
        data.mkdir()
        write_data(data, args.rows)
        with dfship.LocalCluster(workers=2, worker_args=["--python-runners", "2"]) as cluster:
            for mode in ("client", "worker"):
                ctx = cluster.context(bytes_per_partition=1, udf_output=mode)
                ctx.register_parquet("t", str(data))
                ctx.register_udf(dfship.udf([pa.int64()], pa.int64(), "immutable", name="silent")(silent))
                ctx.register_udf(dfship.udf([pa.int64()], pa.int64(), "immutable", name="printing")(printing))
                if mode == "client":
                    lines: list[dict[str, object]] = []
                    ctx.sql(QUERY.format(udf="printing")).collect(on_output=lines.append)
                    batches = len(lines)
                    results["silent"] = {"times": timed(ctx, "silent", args.runs)}
                results[f"printing, udf_output={mode}"] = {"times": timed(ctx, "printing", args.runs)}
    for entry in results.values():
        times = entry["times"]
        assert isinstance(times, list)
        entry["best_s"] = min(times)
        entry["median_s"] = statistics.median(times)
    base = results["silent"]
    capture_us = capture_cost_us()
    lines_md = [
        "## What bringing UDF output back costs",
        "",
        f"`benches/e2e/udf_output.py`: `{QUERY.format(udf='udf')}` over {args.rows:,} rows in {FILES} "
        f"Parquet files ({batches} batches: one UDF call each), a vectorized UDF silent or printing one "
        "line per batch; 2 workers x 2 runners on one two-core machine, one local cluster, side by "
        f"side in one run, release wheel. Best and median of {args.runs} queries after a warm-up; "
        "spread is best–worst.",
        "",
        "| UDF | best (s) | median (s) | spread (s) | best / silent |",
        "|---|---|---|---|---|",
    ]
    for name, entry in results.items():
        times = entry["times"]
        assert isinstance(times, list)
        ratio = float(entry["best_s"]) / float(base["best_s"])
        lines_md.append(
            f"| {name} | {entry['best_s']:.3f} | {entry['median_s']:.3f} | {spread(times)} | {ratio:.2f}× |"
        )
    printed = float(results["printing, udf_output=client"]["best_s"])
    per_batch_us = (printed - float(base["best_s"])) / max(batches, 1) * 1e6
    lines_md += [
        "",
        f"- A printed line costs {per_batch_us:.0f} µs per batch end to end (best printing − best "
        "silent, over the batches; noise can make it negative).",
        f"- The capture of a call that prints nothing costs {capture_us:.2f} µs in the runner "
        "(set-up, tear-down and the empty check, timed alone); nothing is sent for such a call.",
        "",
    ]
    (args.out / "udf_output.md").write_text("\n".join(lines_md))
    summary = {
        "rows": args.rows,
        "batches": batches,
        "capture_us_per_silent_call": capture_us,
        "printed_line_us_per_batch": per_batch_us,
        "machine_cores": os.cpu_count(),
        "results": results,
    }
    (args.out / "udf_output.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(lines_md))


if __name__ == "__main__":
    main()
