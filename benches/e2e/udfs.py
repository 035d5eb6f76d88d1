"""The UDFs of the end-to-end benchmark, declared once with dfship.udf.

The same Python functions run in datafusion-python (wrapped by
``datafusion.udf``), in PySpark (wrapped as pandas UDFs) and on the cluster
(inline, loaded by ``dfship sql --udfs``).
"""

import math

import pyarrow as pa
import pyarrow.compute as pc

from dfship import udf


def vec_score_fn(value: pa.Array, qty: pa.Array) -> pa.Array:
    """Vectorized: pyarrow.compute over whole arrays."""
    return pc.add(pc.multiply(value, pc.cast(qty, pa.float64())), pc.sqrt(pc.abs(value)))


def row_score_fn(value: pa.Array) -> pa.Array:
    """GIL-bound: a plain Python loop, one value at a time."""
    out = []
    for v in value.to_pylist():
        if v is None:
            out.append(None)
            continue
        x = v
        for _ in range(3):
            x = math.sin(x) * 0.5 + math.sqrt(abs(x) + 1.0)
        out.append(x)
    return pa.array(out, pa.float64())


def band_fn(value: pa.Array) -> pa.Array:
    """Feeds a GROUP BY and a join: a coarse bucket of the value."""
    return pc.cast(pc.floor(pc.divide(value, 250.0)), pa.int64())


def passthrough_fn(value: pa.Array) -> pa.Array:
    """Does nothing: what a query costs an engine without the UDF's own work (profile_gil_bound.py)."""
    return value


vec_score = udf(vec_score_fn, [pa.float64(), pa.int32()], pa.float64(), "immutable", name="vec_score")
row_score = udf(row_score_fn, [pa.float64()], pa.float64(), "immutable", name="row_score")
band = udf(band_fn, [pa.float64()], pa.int64(), "immutable", name="band")

passthrough = udf(passthrough_fn, [pa.float64()], pa.float64(), "immutable", name="passthrough")

ALL = [vec_score, row_score, band, passthrough]


# Aggregate and window UDFs (benches/e2e/aggregates.py). They subclass
# datafusion-python's base classes, which datafusion.udaf/udwf require; dfship
# only calls the methods.
from datafusion import Accumulator  # noqa: E402
from datafusion.user_defined import WindowEvaluator  # noqa: E402

from dfship import udaf, udwf  # noqa: E402


class WeightedMean(Accumulator):
    """A typical vectorized accumulator: two fixed-size state fields."""

    def __init__(self) -> None:
        self.total = 0.0
        self.weight = 0.0

    def update(self, values: pa.Array, weights: pa.Array) -> None:
        weights = pc.cast(weights, pa.float64())
        self.total += pc.sum(pc.multiply(values, weights)).as_py() or 0.0
        self.weight += pc.sum(weights).as_py() or 0.0

    def merge(self, states: list[pa.Array]) -> None:
        self.total += pc.sum(states[0]).as_py() or 0.0
        self.weight += pc.sum(states[1]).as_py() or 0.0

    def state(self) -> list[pa.Scalar]:
        return [pa.scalar(self.total), pa.scalar(self.weight)]

    def evaluate(self) -> pa.Scalar:
        return pa.scalar(self.total / self.weight if self.weight else None, pa.float64())


class RunningTotal(WindowEvaluator):
    """A whole-partition window function."""

    def evaluate_all(self, values: list[pa.Array], num_rows: int) -> pa.Array:
        return pc.cumulative_sum(values[0])


class FrameMean(WindowEvaluator):
    """A function of its window frame: DataFusion asks it once per row."""

    def uses_window_frame(self) -> bool:
        return True

    def evaluate(self, values: list[pa.Array], eval_range: tuple[int, int]) -> pa.Scalar:
        start, end = eval_range
        return pc.mean(values[0].slice(start, end - start))


wmean = udaf(
    WeightedMean,
    [pa.float64(), pa.int32()],
    pa.float64(),
    [pa.float64(), pa.float64()],
    "immutable",
    name="wmean",
)
running = udwf(RunningTotal, [pa.float64()], pa.float64(), "immutable", name="running")
frame_mean = udwf(FrameMean, [pa.float64()], pa.float64(), "immutable", name="frame_mean")

AGGREGATES = [wmean]
WINDOWS = [running, frame_mean]
