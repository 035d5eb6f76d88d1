"""Writes plans made by datafusion-python (PyPI) with Python UDFs, and their results.

Usage: python dfpy_export.py OUT_DIR

For each case NAME: NAME.plan holds ``ExecutionPlan.to_bytes()`` (UDFs inline
in datafusion-python's DFPYUDF format) and NAME.arrow the rows datafusion-python
computes for it, as an Arrow IPC file.
"""

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from datafusion import SessionContext, udf


def make_scaler(factor):
    def scale(values):
        return pc.multiply(values, factor)

    return scale


def cases(ctx):
    ctx.register_udf(udf(lambda a: pc.add(a, 1), [pa.int64()], pa.int64(), "immutable", name="plus_one"))
    ctx.register_udf(udf(make_scaler(10), [pa.int64()], pa.int64(), "stable", name="times_ten"))
    ctx.register_udf(
        udf(
            lambda a, s: pc.binary_join_element_wise(pc.cast(a, pa.string()), s, "-"),
            [pa.int64(), pa.string()],
            pa.string(),
            "volatile",
            name="label",
        )
    )
    yield "projection", "SELECT a, plus_one(a) AS p FROM t ORDER BY a"
    yield "closure_filter", "SELECT a, times_ten(a) AS s FROM t WHERE times_ten(a) > 15 ORDER BY a"
    yield (
        "two_args_aggregate",
        "SELECT label(a, s) AS l, count(*) AS c FROM t GROUP BY label(a, s) ORDER BY l",
    )


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = SessionContext()
    ctx.from_pydict({"a": [1, 2, 3, None], "s": ["x", "y", "z", "w"]}, name="t")
    for name, sql in cases(ctx):
        df = ctx.sql(sql)
        (out_dir / f"{name}.plan").write_bytes(df.execution_plan().to_bytes())
        table = df.to_arrow_table()
        with pa.ipc.new_file(str(out_dir / f"{name}.arrow"), table.schema) as writer:
            writer.write_table(table)
        print(f"wrote {name}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
