"""A model loaded once per runner: a class UDF whose __init__ takes 2 s and
builds a 50 MB table (benches/e2e/runners.py)."""

import time

import numpy as np
import pyarrow as pa

from dfship import udf

MODEL_SECONDS = 2.0
MODEL_VALUES = 50 * 1024 * 1024 // 8


def build_model() -> np.ndarray:
    time.sleep(MODEL_SECONDS)  # reading weights from disk, warming a GPU...
    return np.sqrt(np.arange(MODEL_VALUES, dtype=np.float64))


@udf([pa.int64()], pa.float64(), "immutable", name="model")
class Model:
    def __init__(self) -> None:
        self.table = build_model()

    def __call__(self, ids: pa.Array) -> pa.Array:
        return pa.array(self.table[ids.to_numpy() % len(self.table)])
