"""Run Python UDFs on a distributed DataFusion cluster.

UDFs are declared with ``udf`` (the signature and decorator form of
``datafusion.udf``) and travel inline, cloudpickled into the plan, so no
worker needs them registered::

    import pyarrow as pa
    import pyarrow.compute as pc
    import dfship

    @dfship.udf([pa.int64()], pa.int64(), "immutable")
    def plus_one(values: pa.Array) -> pa.Array:
        return pc.add(values, 1)

    with dfship.LocalCluster(workers=2) as cluster:
        ctx = cluster.context()
        ctx.register_udf(plus_one)
        ctx.register_parquet("t", "/data/t")
        table = ctx.sql("SELECT plus_one(x) AS y FROM t").collect()

Aggregate and window UDFs are declared with ``udaf`` and ``udwf`` (the forms
of ``datafusion.udaf``/``udwf``) and travel the same way.

The declarations are pure Python; everything else loads the native
extension on first use, so a file of UDF declarations imports cheaply (the
``dfship`` CLI and the Rust coordinator load such files).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dfship.udf import PythonUDAF, PythonUDF, PythonUDWF, udaf, udf, udwf

if TYPE_CHECKING:
    from dfship.cluster import LocalCluster
    from dfship.context import ClusterContext, DataFrame
    from dfship.environment import Environment
    from dfship.errors import (
        AuthenticationError,
        DfshipError,
        PayloadRefusedError,
        PlanningError,
        QueryTimeoutError,
        StorageError,
        UdfLoadError,
        UdfRaisedError,
        UdfResultError,
        VersionMismatchError,
        WorkerLostError,
    )

_ERRORS = (
    "AuthenticationError",
    "DfshipError",
    "PayloadRefusedError",
    "PlanningError",
    "QueryTimeoutError",
    "StorageError",
    "UdfLoadError",
    "UdfRaisedError",
    "UdfResultError",
    "VersionMismatchError",
    "WorkerLostError",
)

__all__ = [
    "AuthenticationError",
    "ClusterContext",
    "DataFrame",
    "DfshipError",
    "Environment",
    "LocalCluster",
    "PayloadRefusedError",
    "PlanningError",
    "PythonUDAF",
    "PythonUDF",
    "PythonUDWF",
    "QueryTimeoutError",
    "StorageError",
    "UdfLoadError",
    "UdfRaisedError",
    "UdfResultError",
    "VersionMismatchError",
    "WorkerLostError",
    "settings",
    "udaf",
    "udf",
    "udwf",
]

_LAZY = {
    "ClusterContext": "dfship.context",
    "DataFrame": "dfship.context",
    "Environment": "dfship.environment",
    "LocalCluster": "dfship.cluster",
    **dict.fromkeys(_ERRORS, "dfship.errors"),
}


def settings(role: str = "coordinator") -> list[dict[str, Any]]:
    """Every setting of a ``role``: ``"coordinator"`` (the keywords of
    :class:`ClusterContext`, the CLI) or ``"worker"`` (``python -m dfship
    worker``, ``dfship-worker``). Each is a dict of its Python keyword, flag,
    environment variable, settings-file key, default and help.

    >>> any(s["flag"] == "--http-port" for s in settings("worker"))
    True
    """
    from dfship import _native

    rows = {"coordinator": _native.coordinator_settings, "worker": _native.worker_settings}
    if role not in rows:
        raise ValueError(f"settings(role={role!r}): the roles are 'coordinator' and 'worker'")
    fields = ("keyword", "flag", "env", "file_key", "default", "help")
    return [dict(zip(fields, row, strict=True)) for row in rows[role]()]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dfship' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
