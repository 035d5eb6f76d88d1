"""A coordinator session for a cluster, and the DataFrames it returns."""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from dfship import _native
from dfship.environment import Environment, _Bound
from dfship.errors import (
    DfshipError,
    PayloadRefusedError,
    PlanningError,
    UdfLoadError,
    VersionMismatchError,
)
from dfship.udf import PythonUDAF, PythonUDF, PythonUDWF

if TYPE_CHECKING:
    import pandas

__all__ = ["ClusterContext", "DataFrame"]


class DataFrame:
    """A planned query. Nothing runs until :meth:`collect` (or :meth:`to_pandas`)."""

    def __init__(self, native: _native.DataFrame) -> None:
        self._native = native

    @property
    def schema(self) -> pa.Schema:
        """The schema of the result."""
        return self._native.schema()

    def collect(
        self,
        progress: bool | Callable[[dict[str, Any]], object] | None = None,
        *,
        timeout: float | None = None,
        on_output: Callable[[dict[str, Any]], object] | None = None,
    ) -> pa.Table:
        """Runs the query on the cluster and returns the result as a ``pyarrow.Table``.

        ``progress`` shows how far the query has got, as the workers report
        it (every 250 ms, when something changed, and once at the end):
        ``True`` shows a bar: a widget in Jupyter when ``tqdm`` is installed
        (``pip install tqdm``), else a line redrawn on stderr when it is a
        terminal, else nothing; a callable is called with ``{"done": tasks
        done, "total": tasks, "finished": bool, "stages": [{"stage",
        "tasks", "done", "running", "rows"}, ...]}`` (from another thread:
        keep it short; what it raises is reported through
        ``sys.unraisablehook`` and the query goes on).

        >>> df.collect(progress=lambda p: print(f"{p['done']}/{p['total']} tasks"))  # doctest: +SKIP

        **Stopping.** Ctrl-C (SIGINT, also a notebook's "interrupt kernel")
        cancels the query on every worker within a moment and raises
        ``KeyboardInterrupt``. ``timeout`` (seconds) overrides the context's
        ``query_timeout``: a query running longer is cancelled the same way
        and raises :class:`QueryTimeoutError`.

        **UDF output.** What the query's Python UDFs print, log (``logging``)
        and warn (``warnings``) comes back while the query runs, when the
        context's ``udf_output`` is ``"client"`` (the default): each line is
        written to ``sys.stderr`` as ``(udf, worker) text``, or handed to
        ``on_output`` as ``{"worker", "stage", "task", "udf", "stream",
        "text"}`` (``stream``: ``stdout``, ``stderr``, ``logging``,
        ``warning``, or ``dropped`` for the one line saying how much went past
        the caps). Both run on this thread; an exception ``on_output`` raises
        cancels the query and is raised here. :meth:`udf_output` returns the
        lines of the last run.

        Raises a :class:`DfshipError` subclass naming the cause (see
        :mod:`dfship.errors`); a UDF's own exception type, message and
        traceback tail are part of the message of :class:`UdfRaisedError`.
        """
        callback, done = _progress_display(progress)
        try:
            batches = self._native.collect(callback, timeout, on_output)
        finally:
            if done is not None:
                done()
        return pa.Table.from_batches(batches, schema=self.schema)

    def udf_output(self) -> list[dict[str, Any]]:
        """What the UDFs of the last :meth:`collect` wrote (within the query's
        caps), as dicts: ``worker`` (``HOST:PORT``, or ``coordinator``),
        ``stage``, ``task``, ``udf``, ``stream`` and ``text``."""
        return self._native.udf_output()

    def to_pandas(self) -> pandas.DataFrame:
        """Runs the query and returns a ``pandas.DataFrame`` (needs pandas)."""
        return self.collect().to_pandas()

    def explain(self, analyze: bool = False) -> str:
        """The distributed plan (stages and tasks) and how each UDF travels.

        With ``analyze=True`` the query runs (once, not retried) and the text
        is the plan with the metrics every task sent back, followed by each
        Python scalar UDF's calls, rows, seconds waiting for its runners and
        failures, per stage (``Stage N``, summed over its tasks, and
        ``coordinator`` for the stage this process ran)."""
        return self._native.explain(analyze)

    def __repr__(self) -> str:
        return f"DataFrame({self.schema})"


