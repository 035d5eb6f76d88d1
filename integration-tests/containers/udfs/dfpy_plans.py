"""Makes datafusion-python plans with Python scalar, aggregate and window UDFs.

Usage (in the coordinator container): python dfpy_plans.py DATA_DIR OUT_DIR

Registers DATA_DIR/facts with datafusion-python (``datafusion==55.0.0``) and,
for each query NAME, writes OUT_DIR/NAME.logical (``LogicalPlan.to_bytes()``),
OUT_DIR/NAME.physical (``ExecutionPlan.to_bytes()``) and OUT_DIR/NAME.arrow
(datafusion-python's own result). ``dfship-cluster-check
--datafusion-python-plans OUT_DIR`` runs both plans on the cluster and
compares. This file runs as __main__, so the classes travel by value.
"""

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from datafusion import Accumulator, SessionContext, udaf, udf, udwf
from datafusion.user_defined import WindowEvaluator


class OddCount(Accumulator):
    def __init__(self):
        self.n = 0

    def update(self, values):
        self.n += pc.sum(pc.equal(pc.bit_wise_and(values, 1), 1)).as_py() or 0

    def merge(self, states):
        self.n += pc.sum(states[0]).as_py() or 0

    def state(self):
        return [pa.scalar(self.n)]

    def evaluate(self):
        return pa.scalar(self.n)


class MeanOf(Accumulator):
    """Two state fields; NULLs skipped; rounded so summation order does not matter."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def update(self, values):
        self.total += pc.sum(values).as_py() or 0.0
        self.count += pc.count(values).as_py()

    def merge(self, states):
        self.total += pc.sum(states[0]).as_py() or 0.0
        self.count += pc.sum(states[1]).as_py() or 0

    def state(self):
        return [pa.scalar(self.total), pa.scalar(self.count)]

    def evaluate(self):
        return pa.scalar(round(self.total / self.count, 6) if self.count else None, pa.float64())


class Running(WindowEvaluator):
    def evaluate_all(self, values, num_rows):
        return pc.cumulative_sum(pc.fill_null(values[0], 0))


class FrameSum(WindowEvaluator):
    def uses_window_frame(self):
        return True

    def evaluate(self, values, eval_range):
        start, end = eval_range
        return pa.scalar(pc.sum(values[0].slice(start, end - start)).as_py(), pa.int64())


QUERIES = {
    "dfpy_scalar": "SELECT category, sum(df_triple(id)) AS s FROM facts GROUP BY category",
    "dfpy_group_by": "SELECT k, odd_count(id) AS o, mean_of(value) AS m FROM facts GROUP BY k",
    "dfpy_having": "SELECT category, odd_count(id) AS o FROM facts GROUP BY category "
    "HAVING odd_count(id) > 0",
    "dfpy_window": "SELECT id, running(id) OVER (PARTITION BY category ORDER BY id) AS r "
    "FROM facts WHERE id < 400",
    "dfpy_frame": "SELECT id, frame_sum(id) OVER (PARTITION BY k ORDER BY id "
    "ROWS BETWEEN 1 PRECEDING AND 1 FOLLOWING) AS r FROM facts WHERE id < 300",
}


def main(data: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ctx = SessionContext()
    ctx.register_parquet("facts", str(data / "facts"))
    ctx.register_udf(
        udf(lambda a: pc.multiply(a, 3), [pa.int64()], pa.int64(), "immutable", name="df_triple")
    )
    ctx.register_udaf(udaf(OddCount, [pa.int64()], pa.int64(), [pa.int64()], "immutable", name="odd_count"))
    states = [pa.float64(), pa.int64()]
    ctx.register_udaf(udaf(MeanOf, [pa.float64()], pa.float64(), states, "immutable", name="mean_of"))
    ctx.register_udwf(udwf(Running, [pa.int64()], pa.int64(), "immutable", name="running"))
    ctx.register_udwf(udwf(FrameSum, [pa.int64()], pa.int64(), "immutable", name="frame_sum"))
    for name, query in QUERIES.items():
        (out / f"{name}.logical").write_bytes(ctx.sql(query).logical_plan().to_bytes())
        (out / f"{name}.physical").write_bytes(ctx.sql(query).execution_plan().to_bytes())
        table = ctx.sql(query).to_arrow_table()
        with pa.ipc.new_file(str(out / f"{name}.arrow"), table.schema) as writer:
            writer.write_table(table)
        print(f"wrote {name}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
