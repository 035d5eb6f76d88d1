"""Type stubs of the native extension (crates/dfship-python).

Checked against the built module by ``mypy.stubtest`` (scripts/python-tests.sh).
"""

from collections.abc import Callable, Sequence
from typing import Any, final

import pyarrow as pa

__all__ = [
    "AuthenticationError",
    "ClusterContext",
    "DataFrame",
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
    "coordinator_settings",
    "generate_tls_files",
    "run_worker",
    "worker_settings",
]

class DfshipError(Exception):
    """An error from the engine. Subclasses say what caused it; the message says what to do."""

class PlanningError(DfshipError):
    """The query could not be planned: SQL, schema, configuration, or a function no process provides."""

class PayloadRefusedError(DfshipError):
    """A process refused a UDF's inline payload before unpickling it: strict mode, a missing or wrong
    cluster-key signature, a size limit, or corrupted bytes."""

class VersionMismatchError(DfshipError):
    """A UDF was pickled by another Python minor or cloudpickle major version than the one that runs it."""

class UdfLoadError(DfshipError):
    """A UDF's callable could not be pickled or unpickled (e.g. a module it imports is missing
    where it runs)."""

class UdfRaisedError(DfshipError):
    """A UDF raised an exception; its type, message and traceback tail are in the message."""

class UdfResultError(DfshipError):
    """A UDF returned bad data: wrong length, type or nullability, or an invalid Arrow array."""

class AuthenticationError(DfshipError):
    """A worker refused this client: it lacks the cluster key, holds another one, or replayed a request."""

class WorkerLostError(DfshipError):
    """A worker stopped or became unreachable during the query."""

class QueryTimeoutError(DfshipError):
    """The query ran past its timeout (`timeout=` or the `query_timeout` setting) and was cancelled
    on every worker."""

class StorageError(DfshipError):
    """An object store (S3, GCS, Azure, HTTP) failed or is not set up: missing credentials, a missing
    bucket or object, an endpoint that does not answer, or a URL scheme no store serves."""

@final
class DataFrame:
    def schema(self) -> pa.Schema: ...
    def collect(
        self,
        progress: Callable[[dict[str, Any]], object] | None = None,
        timeout: float | None = None,
        on_output: Callable[[dict[str, Any]], object] | None = None,
    ) -> list[pa.RecordBatch]: ...
    def udf_output(self) -> list[dict[str, Any]]: ...
    def explain(self, analyze: bool = False) -> str: ...

@final
class ClusterContext:
    def __new__(
        cls,
        workers: Sequence[str],
        cluster_key: bytes | None = None,
        settings: dict[str, Any] | None = None,
    ) -> ClusterContext: ...
    def register_udf(self, udf: object) -> None: ...
    def register_parquet(self, name: str, path: str) -> None: ...
    def register_csv(self, name: str, path: str, has_header: bool = True, delimiter: str = ",") -> None: ...
    def register_record_batches(
        self, name: str, batches: Sequence[pa.RecordBatch], schema: pa.Schema
    ) -> None: ...
    def deregister_table(self, name: str) -> None: ...
    def sql(self, query: str) -> DataFrame: ...
    def load_datafusion_logical_plan(self, data: bytes) -> DataFrame: ...
    def load_datafusion_physical_plan(self, data: bytes) -> DataFrame: ...
    def workers_status(self) -> list[tuple[str, str, str | None]]: ...
    def retry_stats(self) -> dict[str, int]: ...
    def shipped(self) -> tuple[int, int]: ...

def run_worker(argv: Sequence[str]) -> int:
    """Serves a worker in this process until SIGINT/SIGTERM, with the command line `argv` parsed
    exactly as `dfship-worker` parses its own. Returns the process exit code."""

def coordinator_settings() -> list[tuple[str, str, str | None, str | None, str | None, str]]:
    """Every coordinator setting as `(keyword, flag, variable, file key, default, help)`."""

def worker_settings() -> list[tuple[str, str, str | None, str | None, str | None, str]]:
    """Every worker setting, in the shape of :func:`coordinator_settings`."""

def generate_tls_files(directory: str, hosts: Sequence[str]) -> tuple[str, str, str]:
    """Writes a fresh certificate authority and a certificate for `hosts` (names or IP addresses)
    into `directory`: `(ca, cert, key)` paths. For local clusters and tests (`LocalCluster(tls=True)`);
    use your own PKI in production."""
