"""A UDF whose payload runs code when unpickled: it creates /data/drop/unpickled.marker.
Workers with a cluster key must refuse it unsigned or wrongly signed without unpickling."""

import pyarrow as pa

from dfship import udf


class CreatesMarkerWhenUnpickled:
    def __call__(self, values: pa.Array) -> pa.Array:
        return values

    def __reduce__(self):
        return (open, ("/data/drop/unpickled.marker", "w"))


marker = udf(CreatesMarkerWhenUnpickled(), [pa.int64()], pa.int64(), "immutable", name="marker")
