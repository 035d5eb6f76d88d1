"""Write Python UDFs that run inline on a dfship (datafusion-distributed) cluster.

``udf`` has the signature and decorator form of ``datafusion.udf``::

    import pyarrow as pa
    import pyarrow.compute as pc
    from dfship import udf

    @udf([pa.int64()], pa.int64(), "immutable")
    def plus_one(values: pa.Array) -> pa.Array:
        return pc.add(values, 1)

    shout = udf(pc.utf8_upper, [pa.string()], pa.string(), "immutable", name="shout")

A file of such declarations is what ``dfship sql --udfs FILE`` and the Rust
``ClusterContextBuilder::with_python_udfs_from_file`` load.
"""

from dfship.udf import PythonUDF, udf

__all__ = ["PythonUDF", "udf"]
