"""Where the time of the GIL-bound query goes, on PySpark local[2] and on dfship
with 2 workers, measured side by side in one invocation.

For each engine the script runs the query `--runs` times after a warm-up and
records, per query:

- wall time;
- CPU time of every process of the engine (utime + stime from /proc: the JVM
  and Spark's Python workers; dfship's coordinator and workers);
- the part of it spent in the UDF's own Python code, sampled with py-spy
  (`--gil`: only the thread holding the GIL counts) and split by source line;
- the same query with a UDF that returns its input (`passthrough`), which is
  what the engine costs without the UDF's work.

It also times the bare function over the whole dataset in one process: the
floor no engine can beat on two cores is half of that. Writes profile.md and
profile.json into the output folder.

Run after run_e2e.py (it reuses its data and binaries): benches/run.sh does.
"""

from __future__ import annotations

import argparse
import json
import linecache
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import run_e2e  # also puts the dfship package on sys.path for udfs.py
from run_e2e import HERE, ROOT, dfship_workers, run_dfship_query, spark_session, summary, wall_times

udfs = run_e2e.udfs

QUERY = "SELECT sum(row_score(value)) AS s FROM sales"
BASELINE = "SELECT sum(passthrough(value)) AS s FROM sales"
RATE = 100  # py-spy samples per second
TICK = os.sysconf("SC_CLK_TCK")
PY_SPY = Path(sys.executable).with_name("py-spy")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def descendants(root: int) -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process below `root`."""
    parent, cmd = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        for child, p in parent.items():
            if p == pid and child not in found:
                found[child] = (pid, cmd.get(child, ""))
                frontier.append(child)
    return found


class PySpy:
    """py-spy recording a set of processes (and their children) until stopped."""

    def __init__(self, pids: list[int], out: Path):
        self.files = [out.with_name(f"{out.stem}-{pid}.raw") for pid in pids]
        self.procs = [
            subprocess.Popen(
                [str(PY_SPY), "record", "--pid", str(pid), "--subprocesses", "--gil", "--nonblocking"]
                + ["--rate", str(RATE), "--format", "raw", "--output", str(f)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for pid, f in zip(pids, self.files, strict=True)
        ]
        time.sleep(1.0)  # let py-spy attach before the measured runs

    def stop(self) -> Counter:
        """Stops recording; returns samples by category (see `classify`)."""
        for p in self.procs:
            p.send_signal(signal.SIGINT)
        counts: Counter = Counter()
        for p, f in zip(self.procs, self.files, strict=True):
            _, err = p.communicate(timeout=60)
            if not f.exists():
                raise RuntimeError(f"py-spy wrote no profile ({f}); it said:\n{err}")
            for line in f.read_text().splitlines():
                stack, _, n = line.rpartition(" ")
                counts[classify(stack.split(";"))] += int(n)
        return counts


def classify(frames: list[str]) -> str:
    """A sample's category: the UDF line it was on, or where else the GIL was held."""
    for frame in reversed(frames):
        # By value (dfship's --udfs file) the code's file name is cloudpickle's "<dynamic-code>".
        m = re.match(r"(row_score_fn|passthrough_fn) \((?:.*/)?(?:udfs\.py|<dynamic-code>):(\d+)\)", frame)
        if m:
            source = linecache.getline(str(HERE / "udfs.py"), int(m.group(2))).strip()
            return f"UDF `{source}`"
    if any("pyspark" in f or "serializers.py" in f for f in frames):
        return "Spark Python worker outside the UDF (Arrow/pandas batches, socket I/O)"
    if any("run_e2e.py" in f for f in frames):
        return "pandas UDF wrapper (pandas <-> Arrow conversion)"
    return "other Python"


def time_function_alone(data: Path) -> float:
    """Seconds the bare row_score_fn takes over every value, in 8192-row batches, one process."""
    table = pq.read_table(data / "sales", columns=["value"])
    batches = table.column("value").combine_chunks()
    started = time.perf_counter()
    for offset in range(0, len(batches), 8192):
        udfs.row_score_fn(batches.slice(offset, 8192))
    return time.perf_counter() - started


def per_query(walls: list[float], cpu: dict[str, float], executions: int, samples: Counter) -> dict:
    """Wall time of the timed runs; CPU seconds and GIL seconds (py-spy samples) per execution."""
    wall = summary(walls)
    return {
        "wall_s": wall["median"],
        "spread_pct": wall["spread_pct"],
        "cpu_s": {k: v / executions for k, v in cpu.items()},
        "gil_s": {k: n / RATE / executions for k, n in samples.most_common()},
    }


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def profile_datafusion(data: Path, runs: int, raw: Path) -> dict:
    import datafusion

    ctx = datafusion.SessionContext()
    ctx.register_parquet("sales", str(data / "sales"))
    for u in udfs.ALL:
        ctx.register_udf(datafusion.udf(u.func, u.input_types, u.return_type, u.volatility, name=u.name))
    result = {}
    for name, query in (("row_score", QUERY), ("passthrough", BASELINE)):

        def run(q=query):
            ctx.sql(q).collect()

        run()  # warm-up
        before = own_cpu_seconds()
        walls = wall_times(runs, run)
        cpu = {"process": own_cpu_seconds() - before}
        # A second pass under py-spy (this process, sampled from a child).
        spy = PySpy([os.getpid()], raw / f"datafusion-{name}.raw")
        wall_times(runs, run)
        result[name] = per_query(walls, cpu, runs, spy.stop())
    return result


