"""A UDF calling a module only the coordinator has (`/coord-lib`, on its
`sys.path`, not installed): dfship pickles `coord_helper` by value with the
UDF, so workers that cannot import it run it."""

import coord_helper
import pyarrow as pa

from dfship import udf


@udf([pa.int64()], pa.int64(), "immutable")
def with_bonus(values: pa.Array) -> pa.Array:
    return coord_helper.add_bonus(values)
