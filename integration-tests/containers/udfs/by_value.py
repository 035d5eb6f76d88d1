"""The same UDF as local_module.py, with the helper module registered by value
by hand (as before dfship did it by itself; a registration is kept as is):
workers get its code inside the payload and need no copy of it."""

import cloudpickle
import coord_helper
import pyarrow as pa

from dfship import udf

cloudpickle.register_pickle_by_value(coord_helper)


@udf([pa.int64()], pa.int64(), "immutable")
def with_bonus(values: pa.Array) -> pa.Array:
    return coord_helper.add_bonus(values)
