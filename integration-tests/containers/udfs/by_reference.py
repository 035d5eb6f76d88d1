"""A UDF calling a coordinator-only module: cloudpickle pickles `coord_helper`
by reference, so workers must import it, and they cannot."""

import coord_helper
import pyarrow as pa

from dfship import udf


@udf([pa.int64()], pa.int64(), "immutable")
def with_bonus(values: pa.Array) -> pa.Array:
    return coord_helper.add_bonus(values)
