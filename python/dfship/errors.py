"""The exceptions dfship raises, one class per cause, all under ``DfshipError``::

    DfshipError
    ├── PlanningError          the query could not be planned
    ├── PayloadRefusedError    a process refused a UDF payload without unpickling it
    ├── VersionMismatchError   pickled by another Python minor / cloudpickle major version
    ├── UdfLoadError           the callable could not be pickled or unpickled
    ├── UdfRaisedError         the UDF raised an exception
    ├── UdfResultError         the UDF returned the wrong length, type, nulls or invalid data
    ├── WorkerLostError        a worker stopped or became unreachable
    ├── QueryTimeoutError      the query ran past its timeout and was cancelled on every worker
    ├── StorageError           an object store failed: credentials, bucket, endpoint
    └── AuthenticationError    a worker refused this client (no or another cluster key),
                               or an endpoint could not prove it holds the cluster key

Catch by cause::

    try:
        table = ctx.sql("SELECT risky(x) FROM t").collect()
    except dfship.UdfRaisedError as error:
        ...  # the UDF's exception type, message and traceback tail are in str(error)
    except dfship.WorkerLostError:
        ...  # retry without that worker

Ctrl-C (SIGINT) during ``collect()`` cancels the query on every worker and
raises Python's own ``KeyboardInterrupt``.

Every message starts with the tag of its kind (e.g. ``[udf-raised]``) and says what to do.
"""

from __future__ import annotations

from dfship._native import (
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

__all__ = [
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
]
