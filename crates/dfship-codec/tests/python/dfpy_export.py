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
from datafusion import Accumulator, SessionContext, udaf, udf, udwf
from datafusion.user_defined import WindowEvaluator


class SumAndCount(Accumulator):
    """sum(a) * 10 + count(a), over a two-field state."""

    def __init__(self):
        self.total, self.count = 0, 0

    def update(self, values):
        self.total += pc.sum(values).as_py() or 0
        self.count += pc.count(values).as_py()

    def merge(self, states):
        self.total += pc.sum(states[0]).as_py() or 0
        self.count += pc.sum(states[1]).as_py() or 0

    def state(self):
        return [pa.scalar(self.total), pa.scalar(self.count)]

    def evaluate(self):
        return pa.scalar(self.total * 10 + self.count)


class Running(WindowEvaluator):
    def evaluate_all(self, values, num_rows):
        return pc.cumulative_sum(pc.fill_null(values[0], 0))


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
    states = [pa.int64(), pa.int64()]
    ctx.register_udaf(udaf(SumAndCount, [pa.int64()], pa.int64(), states, "immutable", name="sc"))
    ctx.register_udwf(udwf(Running, [pa.int64()], pa.int64(), "immutable", name="running"))
    yield "udaf", "SELECT s, sc(a) AS v FROM t GROUP BY s ORDER BY s"
    yield "udwf", "SELECT a, running(a) OVER (ORDER BY s) AS r FROM t ORDER BY s"
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
