"""The same model in a closure: built once on the coordinator (2 s, when this
file is loaded) and pickled into the plan (50 MB), the only way before class
UDFs (benches/e2e/runners.py)."""

import time

import numpy as np
import pyarrow as pa

from dfship import udf

MODEL_SECONDS = 2.0
MODEL_VALUES = 50 * 1024 * 1024 // 8

time.sleep(MODEL_SECONDS)
TABLE = np.sqrt(np.arange(MODEL_VALUES, dtype=np.float64))


def model_fn(ids: pa.Array, table: np.ndarray = TABLE) -> pa.Array:
    return pa.array(table[ids.to_numpy() % len(table)])


model = udf(model_fn, [pa.int64()], pa.float64(), "immutable", name="model")
