"""A UDF importing `coord_pkg`, a package only the coordinator container has
(/coord-lib/coord_pkg, two modules): the file's environment ships it, and
the workers' runners import it from their environment cache."""

import pyarrow as pa

from dfship import Environment, udf

__dfship_environment__ = Environment(py_modules=["/coord-lib/coord_pkg"])


@udf([pa.int64()], pa.int64(), "immutable")
def with_pkg_bonus(values: pa.Array) -> pa.Array:
    import coord_pkg

    return coord_pkg.add_bonus(values)