class ClusterContext:
    """A session whose queries run on a datafusion-distributed cluster.

    ``workers`` are URLs such as ``http://10.0.0.5:50051`` (see
    :class:`dfship.LocalCluster` for a local one). Keyword arguments set the
    codec: ``cluster_key`` (bytes) or ``cluster_key_file`` (else the
    ``DFSHIP_CLUSTER_KEY`` environment variable, as for workers and the CLI)
    signs payloads for workers started with the same key; ``strict`` refuses inline UDFs;
    ``max_payload_bytes``/``warn_payload_bytes`` bound pickled UDF sizes.
    ``target_partitions`` and ``bytes_per_partition`` shape how file scans
    split into tasks.

    The stages this process keeps (small queries may run here entirely) run
    their Python UDFs like a worker does: ``python_mode`` ``"pool"`` (the
    default: runner processes of this interpreter, one per core unless
    ``python_runners`` says otherwise) or ``"in-process"``;
    ``udf_timeout`` (seconds per batch; 600 by default, 0 for none) and
    ``runner_memory_limit`` (bytes) bound each runner;
    ``runner_replies_in_flight`` (bytes, 1 GiB by default) bounds the replies
    all runners send at once; ``runner_env_deny`` names the variables runners
    do not inherit (default: the object stores' secrets; ``["none"]`` for
    none); ``runner_user`` is the user runners run as (default:
    ``nobody`` when this process runs as root, else its own user; ``"worker"``
    keeps its own); ``runner_isolation`` ``"query"`` gives each query runners
    of its own, replaced by fresh processes when it ends (default
    ``"shared"``). These settings are per process: every context in it
    must use the same ones.

    ``tls_ca`` (PEM) makes connections TLS (worker URLs ``https://``),
    verifying the workers' certificates; ``tls_cert``/``tls_key`` present a
    client certificate to workers that require one (mutual TLS).
    ``max_message_bytes`` bounds each gRPC message received.

    A query that loses a worker (process gone, connection reset, network
    cut) is planned again on the workers left and run again, up to
    ``max_attempts`` times (default 3); queries calling a ``volatile``
    Python UDF, and writes other than ``COPY … TO`` a local path, are not
    retried. The coordinator probes every worker each ``probe_interval``
    seconds and plans only on those alive (see :meth:`workers_status`).
    ``query_timeout`` (seconds) cancels a query that runs longer on every
    worker (:class:`QueryTimeoutError`); ``collect(timeout=...)`` overrides
    it per call. ``udf_output`` says where what Python UDFs print, log and
    warn goes: ``"client"`` (the default: shown where ``collect`` runs, and
    in the workers' logs), ``"worker"`` (the workers' logs only) or
    ``"off"``; at most ``udf_output_max_lines`` lines (10,000) and
    ``udf_output_max_bytes`` bytes (1 MiB) are kept per query, and one line
    says how much more was dropped.
    ``workers`` may also be ``dns://NAME:PORT`` (every address of the name,
    resolved again every ``resolve_interval`` seconds) or ``file:///PATH``
    (a list of workers, read again when it changes).

    Tables and ``COPY … TO`` outputs may be local paths every worker can
    read, or ``s3://``, ``gs://``, ``az://``/``abfss://`` and ``http(s)://``
    URLs. Each process (this one, and every worker) finds the store's
    credentials in its own environment (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``,
    ``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_*``...) and its
    ``storage_options`` (``{"aws_endpoint": "http://127.0.0.1:9000",
    "aws_allow_http": "true"}``; workers take ``--storage-option KEY=VALUE``);
    credentials never travel in plans. A store without credentials fails at
    once (:class:`dfship.StorageError`) instead of asking a cloud metadata
    service, unless ``cloud_metadata=True``.

    Every keyword but ``cluster_key`` and the environment's (below) is a
    coordinator setting, declared once for the CLI, the Rust builder and
    this class: the same name as a flag
    (``python_runners`` is ``--python-runners``), as an environment variable
    (``DFSHIP_PYTHON_RUNNERS``) and in a TOML settings file (``config=``;
    ``[python] runners = 2``); a keyword wins over the variable, which wins
    over the file. ``dfship.settings()`` lists them all.

    ``py_modules`` (modules, ``.py`` files or package folders),
    ``working_dir`` (a folder: importable, and the runners' working
    directory) and ``requirements`` (a list, or a requirements file; wheels
    only, from the workers' package index or from ``wheelhouse``, a folder
    of wheels shipped with them) make this context's *environment*: every
    UDF it registers runs on runners of that environment only, which have
    its code and packages first on ``sys.path`` (see
    :mod:`dfship.environment`). What is shipped is capped at
    ``max_environment_bytes`` (64 MiB). Without them, the modules of your
    own a UDF uses (files outside the standard library and installed
    packages) travel inside its pickle.
    """

    def __init__(
        self,
        workers: Sequence[str],
        *,
        cluster_key: bytes | None = None,
        cluster_key_file: str | os.PathLike[str] | None = None,
        strict: bool | None = None,
        max_payload_bytes: int | None = None,
        warn_payload_bytes: int | None = None,
        target_partitions: int | None = None,
        bytes_per_partition: int | None = None,
        max_tasks_per_stage: int | None = None,
        max_attempts: int | None = None,
        probe_interval: float | None = None,
        resolve_interval: float | None = None,
        query_timeout: float | None = None,
        udf_output: str | None = None,
        udf_output_max_lines: int | None = None,
        udf_output_max_bytes: int | None = None,
        python_mode: str | None = None,
        python_runners: int | None = None,
        udf_timeout: float | None = None,
        runner_memory_limit: int | None = None,
        python_env: str | os.PathLike[str] | None = None,
        python_executable: str | os.PathLike[str] | None = None,
        runner_user: str | None = None,
        runner_isolation: str | None = None,
        runner_replies_in_flight: int | None = None,
        runner_env_deny: Sequence[str] | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        max_message_bytes: int | None = None,
        ffi_udfs: Sequence[str] | None = None,
        storage_options: Mapping[str, str] | Sequence[str] | None = None,
        cloud_metadata: bool | None = None,
        config: str | os.PathLike[str] | None = None,
        py_modules: Sequence[str | os.PathLike[str] | types.ModuleType] | None = None,
        working_dir: str | os.PathLike[str] | None = None,
        requirements: Sequence[str] | str | os.PathLike[str] | None = None,
        wheelhouse: str | os.PathLike[str] | None = None,
        max_environment_bytes: int | None = None,
    ) -> None:
        self.environment: Environment | None = None
        if py_modules or working_dir is not None or requirements:
            self.environment = Environment(
                py_modules=list(py_modules or ()),
                working_dir=working_dir,
                requirements=requirements,
                wheelhouse=wheelhouse,
                max_bytes=max_environment_bytes,
            )
        elif wheelhouse is not None:
            raise ValueError(
                "wheelhouse= ships wheels for requirements=: give the requirements to install from it"
            )
        if isinstance(workers, str):
            workers = [w for w in workers.split(",") if w]
        self.workers = list(workers)
        settings = {
            "cluster_key_file": _path(cluster_key_file),
            "strict": strict,
            "max_payload_bytes": max_payload_bytes,
            "warn_payload_bytes": warn_payload_bytes,
            "target_partitions": target_partitions,
            "bytes_per_partition": bytes_per_partition,
            "max_tasks_per_stage": max_tasks_per_stage,
            "max_attempts": max_attempts,
            "probe_interval": probe_interval,
            "resolve_interval": resolve_interval,
            "query_timeout": query_timeout,
            "udf_output": udf_output,
            "udf_output_max_lines": udf_output_max_lines,
            "udf_output_max_bytes": udf_output_max_bytes,
            "python_mode": python_mode,
            "python_runners": python_runners,
            "udf_timeout": udf_timeout,
            "runner_memory_limit": runner_memory_limit,
            "python_env": _path(python_env),
            "python_executable": _path(python_executable),
            "runner_user": runner_user,
            "runner_isolation": runner_isolation,
            "runner_replies_in_flight": runner_replies_in_flight,
            "runner_env_deny": list(runner_env_deny) if runner_env_deny is not None else None,
            "tls_ca": _path(tls_ca),
            "tls_cert": _path(tls_cert),
            "tls_key": _path(tls_key),
            "max_message_bytes": max_message_bytes,
            "ffi_udfs": list(ffi_udfs) if ffi_udfs else None,
            "storage_options": _storage_options(storage_options),
            "cloud_metadata": cloud_metadata,
            "config": _path(config),
        }
        self._native = _native.ClusterContext(self.workers, cluster_key, settings)

    def register_udf(self, udf: PythonUDF | PythonUDAF | PythonUDWF) -> None:
        """Makes a UDF declared with :func:`dfship.udf` (or ``udaf``, ``udwf``) callable by its name."""
        if not isinstance(udf, (PythonUDF, PythonUDAF, PythonUDWF)):
            raise TypeError(
                f"register_udf() needs a dfship.udf/udaf/udwf(...) declaration, got {type(udf).__name__}"
            )
        self._native.register_udf(self._in_environment(udf))

    def _in_environment(self, udf: Any) -> Any:
        return udf if self.environment is None else _Bound(udf, self.environment)

    def register_udaf(self, udaf: PythonUDAF) -> None:
        """Makes an aggregate UDF declared with :func:`dfship.udaf` callable by its name."""
        if not isinstance(udaf, PythonUDAF):
            kind = type(udaf).__name__
            raise TypeError(f"register_udaf() needs a dfship.udaf(...) declaration, got {kind}")
        self._native.register_udf(self._in_environment(udaf))

    def register_udwf(self, udwf: PythonUDWF) -> None:
        """Makes a window UDF declared with :func:`dfship.udwf` callable by its name."""
        if not isinstance(udwf, PythonUDWF):
            kind = type(udwf).__name__
            raise TypeError(f"register_udwf() needs a dfship.udwf(...) declaration, got {kind}")
        self._native.register_udf(self._in_environment(udwf))

    def register_parquet(self, name: str, path: str | os.PathLike[str]) -> None:
        """Registers Parquet file(s) at ``path``: a local path every worker can read, or an
        ``s3://``, ``gs://``, ``az://``, ``abfss://`` or ``http(s)://`` URL (see the class docs)."""
        self._native.register_parquet(name, os.fspath(path))

    def register_csv(
        self, name: str, path: str | os.PathLike[str], *, has_header: bool = True, delimiter: str = ","
    ) -> None:
        """Registers CSV file(s) at ``path``: a local path every worker can read, or an object
        store URL (see :meth:`register_parquet`)."""
        self._native.register_csv(name, os.fspath(path), has_header, delimiter)

    def register_arrow(self, name: str, data: Any) -> None:
        """Registers in-memory data as a table: a ``pyarrow.Table``, a
        ``pyarrow.RecordBatch``, a list of record batches, or a
        ``pandas.DataFrame``. The data is sent to workers inside the plan."""
        table = _as_table(data)
        batches = table.to_batches() or [pa.RecordBatch.from_pylist([], schema=table.schema)]
        self._native.register_record_batches(name, batches, table.schema)

    def deregister_table(self, name: str) -> None:
        self._native.deregister_table(name)

    def sql(self, query: str) -> DataFrame:
        """Plans ``query``; run it with ``.collect()``."""
        return DataFrame(self._native.sql(query))

    def execute_datafusion_plan(self, plan: Any) -> DataFrame:
        """Runs a plan made by datafusion-python 55 on the cluster.

        ``plan`` is a ``datafusion.LogicalPlan`` or ``datafusion.ExecutionPlan``
        (for example ``df.logical_plan()`` or ``df.execution_plan()``), or the
        bytes of their ``to_bytes()``; bytes are tried as a logical plan first,
        then as a physical plan. Python UDFs in it (``datafusion.udf``) travel
        inline. Its tables must be files at paths every worker can read:
        datafusion-python cannot serialize in-memory tables.

        The plan is trusted as your own code: its UDFs are loaded in this
        process, as datafusion-python itself would, even when the cluster has a
        key, and reach the workers signed with it. Do not pass bytes you did
        not make or receive from someone you trust.
        """
        kind = type(plan).__name__
        if kind == "LogicalPlan":
            return DataFrame(self._native.load_datafusion_logical_plan(plan.to_bytes()))
        if kind == "ExecutionPlan":
            return DataFrame(self._native.load_datafusion_physical_plan(plan.to_bytes()))
        if isinstance(plan, (bytes, bytearray, memoryview)):
            data = bytes(plan)
            try:
                return DataFrame(self._native.load_datafusion_logical_plan(data))
            except (PayloadRefusedError, VersionMismatchError, UdfLoadError):
                raise  # a logical plan after all: one of its UDFs could not be loaded
            except DfshipError as logical_error:
                try:
                    return DataFrame(self._native.load_datafusion_physical_plan(data))
                except DfshipError as physical_error:
                    raise PlanningError(
                        f"these bytes are neither plan kind.\nAs a logical plan: {logical_error}\n"
                        f"As a physical plan: {physical_error}"
                    ) from None
        raise TypeError(
            "execute_datafusion_plan() takes a datafusion LogicalPlan or ExecutionPlan, or the bytes "
            f"of its to_bytes(); got {kind}"
        )

    def workers_status(self) -> list[tuple[str, str, str | None]]:
        """Each worker as ``(url, "live" | "down", cause)``: what the
        coordinator believes now (queries are planned on live workers only)."""
        return self._native.workers_status()

    def retry_stats(self) -> dict[str, int]:
        """Queries run, retries made (attempts after a first one) and queries
        that failed after retrying, since this context was made."""
        return self._native.retry_stats()

    def shipped(self) -> tuple[int, int]:
        """(stage plans sent to workers, inline Python UDF calls written into them) so far."""
        return self._native.shipped()