def profile_spark(data: Path, runs: int, raw: Path) -> dict:
    spark = spark_session(data)
    result = {}
    try:
        for name, query in (("row_score", QUERY), ("passthrough", BASELINE)):

            def run(q=query):
                spark.sql(q).collect()

            run()  # warm-up: starts the Python workers
            procs = descendants(os.getpid())
            before = {pid: cpu_seconds(pid) for pid in procs}
            walls = wall_times(runs, run)
            cpu = {"JVM": 0.0, "Python workers": 0.0}
            for pid, (_, command) in descendants(os.getpid()).items():
                cpu["JVM" if "java" in command else "Python workers"] += cpu_seconds(pid) - before.get(
                    pid, 0.0
                )
            # The daemon forks the Python workers (same command line); py-spy follows its children.
            daemons = [
                pid
                for pid, (parent, command) in procs.items()
                if "pyspark.daemon" in command and "pyspark.daemon" not in procs.get(parent, (0, ""))[1]
            ]
            if len(daemons) != 1:
                raise RuntimeError(f"expected one pyspark.daemon process below pid {os.getpid()}: {procs}")
            spy = PySpy(daemons, raw / f"spark-{name}.raw")
            wall_times(runs, run)
            result[name] = per_query(walls, cpu, runs, spy.stop())
    finally:
        spark.stop()
    return result


def profile_dfship(data: Path, runs: int, bin_dir: Path, venv: Path, raw: Path) -> dict:
    result = {}
    for name, query in (("row_score", QUERY), ("passthrough", BASELINE)):
        # `dfship sql --repeat` runs a warm-up first: runs + 1 executions in each window.
        # CPU of each process tree (a worker with its UDF runners; the
        # coordinator with its own) over the timed runs only.
        with dfship_workers(2, bin_dir, venv) as (processes, urls):
            per_run: list[dict] = []
            pids = [p.pid for p in processes]
            walls = run_dfship_query(urls, query, runs, data, bin_dir, venv, pids, per_run)
            cpu = {name: sum(run[name] for run in per_run) * (runs + 1) / runs for name in per_run[0]}
        with dfship_workers(2, bin_dir, venv) as (processes, urls):
            spy = PySpy([p.pid for p in processes], raw / f"dfship-{name}.raw")
            run_dfship_query(urls, query, runs, data, bin_dir, venv)
            samples = spy.stop()
        result[name] = per_query(walls, cpu, runs + 1, samples)
    return result


def render(meta: dict, floor: float, engines: dict[str, dict]) -> str:
    lines = [
        f"Measured {meta['date']} on {meta['machine']}; {meta['rows']:,} rows; wall = median of "
        f"{meta['runs']} runs after a warm-up; CPU and GIL seconds per query execution.",
        "",
        f"The bare `row_score_fn` over every value in one process takes **{floor:.2f} s**, so no engine "
        f"can run this query on two cores in less than **{floor / 2:.2f} s**.",
        "",
        "GIL seconds are wall time a thread held the GIL in that code (py-spy `--gil`, a second pass): "
        "when more processes want the CPU than there are cores, they exceed CPU seconds.",
        "",
        "| engine | query | wall s | spread | CPU s by process | GIL held, s (py-spy) |",
        "|---|---|---:|---:|---|---|",
    ]
    for engine, queries in engines.items():
        for name, r in queries.items():
            cpu = ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_s"].items())
            gil = "<br>".join(f"{v:.2f} {k}" for k, v in r["gil_s"].items() if v >= 0.01) or "(not sampled)"
            lines.append(
                f"| {engine} | {name} | {r['wall_s']:.2f} | {r['spread_pct']:.0f}% | {cpu} | {gil} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data", type=Path, default=ROOT / "target" / "bench-data")
    parser.add_argument("--out", type=Path, default=ROOT / "benches" / "results")
    parser.add_argument("--raw", type=Path, default=ROOT / "target" / "profile-raw", help="py-spy's stacks")
    parser.add_argument("--bin", type=Path, default=ROOT / "target" / "release")
    parser.add_argument(
        "--venv", type=Path, default=ROOT / ".venv", help="the Python environment of the workers"
    )
    args = parser.parse_args()
    if not any(args.data.glob(".done-*")):
        parser.error(f"no benchmark data in {args.data}: run benches/e2e/run_e2e.py first")
    args.out.mkdir(parents=True, exist_ok=True)
    args.raw.mkdir(parents=True, exist_ok=True)

    print("profile: the bare function ...", flush=True)
    floor = time_function_alone(args.data)
    engines = {}
    print("profile: datafusion-python ...", flush=True)
    engines["datafusion-python"] = profile_datafusion(args.data, args.runs, args.raw)
    print("profile: dfship, 2 workers ...", flush=True)
    engines["dfship 2 workers"] = profile_dfship(args.data, args.runs, args.bin, args.venv, args.raw)
    print("profile: PySpark local[2] ...", flush=True)
    engines["pyspark local[2]"] = profile_spark(args.data, args.runs, args.raw)

    rows = pq.ParquetDataset(args.data / "sales").read(columns=["id"]).num_rows
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.uname().machine}, {os.cpu_count()} cores",
        "rows": rows,
        "runs": args.runs,
    }
    (args.out / "profile.json").write_text(
        json.dumps({"meta": meta, "function_alone_s": floor, "engines": engines}, indent=2)
    )
    text = render(meta, floor, engines)
    (args.out / "profile.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
