"""Type stubs of the native extension (crates/dfship-python)."""

from collections.abc import Sequence

import pyarrow as pa

class DfshipError(Exception):
    """An error from the engine: planning, a worker, or a UDF (its type and message are in the text)."""

class DataFrame:
    def schema(self) -> pa.Schema: ...
    def collect(self) -> list[pa.RecordBatch]: ...
    def explain(self) -> str: ...

class ClusterContext:
    def __init__(
        self,
        workers: Sequence[str],
        *,
        cluster_key: bytes | None = None,
        cluster_key_file: str | None = None,
        strict: bool = False,
        max_payload_bytes: int | None = None,
        warn_payload_bytes: int | None = None,
        target_partitions: int | None = None,
        bytes_per_partition: int | None = None,
    ) -> None: ...
    def register_udf(self, udf: object) -> None: ...
    def register_parquet(self, name: str, path: str) -> None: ...
    def register_csv(self, name: str, path: str, has_header: bool = True, delimiter: str = ",") -> None: ...
    def register_record_batches(
        self, name: str, batches: list[pa.RecordBatch], schema: pa.Schema
    ) -> None: ...
    def deregister_table(self, name: str) -> None: ...
    def sql(self, query: str) -> DataFrame: ...
    def load_datafusion_logical_plan(self, data: bytes) -> DataFrame: ...
    def load_datafusion_physical_plan(self, data: bytes) -> DataFrame: ...
    def shipped(self) -> tuple[int, int]: ...

def run_worker(
    host: str = "127.0.0.1",
    port: int = 50051,
    *,
    strict: bool = False,
    cluster_key_file: str | None = None,
    max_payload_bytes: int | None = None,
    warn_payload_bytes: int | None = None,
    ffi_udfs: list[str] = ...,
) -> None: ...
