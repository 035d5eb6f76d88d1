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
