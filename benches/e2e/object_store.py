"""A scan-heavy query with a vectorized Python UDF over 10 M rows, the same
Parquet files read from an S3-compatible server (moto, on 127.0.0.1) and
from local disk, on 1 and 2 workers, side by side in one run; beside them,
the server's raw GET throughput (boto3 reading every file whole), since a
test server may be the bottleneck rather than dfship.

Usage: python object_store.py [--out DIR] [--runs N] [--rows N] (benches/run.sh
runs it; needs dfship and moto[server]). Writes object_store.md and
object_store.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cloudpickle
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import dfship

# The S3 server helper is the object-store tests' own (python/tests/s3server.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python" / "tests"))
from s3server import S3Server  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])

FILES = 8
BUCKET = "bench"
QUERY = "SELECT g, sum(scaled(v)) AS s, count(*) AS c FROM t WHERE id % 3 <> 0 GROUP BY g ORDER BY g"


def scaled(v: pa.Array) -> pa.Array:
    return pc.multiply(pc.sqrt(v), 2.5)


def write_data(root: Path, rows: int) -> int:
    per_file = rows // FILES
    for part in range(FILES):
        ids = pa.array(range(part * per_file, (part + 1) * per_file), pa.int64())
        table = pa.table(
            {
                "id": ids,
                "g": pc.bit_wise_and(ids, 15),
                "v": pc.cast(pc.bit_wise_and(ids, 65535), pa.float64()),
                "pad": pc.cast(pc.bit_wise_and(pc.multiply(ids, 7919), 1048575), pa.int64()),
            }
        )
        pq.write_table(table, root / f"part-{part}.parquet", row_group_size=256 * 1024)
    return sum(p.stat().st_size for p in root.iterdir())


def raw_get_throughput(s3: S3Server, keys: list[str], threads: int) -> float:
    """MB/s of whole-object GETs, `threads` at a time."""

    def get(key: str) -> int:
        return len(s3.client.get_object(Bucket=BUCKET, Key=key)["Body"].read())

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(get, keys))
    return total / 1e6 / (time.perf_counter() - started)


def timed(ctx: dfship.ClusterContext, runs: int) -> tuple[float, pa.Table]:
    result = ctx.sql(QUERY).collect()  # warm: runners, payloads, stores
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        result = ctx.sql(QUERY).collect()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def same_result(a: pa.Table, b: pa.Table) -> bool:
    """Equal groups and counts; float sums equal up to summation order."""
    rows_a, rows_b = a.to_pylist(), b.to_pylist()
    return len(rows_a) == len(rows_b) and all(
        x["g"] == y["g"] and x["c"] == y["c"] and abs(x["s"] - y["s"]) <= 1e-9 * abs(x["s"])
        for x, y in zip(rows_a, rows_b, strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rows", type=int, default=10_000_000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    udf = dfship.udf([pa.float64()], pa.float64(), "immutable", name="scaled")(scaled)
    with tempfile.TemporaryDirectory(prefix="dfship-bench-s3-") as tmp:
        data = Path(tmp) / "t"
        data.mkdir()
        size = write_data(data, args.rows)
        s3 = S3Server()
        try:
            keys = s3.upload(BUCKET, data, "t")
            get_1 = raw_get_throughput(s3, keys, 1)
            get_2 = raw_get_throughput(s3, keys, 2)
            rows = []
            for workers in (1, 2):
                with dfship.LocalCluster(workers=workers, env=s3.env()) as cluster:
                    measured = {}
                    results = {}
                    for source, location in (("local", str(data)), ("s3", f"s3://{BUCKET}/t/")):
                        ctx = cluster.context(storage_options=s3.storage_options())
                        ctx.register_udf(udf)
                        ctx.register_parquet("t", location)
                        measured[source], results[source] = timed(ctx, args.runs)
                    if not same_result(results["local"], results["s3"]):
                        raise SystemExit("the S3 and local results differ")
                    rows.append((workers, measured["local"], measured["s3"]))
        finally:
            s3.stop()

    mb = size / 1e6
    lines = [
        "## Object stores: the same Parquet files from S3 (moto) and from local disk",
        "",
        f"`benches/e2e/object_store.py`: `{QUERY}` over {args.rows:,} rows in {FILES} Parquet "
        f"files ({mb:.0f} MB), the vectorized UDF `scaled(v)` (pyarrow sqrt and multiply). "
        f"Median of {args.runs} runs after a warm-up, both sources in the same cluster, one "
        "after the other. The S3-compatible server is moto's (Python, objects in memory) on "
        "127.0.0.1 of the same two-core machine. The query reads 3 of the 4 columns (Parquet "
        "projection: ranged GETs of their column chunks), so the last column overstates the bytes "
        "fetched.",
        "",
        "| workers | local disk | S3 (moto) | S3 / local | files' MB / S3 query time |",
        "|---|---|---|---|---|",
    ]
    for workers, local, remote in rows:
        ratio = remote / local
        lines.append(f"| {workers} | {local:.2f} s | {remote:.2f} s | {ratio:.2f}× | {mb / remote:.0f} |")
    lines += [
        "",
        f"moto's raw GET throughput (boto3, whole objects): {get_1:.0f} MB/s with one reader, "
        f"{get_2:.0f} MB/s with two.",
    ]
    text = "\n".join(lines) + "\n"
    (args.out / "object_store.md").write_text(text)
    (args.out / "object_store.json").write_text(
        json.dumps(
            {
                "rows": args.rows,
                "bytes": size,
                "runs": args.runs,
                "raw_get_mb_s": {"1": get_1, "2": get_2},
                "seconds": [{"workers": w, "local": lo, "s3": r} for w, lo, r in rows],
            },
            indent=2,
        )
    )
    print(text)


if __name__ == "__main__":
    main()