def _progress_display(
    progress: bool | Callable[[dict[str, Any]], object] | None,
) -> tuple[Callable[[dict[str, Any]], object] | None, Callable[[], None] | None]:
    """The callback for ``collect(progress=...)``, and what to call once the query ended."""
    if progress is True:
        return _notebook_bar() or _terminal_bar() or (None, None)
    if progress is None or progress is False:
        return None, None
    return progress, None


def _in_notebook() -> bool:
    """Whether this is a Jupyter kernel (its output goes to a notebook, not a terminal)."""
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()
    except Exception:  # noqa: BLE001 - any failure means "not a notebook"
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def _notebook_bar() -> tuple[Callable[[dict[str, Any]], None], Callable[[], None]] | None:
    """A ``tqdm.auto`` bar (a widget in Jupyter), if this is a notebook and tqdm is installed."""
    if not _in_notebook():
        return None
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]
    except ImportError:
        return None
    bar = tqdm(total=0, unit="task", desc="query")

    def update(progress: dict[str, Any]) -> None:
        bar.total = progress["total"]
        bar.n = progress["done"]
        rows = sum(s["rows"] for s in progress["stages"])
        bar.set_postfix(rows=rows, refresh=False)
        bar.refresh()

    return update, bar.close


def _terminal_bar() -> tuple[Callable[[dict[str, Any]], None], Callable[[], None]] | None:
    """A progress bar drawn on stderr, if stderr is a terminal."""
    if not sys.stderr.isatty():
        return None

    def draw(progress: dict[str, Any]) -> None:
        done, total = progress["done"], progress["total"]
        width = 30
        filled = width * done // total if total else width
        stages = " ".join(f"s{s['stage']}:{s['done']}/{s['tasks']}" for s in progress["stages"])
        rows = sum(s["rows"] for s in progress["stages"])
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\r[{bar}] {done}/{total} tasks, {rows} rows  {stages}\x1b[K")
        sys.stderr.flush()

    def end() -> None:
        sys.stderr.write("\n")

    return draw, end


def _path(path: str | os.PathLike[str] | None) -> str | None:
    return os.fspath(path) if path is not None else None


def _as_table(data: Any) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if type(data).__module__.startswith("pandas"):
        return pa.Table.from_pandas(data, preserve_index=False)
    if isinstance(data, Iterable):
        batches = list(data)
        if batches and all(isinstance(b, pa.RecordBatch) for b in batches):
            return pa.Table.from_batches(batches)
    raise TypeError(
        "register_arrow() takes a pyarrow.Table, a pyarrow.RecordBatch, a list of record batches "
        f"or a pandas.DataFrame; got {type(data).__name__}"
    )


def _storage_options(options: Mapping[str, str] | Sequence[str] | None) -> list[str] | None:
    """``{"aws_region": "eu-west-1"}`` (or ``["aws_region=eu-west-1"]``) as ``KEY=VALUE`` items."""
    if options is None:
        return None
    if isinstance(options, Mapping):
        return [f"{key}={value}" for key, value in options.items()]
    if isinstance(options, str):
        return [options]
    return list(options)
