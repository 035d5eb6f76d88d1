"""End-to-end benchmark: the same queries, data and UDFs on datafusion-python
55, PySpark (local[2], pandas UDFs) and dfship with 1 and 2 worker processes,
side by side in one invocation. Writes results.json, results.md and
results.png into the output folder.

Run through benches/run.sh, which builds the release binaries and the
benchmark's virtual environment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "python"))

import udfs  # noqa: E402

QUERIES = {
    "vectorized": "SELECT category, sum(vec_score(value, qty)) AS s FROM sales GROUP BY category",
    "gil_bound": "SELECT sum(row_score(value)) AS s FROM sales",
    "group_by_join": "SELECT s.region, band(t.value) AS b, count(*) AS n, sum(t.qty) AS q "
    "FROM sales t JOIN stores s ON t.store = s.store GROUP BY s.region, band(t.value)",
}
CATEGORIES = [f"cat_{i}" for i in range(10)]


def make_data(folder: Path, rows: int, files: int) -> None:
    marker = folder / f".done-{rows}-{files}"
    if marker.exists():
        return
    sales = folder / "sales"
    sales.mkdir(parents=True, exist_ok=True)
    per_file = rows // files
    for part in range(files):
        start = part * per_file
        ids = pa.array(range(start, start + per_file), pa.int64())
        table = pa.table(
            {
                "id": ids,
                "store": pc.cast(pc.bit_wise_and(pc.multiply(ids, 7919), 1023), pa.int32()),
                "value": pc.divide(
                    pc.cast(pc.bit_wise_and(pc.multiply(ids, 104729), 65535), pa.float64()), 7.0
                ),
                "qty": pc.cast(pc.add(pc.bit_wise_and(ids, 15), 1), pa.int32()),
                "category": pa.array(
                    [CATEGORIES[i % 10] for i in range(start, start + per_file)], pa.string()
                ),
            }
        )
        pq.write_table(table, sales / f"part-{part:03d}.parquet")
    stores = folder / "stores"
    stores.mkdir(exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "store": pa.array(range(1024), pa.int32()),
                "region": pa.array([f"region_{i % 8}" for i in range(1024)], pa.string()),
            }
        ),
        stores / "stores.parquet",
    )
    marker.touch()


def wall_times(runs: int, body) -> list[float]:
    """Seconds each of `runs` calls of `body` took."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        body()
        times.append(time.perf_counter() - started)
    return times


def timed(runs: int, body) -> list[float]:
    body()  # warm-up
    return wall_times(runs, body)


def bench_datafusion(data: Path, runs: int, queries: dict[str, str] = QUERIES) -> dict[str, list[float]]:
    import datafusion

    ctx = datafusion.SessionContext()
    ctx.register_parquet("sales", str(data / "sales"))
    ctx.register_parquet("stores", str(data / "stores"))
    for u in udfs.ALL:
        ctx.register_udf(datafusion.udf(u.func, u.input_types, u.return_type, u.volatility, name=u.name))
    return {name: timed(runs, lambda q=q: ctx.sql(q).collect()) for name, q in queries.items()}


