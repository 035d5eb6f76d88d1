"""The same UDF as by_reference.py, with the helper module pickled by value:
workers get its code inside the payload and need no copy of it."""

import cloudpickle
import coord_helper
import pyarrow as pa

from dfship import udf

cloudpickle.register_pickle_by_value(coord_helper)


@udf([pa.int64()], pa.int64(), "immutable")
def with_bonus(values: pa.Array) -> pa.Array:
    return coord_helper.add_bonus(values)
