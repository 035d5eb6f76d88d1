"""An aggregate and a window UDF for the cluster-key test (keyed containers)."""

import pyarrow as pa
import pyarrow.compute as pc

from dfship import udaf, udwf


@udaf([pa.int64()], pa.int64(), [pa.int64(), pa.int64()], "immutable", name="py_spread")
class Spread:
    """max - min; the state is (min, max), merged across stages."""

    def __init__(self):
        self.low, self.high = None, None

    def _take(self, low, high):
        if low is not None:
            self.low = low if self.low is None else min(self.low, low)
            self.high = high if self.high is None else max(self.high, high)

    def update(self, values):
        self._take(pc.min(values).as_py(), pc.max(values).as_py())

    def merge(self, states):
        self._take(pc.min(states[0]).as_py(), pc.max(states[1]).as_py())

    def state(self):
        return [self.low, self.high]

    def evaluate(self):
        return None if self.low is None else self.high - self.low


@udwf([pa.int64()], pa.int64(), "immutable", name="py_position")
class Position:
    def evaluate_all(self, values, num_rows):
        return pa.array(range(1, num_rows + 1), pa.int64())