def spark_session(data: Path):
    """A PySpark local[2] session with the tables and the UDFs (as pandas UDFs) registered."""
    from pyspark.sql import SparkSession
    from pyspark.sql.functions import pandas_udf

    # Spark's Python workers import udfs.py (and dfship.udf) the way ours do: from their path.
    paths = [str(HERE), str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    os.environ["PYSPARK_PYTHON"] = sys.executable

    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.driver.memory", "4g")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    spark.read.parquet(str(data / "sales")).createOrReplaceTempView("sales")
    spark.read.parquet(str(data / "stores")).createOrReplaceTempView("stores")

    # The same functions, as pandas UDFs (Spark hands over pandas Series in Arrow batches).
    def vec_score(value: pd.Series, qty: pd.Series) -> pd.Series:
        return udfs.vec_score_fn(pa.Array.from_pandas(value), pa.Array.from_pandas(qty)).to_pandas()

    def row_score(value: pd.Series) -> pd.Series:
        return udfs.row_score_fn(pa.Array.from_pandas(value)).to_pandas()

    def band(value: pd.Series) -> pd.Series:
        return udfs.band_fn(pa.Array.from_pandas(value)).to_pandas()

    def passthrough(value: pd.Series) -> pd.Series:
        return udfs.passthrough_fn(pa.Array.from_pandas(value)).to_pandas()

    spark.udf.register("vec_score", pandas_udf(vec_score, "double"))
    spark.udf.register("row_score", pandas_udf(row_score, "double"))
    spark.udf.register("band", pandas_udf(band, "long"))
    spark.udf.register("passthrough", pandas_udf(passthrough, "double"))
    return spark


def bench_spark(data: Path, runs: int, queries: dict[str, str] = QUERIES) -> dict[str, list[float]]:
    spark = spark_session(data)
    try:
        return {name: timed(runs, lambda q=q: spark.sql(q).collect()) for name, q in queries.items()}
    finally:
        spark.stop()


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds so far) for every process (/proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[1] is the parent; fields[11], [12] are utime, stime (stat fields 14, 15).
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return table


def tree_cpu(table: dict[int, tuple[int, float]], root: int) -> dict[int, float]:
    """CPU seconds of `root` and each of its descendants (a worker and its UDF runners)."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    seen, stack = {}, [root]
    while stack:
        pid = stack.pop()
        if pid in table and pid not in seen:
            seen[pid] = table[pid][1]
            stack.extend(children.get(pid, []))
    return seen


def cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two samples of one process tree (processes born in between count whole)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


@contextlib.contextmanager
def dfship_workers(count: int, bin_dir: Path, venv: Path, extra_args: tuple[str, ...] = ()):
    """Starts `count` release worker processes on free ports; yields (processes, urls)."""
    processes, urls = [], []
    try:
        for _ in range(count):
            p = subprocess.Popen(
                [str(bin_dir / "dfship-worker"), "--port", "0", "--python-env", str(venv), *extra_args],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            processes.append(p)
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"{bin_dir / 'dfship-worker'} exited before listening; run it by hand")
            urls.append(line.strip().rsplit(" ", 1)[-1])
        yield processes, urls
    finally:
        for p in processes:
            p.terminate()
            p.wait()


def run_dfship_query(
    urls: list[str],
    query: str,
    runs: int,
    data: Path,
    bin_dir: Path,
    venv: Path,
    workers: list[int] = (),
    cpu: list[dict] | None = None,
    extra_args: tuple[str, ...] = (),
) -> list[float]:
    """Runs `query` runs+1 times in one `dfship sql --repeat` process; returns the timings after the first.

    With `cpu` given, appends for each timed run the CPU seconds spent by the
    coordinator's and each worker's process tree (runners included).
    """
    process = subprocess.Popen(
        [
            str(bin_dir / "dfship"),
            "sql",
            "--workers",
            ",".join(urls),
            "--udfs",
            str(HERE / "udfs.py"),
            "--table",
            f"sales={data / 'sales'}",
            "--table",
            f"stores={data / 'stores'}",
            "--repeat",
            str(runs + 1),
            *extra_args,
            query,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "VIRTUAL_ENV": str(venv)},
    )
    roots = {"coordinator": process.pid, **{f"worker {i}": pid for i, pid in enumerate(workers)}}

    def sample() -> dict[str, dict[int, float]]:
        table = process_table()
        return {name: tree_cpu(table, pid) for name, pid in roots.items()}

    samples, lines = [], []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("dfship-timing"):
            samples.append(sample())
    if process.wait() != 0:
        raise RuntimeError(f"dfship sql failed for {query!r}:\n{''.join(lines)}")
    seen = [float(s) for s in re.findall(r"dfship-timing run=\d+ seconds=([0-9.]+)", "".join(lines))]
    if cpu is not None:
        # The first timing line ends the warm-up; each later one ends a timed run.
        for before, after in zip(samples, samples[1:], strict=False):
            cpu.append({name: round(cpu_between(before[name], after[name]), 3) for name in roots})
    return seen[1:]  # the first run is the warm-up


def bench_dfship(
    data: Path,
    runs: int,
    workers: int,
    bin_dir: Path,
    venv: Path,
    queries: dict[str, str] = QUERIES,
    extra_args: tuple[str, ...] = (),
) -> tuple[dict, dict, dict]:
    times, memory, cpu = {}, {}, {}
    for name, query in queries.items():
        # Fresh workers per query, so their peak RSS belongs to this query.
        with dfship_workers(workers, bin_dir, venv, extra_args) as (processes, urls):
            cpu[name] = []
            times[name] = run_dfship_query(
                urls,
                query,
                runs,
                data,
                bin_dir,
                venv,
                [p.pid for p in processes],
                cpu[name],
                extra_args,
            )
            memory[name] = [round(peak_rss_mib(p.pid), 1) for p in processes]
    return times, memory, cpu


def summary(times: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "spread_pct": 100 * (max(times) - min(times)) / statistics.median(times),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data", type=Path, default=ROOT / "target" / "bench-data")
    parser.add_argument("--out", type=Path, default=ROOT / "benches" / "results")
    parser.add_argument("--bin", type=Path, default=ROOT / "target" / "release")
    parser.add_argument(
        "--venv", type=Path, default=ROOT / ".venv", help="the Python environment of the workers"
    )
    parser.add_argument("--skip-spark", action="store_true")
    args = parser.parse_args()

    make_data(args.data, args.rows, args.files)
    results: dict[str, dict] = {}
    memory: dict[str, dict] = {}
    cpu: dict[str, dict] = {}
    print("datafusion-python ...", flush=True)
    results["datafusion-python"] = bench_datafusion(args.data, args.runs)
    systems = [
        ("dfship 1 worker", 1, ()),
        ("dfship 2 workers", 2, ()),
        # Python in the engine's process (one interpreter, one GIL per process), for comparison.
        ("dfship 1 worker in-process", 1, ("--python-mode", "in-process")),
    ]
    for label, workers, extra in systems:
        print(f"{label} ...", flush=True)
        results[label], memory[label], cpu[label] = bench_dfship(
            args.data, args.runs, workers, args.bin, args.venv, extra_args=extra
        )
    if not args.skip_spark:
        print("PySpark local[2] ...", flush=True)
        results["pyspark local[2]"] = bench_spark(args.data, args.runs)

    table = {system: {q: summary(t) for q, t in per_query.items()} for system, per_query in results.items()}
    import datafusion

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "datafusion-python": datafusion.__version__,
        "pyarrow": pa.__version__,
        "rows": args.rows,
        "runs": args.runs,
    }
    if not args.skip_spark:
        import pyspark

        meta["pyspark"] = pyspark.__version__
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "summary": table,
                "times": results,
                "worker_peak_rss_mib": memory,
                "cpu_seconds_per_run": cpu,
            },
            indent=2,
        )
    )
    (args.out / "results.md").write_text(render(meta, table, memory, cpu, results))
    chart(table, args.out / "results.png")
    print(render(meta, table, memory, cpu, results))
    return 0


def render(meta: dict, table: dict, memory: dict, cpu: dict, times: dict) -> str:
    base = table["datafusion-python"]
    lines = [
        f"Measured {meta['date']} on {meta['machine']}; Python {meta['python']}, datafusion-python "
        f"{meta['datafusion-python']}, pyarrow {meta['pyarrow']}"
        + (f", PySpark {meta['pyspark']}" if "pyspark" in meta else "")
        + f"; {meta['rows']:,} rows, median of {meta['runs']} runs after a warm-up "
        "(spread = (max-min)/median).",
        "",
        "| query | system | median s | spread | vs datafusion-python |",
        "|---|---|---:|---:|---:|",
    ]
    for query in QUERIES:
        for system, per_query in table.items():
            s = per_query[query]
            ratio = s["median"] / base[query]["median"]
            lines.append(
                f"| {query} | {system} | {s['median']:.2f} | {s['spread_pct']:.0f}% | {ratio:.2f}× time |"
            )
    lines += [
        "",
        "Peak RSS of each worker process per query (MiB):",
        "",
        "| query | " + " | ".join(memory) + " |",
        "|---|" + "---|" * len(memory),
    ]
    for query in QUERIES:
        lines.append(
            f"| {query} | " + " | ".join(", ".join(str(m) for m in memory[s][query]) for s in memory) + " |"
        )
    lines += [
        "",
        "CPU seconds per run (median over runs) of each process tree — the coordinator and each worker,",
        "their UDF runners included — and CPU-seconds / wall (2 cores: at most 2.0):",
        "",
        "| query | system | coordinator | workers | CPU / wall |",
        "|---|---|---:|---|---:|",
    ]
    for query in QUERIES:
        for system, per_query in cpu.items():
            runs = per_query[query]
            if not runs:
                continue
            names = [n for n in runs[0] if n != "coordinator"]
            coordinator = statistics.median(r["coordinator"] for r in runs)
            workers = [statistics.median(r[n] for r in runs) for n in names]
            used = statistics.median(
                sum(r.values()) / wall for r, wall in zip(runs, times[system][query], strict=False)
            )
            lines.append(
                f"| {query} | {system} | {coordinator:.2f} | "
                + ", ".join(f"{w:.2f}" for w in workers)
                + f" | {used:.2f} |"
            )
    return "\n".join(lines) + "\n"


def chart(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(table)
    queries = list(QUERIES)
    width = 0.8 / len(systems)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, system in enumerate(systems):
        medians = [table[system][q]["median"] for q in queries]
        errors = [
            [table[system][q]["median"] - table[system][q]["min"] for q in queries],
            [table[system][q]["max"] - table[system][q]["median"] for q in queries],
        ]
        ax.bar(
            [x + i * width for x in range(len(queries))], medians, width, yerr=errors, label=system, capsize=3
        )
    ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(queries))], queries)
    ax.set_ylabel("seconds (median, min–max)")
    ax.set_title("Python UDF queries, end to end")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
