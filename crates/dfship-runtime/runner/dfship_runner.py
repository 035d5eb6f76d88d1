"""A UDF runner: one member of a process's runner pool (crates/dfship-runtime).

A process that executes query stages (a worker, or a coordinator for the
stages it keeps) starts a few runners and sends them the batches its Python
UDFs must evaluate, so Python runs on every core, outside the engine's
threads, and a UDF that crashes or hangs takes down one runner, not the worker.
In process mode the parent runs this file's source with ``python -c`` (the
text is embedded in the Rust crate, so a worker's environment needs only
pyarrow and cloudpickle) and talks to it over the one socket it inherits as
file descriptor 3; in in-process mode ``serve`` runs on a thread of the
parent's own interpreter over a socket pair. A runner opens no connection.

Protocol version 3. Every message, both ways, is

    kind: u8 | request: u64 LE | length: u64 LE | body: `length` bytes

``request`` is the parent's id for a call; every reply carries the id of the
call it answers (READY carries 0). The parent matches replies to calls by it
and treats a reply to no call, or any message it does not expect, as a broken
runner: it kills it. Ids are random, so code that writes to the socket by
mistake cannot answer a call by accident (code that reads this process's
memory can: a runner that serves several queries is one trust domain).

Parent to runner (the digest is the SHA-256 of the pickle, the function's key):
    LOAD      digest[32] | content u8 (CONTENT_*) | pickle        -> LOADED flags u8 (FLAG_*) | ERROR
    CALL      digest[32] | Arrow IPC stream (one batch, a column per argument, with its field)
                                                                   -> RESULT | ERROR
    FORGET    digest[32]                                           (no reply)
    AGGREGATE digest[32] | object u64 | create u8 | op u8 | count u64 | take u8 | streams
                                                                   -> DONE size u64 | RESULT | ERROR
    WINDOW    digest[32] | op u8 | streams                         -> RESULT | ERROR
    CLOSE     object u64                                           (no reply)
    CANCEL    (empty; ``request`` names the call to cancel)         (no reply)
Runner to parent:
    READY     protocol u16 | python major u8 | minor u8 | cloudpickle major u8 | pid u32
    LOADED    flags u8: FLAG_ASYNC (calls are coroutines), FLAG_CLASS (one instance per runner)
    RESULT    Arrow IPC stream: one batch, one column named "result"
    DONE      size u64: the bytes the call's object holds now (an estimate)
    ERROR     class u8 (the error classes below) | UTF-8 text
    OUTPUT    dropped lines u64 | dropped bytes u64 | (stream u8 (STREAM_*) | length u32 | UTF-8)*
              what a call wrote, sent just before its RESULT, DONE or ERROR (never for a
              call with no output)

``streams`` is a sequence of ``length: u64 LE | Arrow IPC stream of one batch``.

Class UDFs: a loaded class (or ``functools.partial`` of one) is instantiated
once per runner, on its first CALL, and the instance serves every later call
until the parent sends FORGET (then the next CALL loads and instantiates it
again). Async UDFs (``async def`` functions, or classes whose ``__call__`` is
``async def``) run on this runner's event loop thread, several at a time;
CANCEL cancels one.

Output: in a runner process, ``sys.stdout``, ``sys.stderr``, the root
logger (a handler of its own) and ``warnings.showwarning`` write into the
current call's capture (a context variable: async calls have their own), kept
up to ``_CALL_LINES`` lines and ``_CALL_BYTES`` bytes and counted past that,
and sent as OUTPUT with the call's answer. Writes outside any call (threads a
UDF started, code run while loading) go to the runner's own stderr, which is
its worker's log. Writes to file descriptors 1 and 2 from C code are not
captured either.

Aggregates keep their state here: an AGGREGATE call names an object (the
accumulators of one aggregate in one partition, one per group), created by
the call that says ``create`` and dropped by CLOSE. See ``Groups``.

The parent checks cluster-key signatures, strict mode and size limits before
a runner ever sees a pickle, and validates every result (length, type,
nullability, extension type, full Arrow validity) before the engine uses it.
"""

import sys

# `python -c` puts the working directory first on sys.path: before anything
# else is imported, make sure a stray file there cannot shadow a module.
if __name__ == "__main__" and sys.path and sys.path[0] == "":
    del sys.path[0]

import contextvars  # noqa: E402
import functools  # noqa: E402
import inspect  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from typing import Any  # noqa: E402

# The protocol: crates/dfship-runtime/src/protocol.rs declares the same
# numbers, and a test holds the two to each other (every public integer
# constant of this module is part of the protocol).
PROTOCOL_VERSION = 3
# Parent to runner.
LOAD = 1
CALL = 2
FORGET = 3
AGGREGATE = 4
WINDOW = 5
CLOSE = 6
CANCEL = 7
# Runner to parent.
READY = 10
LOADED = 11
RESULT = 12
ERROR = 13
DONE = 14
OUTPUT = 15
# Error classes.
RAISED = 0
MODULE_MISSING = 1
UNPICKLE_FAILED = 2
NOT_AN_ARRAY = 3
OUT_OF_MEMORY = 4
PROTOCOL = 5
STARTUP = 6
BAD_RESULT = 7
INIT_FAILED = 8
# What a LOAD carries.
CONTENT_CALLABLE = 0
CONTENT_DATAFUSION_TUPLE = 1
# LOADED flags.
FLAG_ASYNC = 1
FLAG_CLASS = 2
# Aggregate ops.
AGG_UPDATE = 0
AGG_MERGE = 1
AGG_STATE = 2
AGG_EVALUATE = 3
AGG_CONVERT = 4
# Window ops.
WIN_DESCRIBE = 0
WIN_ALL = 1
WIN_RANK = 2
WIN_FRAMES = 3
# Where an OUTPUT line was written.
STREAM_STDOUT = 0
STREAM_STDERR = 1
STREAM_LOGGING = 2
STREAM_WARNING = 3

_HEADER = struct.Struct("<BQQ")
_AGGREGATE_HEAD = struct.Struct("<QBBQB")
_TRACEBACK_FRAMES = 5


# What one call's output keeps at most (the rest is counted).
_CALL_LINES = 10_000
_CALL_BYTES = 1 << 20
_LINE = struct.Struct("<BI")


class Capture:
    """What one call writes: whole lines per stream, bounded, and what was dropped."""

    __slots__ = ("lines", "size", "dropped_lines", "dropped_bytes", "partial")

    def __init__(self) -> None:
        self.lines: list[tuple[int, str]] = []
        self.size = 0
        self.dropped_lines = 0
        self.dropped_bytes = 0
        self.partial: dict[int, str] = {}

    def line(self, stream: int, text: str) -> None:
        if len(self.lines) >= _CALL_LINES or self.size + len(text) > _CALL_BYTES:
            self.dropped_lines += 1
            self.dropped_bytes += len(text)
            return
        self.lines.append((stream, text))
        self.size += len(text)

    def write(self, stream: int, text: str) -> None:
        if len(self.lines) >= _CALL_LINES or self.size >= _CALL_BYTES:
            # Full: count, keep nothing (a UDF printing a million lines stays cheap).
            self.dropped_lines += text.count("\n")
            self.dropped_bytes += len(text)
            return
        pending = self.partial.pop(stream, "") + text
        *complete, rest = pending.split("\n")
        for line in complete:
            self.line(stream, line)
        if rest:
            self.partial[stream] = rest[:_CALL_BYTES]

    def body(self) -> bytes | None:
        """The OUTPUT body, or None when the call wrote nothing."""
        for stream, rest in sorted(self.partial.items()):
            self.line(stream, rest)
        self.partial.clear()
        if not self.lines and not self.dropped_lines:
            return None
        parts = [struct.pack("<QQ", self.dropped_lines, self.dropped_bytes)]
        for stream, text in self.lines:
            data = text.encode("utf-8", "replace")
            parts.append(_LINE.pack(stream, len(data)))
            parts.append(data)
        return b"".join(parts)


_capture: contextvars.ContextVar[Capture | None] = contextvars.ContextVar("dfship_capture", default=None)


class _CapturedStream(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` of a runner: the current call's capture, else ``fallback``."""

    def __init__(self, stream: int, fallback: Any) -> None:
        super().__init__()
        self.stream = stream
        self.fallback = fallback

    def write(self, text: str) -> int:
        capture = _capture.get()
        if capture is None:
            return int(self.fallback.write(text) or 0)
        capture.write(self.stream, str(text))
        return len(text)

    def flush(self) -> None:
        if _capture.get() is None:
            self.fallback.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"


class _CapturedLogs(logging.Handler):
    """The root logger's handler in a runner: records go to the current call's capture."""

    def __init__(self, fallback: Any) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.fallback = fallback

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is not a call failure
            text = f"{record.levelname} {record.name}: (unformattable record {record.msg!r})"
        capture = _capture.get()
        if capture is None:
            self.fallback.write(text + "\n")
            return
        for line in text.split("\n"):
            capture.line(STREAM_LOGGING, line)


def _capture_output() -> None:
    """Sends what calls write to their capture (a runner process only: in-process
    runners share the host's streams and leave them alone)."""
    fallback = sys.stderr
    sys.stdout = _CapturedStream(STREAM_STDOUT, fallback)
    sys.stderr = _CapturedStream(STREAM_STDERR, fallback)
    logging.getLogger().addHandler(_CapturedLogs(fallback))
    show = warnings.showwarning

    def showwarning(
        message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        capture = _capture.get()
        if capture is None or file is not None:
            show(message, category, filename, lineno, file, line)
            return
        capture.line(STREAM_WARNING, f"{filename}:{lineno}: {category.__name__}: {message}")

    warnings.showwarning = showwarning


def _describe(error: BaseException) -> str:
    frames = traceback.format_tb(error.__traceback__)[-_TRACEBACK_FRAMES:]
    text = f"{type(error).__name__}: {error}"
    if frames:
        text += "\nTraceback (most recent call last):\n" + "".join(frames).rstrip()
    return text


class Failure(Exception):
    """A call failed; ``error_class`` and ``text`` become its ERROR message."""

    def __init__(self, error_class: int, text: str) -> None:
        super().__init__(text)
        self.error_class = error_class
        self.text = text


def _user(what: str, call: Any, *args: Any) -> Any:
    """Calls user code; what it raises becomes a RAISED failure naming ``what``."""
    try:
        return call(*args)
    except MemoryError as error:
        raise Failure(OUT_OF_MEMORY, _describe(error)) from None
    except Failure:
        raise
    except Exception as error:
        raise Failure(RAISED, f"{what} raised {_describe(error)}") from None


def _stream_batch(pa: Any, data: Any) -> Any:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_next_batch()


def _batches(pa: Any, streams: memoryview) -> list[Any]:
    batches = []
    at = 0
    while at < len(streams):
        if at + 8 > len(streams):
            raise Failure(PROTOCOL, "a truncated stream length")
        (length,) = struct.unpack_from("<Q", streams, at)
        at += 8
        if at + length > len(streams):
            raise Failure(PROTOCOL, "a stream longer than its message")
        batches.append(_stream_batch(pa, streams[at : at + length]))
        at += length
    return batches


def _plain(pa: Any, value: Any) -> Any:
    return value.as_py() if isinstance(value, pa.Scalar) else value


def _column(pa: Any, values: list[Any], data_type: Any, what: str) -> Any:
    plain = [_plain(pa, value) for value in values]
    try:
        return pa.array(plain, type=data_type)
    except MemoryError as error:
        raise Failure(OUT_OF_MEMORY, _describe(error)) from None
    except Exception as error:
        culprit: Any = None
        for value in plain:
            try:
                pa.array([value], type=data_type)
            except Exception:
                culprit = value
                break
        detail = (
            f"{what} returned {culprit!r}, which is not of its declared type {data_type} ({error}); "
            "return values of that type, or declare the type it returns"
        )
        raise Failure(BAD_RESULT, detail) from None


def _as_array(pa: Any, result: Any, what: str) -> Any:
    if isinstance(result, pa.ChunkedArray):
        result = result.combine_chunks()
    if not isinstance(result, pa.Array) and hasattr(result, "__arrow_c_array__"):
        try:
            result = pa.array(result)
        except Exception as error:
            detail = f"{what} returned an object pyarrow cannot read ({_describe(error)})"
            raise Failure(BAD_RESULT, detail) from None
    if not isinstance(result, pa.Array):
        detail = (
            f"{what} must return a pyarrow.Array (e.g. pa.array(values, type=...)), "
            f"but it returned a {type(result).__name__}"
        )
        raise Failure(BAD_RESULT, detail)
    return result


def _scalar_result(pa: Any, result: Any) -> Any:
    """What a scalar UDF returned, as a pyarrow array (NOT_AN_ARRAY says what it was otherwise)."""
    if isinstance(result, pa.ChunkedArray):
        return result.combine_chunks()
    if not isinstance(result, pa.Array) and hasattr(result, "__arrow_c_array__"):
        try:
            return pa.array(result)
        except Exception as error:
            raise Failure(NOT_AN_ARRAY, _describe(error)) from None
    if not isinstance(result, pa.Array):
        raise Failure(NOT_AN_ARRAY, f"it returned a {type(result).__name__}")
    return result


def _result_stream(pa: Any, result: Any) -> bytes:
    """``result`` (a pyarrow array) as a RESULT body; its field keeps an extension type."""
    try:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, pa.schema([pa.field("result", result.type)])) as writer:
            writer.write_batch(pa.record_batch([result], names=["result"]))
        output: bytes = sink.getvalue()
        return output
    except MemoryError as error:
        raise Failure(OUT_OF_MEMORY, _describe(error)) from None
    except Exception as error:
        detail = f"returned a value that cannot be sent as Arrow ({_describe(error)})"
        raise Failure(BAD_RESULT, detail) from None


def _deep_size(value: Any, budget: int = 2000) -> int:
    """An estimate of the bytes ``value`` holds: Arrow and NumPy buffers, containers, attributes."""
    seen: set[int] = set()
    total = 0
    stack = [value]
    while stack and budget > 0:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        budget -= 1
        nbytes = getattr(item, "nbytes", None)
        if isinstance(nbytes, int) and not isinstance(item, type):
            total += nbytes
            continue
        try:
            total += sys.getsizeof(item)
        except TypeError:
            total += 64
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif not isinstance(item, (str, bytes, bytearray, int, float, bool, type(None))):
            attributes = getattr(item, "__dict__", None)
            if isinstance(attributes, dict):
                stack.append(attributes)
            for name in getattr(type(item), "__slots__", ()):
                if hasattr(item, name):
                    stack.append(getattr(item, name))
    return total


class Function:
    """What a LOAD delivered: a callable, an accumulator factory or an evaluator factory."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        target: Any = obj.func if isinstance(obj, functools.partial) else obj
        self.is_class = isinstance(target, type)
        self.name = str(getattr(target, "__qualname__", None) or type(target).__name__)
        call = target.__call__ if self.is_class else obj
        self.is_async = inspect.iscoroutinefunction(call) or (
            not self.is_class and inspect.iscoroutinefunction(type(obj).__call__)
        )
        self.instance: Any = None

    def flags(self) -> int:
        return (FLAG_ASYNC if self.is_async else 0) | (FLAG_CLASS if self.is_class else 0)

    def callable(self) -> Any:
        """The function a CALL calls: for a class, its one instance here (made on first use)."""
        if not self.is_class:
            return self.obj
        if self.instance is None:
            try:
                self.instance = self.obj()
            except MemoryError as error:
                raise Failure(OUT_OF_MEMORY, _describe(error)) from None
            except Exception as error:
                raise Failure(INIT_FAILED, f"{self.name}() raised {_describe(error)}") from None
        return self.instance


def _rows_by_group(pa: Any, groups: Any, columns: list[Any]) -> tuple[list[Any], dict[int, tuple[int, int]]]:
    """``columns`` with their rows ordered by group, and each group's (start, length) in them.

    One ``take`` per column for the whole batch; each group's rows are then a
    zero-copy slice (as DataFusion's own per-group adapter does)."""
    import pyarrow.compute as pc

    if len(groups) == 0:
        return columns, {}
    first, last = pc.min_max(groups).values()
    if first.as_py() == last.as_py():
        return columns, {first.as_py(): (0, len(groups))}
    order = pc.sort_indices(groups)
    runs = pc.run_end_encode(groups.take(order))
    spans, start = {}, 0
    for group, end in zip(runs.values.to_pylist(), runs.run_ends.to_pylist(), strict=True):
        spans[group] = (start, end - start)
        start = end
    return [column.take(order) for column in columns], spans


class Groups:
    """The accumulators of one aggregate in one partition, one per group.

    Group numbers are DataFusion's; a group's accumulator is made by the
    factory the first time the group is touched (or emitted untouched). STATE
    and EVALUATE with ``take`` remove the first ``count`` groups and renumber
    the others from 0, as DataFusion's ``EmitTo::First`` does.
    """

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self.accumulators: list[Any] = []

    def _reach(self, count: int) -> None:
        if len(self.accumulators) < count:
            self.accumulators.extend([None] * (count - len(self.accumulators)))

    def _get(self, group: int) -> Any:
        accumulator = self.accumulators[group]
        if accumulator is None:
            accumulator = _user("the accumulator factory", self.factory)
            self.accumulators[group] = accumulator
        return accumulator

    def apply(self, pa: Any, op: int, count: int, rows: Any) -> None:
        self._reach(count)
        data, spans = _rows_by_group(pa, rows.column(0), rows.columns[1:])
        for group, (start, length) in spans.items():
            if not 0 <= group < len(self.accumulators):
                announced = len(self.accumulators)
                raise Failure(PROTOCOL, f"group {group} outside the {announced} groups announced")
            accumulator = self._get(group)
            sliced = [column.slice(start, length) for column in data]
            if op == AGG_UPDATE:
                _user("update()", accumulator.update, *sliced)
            else:
                _user("merge()", accumulator.merge, sliced)

    def emit(self, count: int, take: bool) -> list[Any]:
        self._reach(count)
        emitted = [self._get(group) for group in range(count)]
        if take:
            del self.accumulators[:count]
        return emitted

    def size(self) -> int:
        present = [a for a in self.accumulators if a is not None]
        if not present:
            return 8 * len(self.accumulators)
        samples = {id(a): a for a in (present[0], present[len(present) // 2], present[-1])}
        per_group = max(_deep_size(a) for a in samples.values())
        return len(present) * per_group + 8 * len(self.accumulators)


def _states(pa: Any, accumulators: list[Any], state_type: Any) -> Any:
    """One struct value per accumulator: its ``state()``, checked against the declared state fields."""
    fields = list(state_type)
    states = []
    for accumulator in accumulators:
        state = _user("state()", accumulator.state)
        state = list(state) if isinstance(state, (list, tuple, pa.Array)) else [state]
        if len(state) != len(fields):
            types = ", ".join(str(field.type) for field in fields)
            raise Failure(
                BAD_RESULT,
                f"state() returned {len(state)} values, but the aggregate declares "
                f"{len(fields)} state fields ({types}); return one value per state type",
            )
        states.append(state)
    columns = [
        _column(pa, [state[i] for state in states], field.type, f"state() value {i}")
        for i, field in enumerate(fields)
    ]
    return pa.StructArray.from_arrays(columns, fields=fields)


def _flag(evaluator: Any, name: str) -> bool:
    method = getattr(evaluator, name, None)
    return bool(_user(f"{name}()", method)) if callable(method) else False


def _window(pa: Any, factory: Any, op: int, batches: list[Any]) -> Any:
    """One op of a window evaluator over one partition (a fresh evaluator per call).

    WIN_DESCRIBE (no streams): answers the evaluator's flags
    ``uses_window_frame``, ``supports_bounded_execution``, ``include_rank``,
    ``is_causal``. The others: stream 0 holds the partition's values (the
    arguments, then the ORDER BY columns), stream 1 is an empty batch whose
    one field is the return field. WIN_ALL answers ``evaluate_all``; WIN_RANK
    adds stream 2, the ``start``/``end`` of each rank; WIN_FRAMES adds stream
    2, the ``start``/``end`` of each row's frame, and answers ``evaluate`` of
    every frame, all in this one call.
    """
    evaluator = _user("the window evaluator factory", factory)
    if op == WIN_DESCRIBE:
        names = ("uses_window_frame", "supports_bounded_execution", "include_rank", "is_causal")
        return pa.array([_flag(evaluator, name) for name in names])
    values, returns = batches[0], batches[1].schema.field(0).type
    columns, rows = list(values.columns), values.num_rows
    if op == WIN_ALL:
        bounded = _flag(evaluator, "supports_bounded_execution")
        if bounded and not _flag(evaluator, "uses_window_frame") and not _flag(evaluator, "include_rank"):
            # An evaluator that computes one row at a time: every row, in order.
            results = []
            for row in range(rows):
                start, end = _user("get_range()", evaluator.get_range, row, rows)
                results.append(_user("evaluate()", evaluator.evaluate, columns, (start, end)))
            return _column(pa, results, returns, "evaluate()")
        return _as_array(pa, _user("evaluate_all()", evaluator.evaluate_all, columns, rows), "evaluate_all()")
    if op == WIN_RANK:
        ranks = batches[2]
        pairs = list(zip(ranks.column(0).to_pylist(), ranks.column(1).to_pylist(), strict=True))
        result = _user("evaluate_all_with_rank()", evaluator.evaluate_all_with_rank, rows, pairs)
        return _as_array(pa, result, "evaluate_all_with_rank()")
    if op == WIN_FRAMES:
        frames = batches[2]
        starts, ends = frames.column(0).to_pylist(), frames.column(1).to_pylist()
        evaluate = evaluator.evaluate
        results = [_user("evaluate()", evaluate, columns, frame) for frame in zip(starts, ends, strict=True)]
        return _column(pa, results, returns, "evaluate()")
    raise Failure(PROTOCOL, f"unknown window op {op}")


class Runner:
    """Serves the parent's messages on ``sock`` until the parent closes it."""

    def __init__(self, sock: socket.socket, pa: Any, cloudpickle: Any) -> None:
        self.sock = sock
        self.pa = pa
        self.cloudpickle = cloudpickle
        self.functions: dict[bytes, Function] = {}
        # A LOAD that failed: the calls sent right after it answer its error.
        self.failed_loads: dict[bytes, Failure] = {}
        self.objects: dict[int, Groups] = {}
        self.send_lock = threading.Lock()
        self.loop: Any = None
        self.tasks: dict[int, Any] = {}
        self.tasks_lock = threading.Lock()

    # Messages.

    def _recv_exactly(self, size: int) -> bytearray:
        buffer = bytearray(size)
        view = memoryview(buffer)
        received = 0
        while received < size:
            count = self.sock.recv_into(view[received:], size - received)
            if count == 0:
                raise EOFError("the parent closed the connection")
            received += count
        return buffer

    def send(self, kind: int, request: int, *parts: Any) -> None:
        length = sum(len(memoryview(part).cast("B")) for part in parts)
        with self.send_lock:
            self.sock.sendall(_HEADER.pack(kind, request, length))
            for part in parts:
                self.sock.sendall(part)

    def error(self, request: int, error_class: int, text: str) -> None:
        self.send(ERROR, request, bytes([error_class]), text.encode("utf-8", "replace"))

    def serve(self) -> None:
        try:
            while True:
                kind, request, length = _HEADER.unpack(self._recv_exactly(_HEADER.size))
                body = memoryview(self._recv_exactly(length))
                try:
                    self.dispatch(kind, request, body)
                except Failure as failure:
                    self.error(request, failure.error_class, failure.text)
        except EOFError:
            pass
        finally:
            if self.loop is not None:
                self.loop.call_soon_threadsafe(self.loop.stop)

    def dispatch(self, kind: int, request: int, body: memoryview) -> None:
        if kind == CANCEL:
            with self.tasks_lock:
                task = self.tasks.pop(request, None)
            if task is not None:
                task.cancel()
            return
        if kind == CLOSE:
            if len(body) != 8:
                raise Failure(PROTOCOL, "a CLOSE without an object number")
            self.objects.pop(struct.unpack_from("<Q", body)[0], None)
            return
        if len(body) < 32:
            raise Failure(PROTOCOL, f"message kind {kind} without a digest")
        digest = bytes(body[:32])
        if kind == LOAD:
            self.load(request, digest, body[32:])
        elif kind == FORGET:
            self.functions.pop(digest, None)
            self.failed_loads.pop(digest, None)
        elif kind in (CALL, AGGREGATE, WINDOW):
            function = self.functions.get(digest)
            if function is None:
                failed = self.failed_loads.get(digest)
                if failed is not None:
                    raise Failure(failed.error_class, failed.text)
                raise Failure(PROTOCOL, "a call for a function that was never loaded")
            capture = Capture()
            token = _capture.set(capture)
            try:
                answer = self.run(kind, request, function, body)
            finally:
                # Before the answer (or the ERROR that dispatch's caller sends).
                _capture.reset(token)
                self.send_output(request, capture)
            if answer is not None:
                self.send(*answer)
        else:
            raise Failure(PROTOCOL, f"unknown message kind {kind}")

    def run(self, kind: int, request: int, function: Function, body: memoryview) -> tuple[Any, ...] | None:
        """One call; its answer as ``send`` arguments (None: answered later, by an async call)."""
        if kind == CALL:
            return self.call(request, function, body[32:])
        if kind == AGGREGATE:
            return self.aggregate(request, function, body[32:])
        if len(body) < 33:
            raise Failure(PROTOCOL, "a WINDOW call without an op")
        result = _window(self.pa, function.obj, body[32], _batches(self.pa, body[33:]))
        return (RESULT, request, _result_stream(self.pa, result))

    def send_output(self, request: int, capture: Capture) -> None:
        body = capture.body()
        if body is not None:
            self.send(OUTPUT, request, body)

    # Ops.

    def load(self, request: int, digest: bytes, body: memoryview) -> None:
        if len(body) < 1:
            raise Failure(PROTOCOL, "a LOAD without content")
        content, pickle = body[0], body[1:]
        try:
            loaded = self.cloudpickle.loads(pickle)
            function = Function(loaded[1] if content == CONTENT_DATAFUSION_TUPLE else loaded)
        except ModuleNotFoundError as error:
            failure = Failure(MODULE_MISSING, error.name or str(error))
        except MemoryError as error:
            failure = Failure(OUT_OF_MEMORY, _describe(error))
        except Exception as error:
            failure = Failure(UNPICKLE_FAILED, _describe(error))
        else:
            self.failed_loads.pop(digest, None)
            self.functions[digest] = function
            self.send(LOADED, request, bytes([function.flags()]))
            return
        self.failed_loads[digest] = failure
        raise failure

    def call(self, request: int, function: Function, stream: memoryview) -> tuple[Any, ...] | None:
        pa = self.pa
        try:
            batch = _stream_batch(pa, stream)
        except Exception as error:
            raise Failure(PROTOCOL, f"an argument batch that is not Arrow ({_describe(error)})") from None
        target = function.callable()
        if function.is_async:
            self.start_async(request, target, batch.columns)
            return None
        try:
            result = target(*batch.columns)
        except MemoryError as error:
            raise Failure(OUT_OF_MEMORY, _describe(error)) from None
        except Exception as error:
            raise Failure(RAISED, _describe(error)) from None
        return (RESULT, request, _result_stream(pa, _scalar_result(pa, result)))

    def aggregate(self, request: int, function: Function, body: memoryview) -> tuple[Any, ...]:
        pa = self.pa
        if len(body) < _AGGREGATE_HEAD.size:
            raise Failure(PROTOCOL, "a truncated AGGREGATE call")
        number, create, op, count, take = _AGGREGATE_HEAD.unpack_from(body)
        batches = _batches(pa, body[_AGGREGATE_HEAD.size :])
        if op == AGG_CONVERT:
            # Each row as the state of an accumulator that saw only that row
            # (column 0 says whether to keep the row: one the filter drops
            # gives a fresh accumulator's state).
            rows, state_type = batches[0], batches[1].schema.field(0).type
            keep, arguments = rows.column(0).to_pylist(), rows.columns[1:]
            accumulators = []
            for row in range(rows.num_rows):
                accumulator = _user("the accumulator factory", function.obj)
                if keep[row]:
                    _user("update()", accumulator.update, *(column.slice(row, 1) for column in arguments))
                accumulators.append(accumulator)
            return (RESULT, request, _result_stream(pa, _states(pa, accumulators, state_type)))
        if create:
            if number in self.objects:
                raise Failure(PROTOCOL, f"object {number} exists already")
            self.objects[number] = Groups(function.obj)
        groups = self.objects.get(number)
        if groups is None:
            raise Failure(PROTOCOL, f"object {number} does not exist here")
        if op in (AGG_UPDATE, AGG_MERGE):
            groups.apply(pa, op, count, batches[0])
            return (DONE, request, struct.pack("<Q", groups.size()))
        if op == AGG_STATE:
            state_type = batches[0].schema.field(0).type
            states = _states(pa, groups.emit(count, bool(take)), state_type)
            return (RESULT, request, _result_stream(pa, states))
        if op == AGG_EVALUATE:
            returns = batches[0].schema.field(0).type
            values = [_user("evaluate()", a.evaluate) for a in groups.emit(count, bool(take))]
            return (RESULT, request, _result_stream(pa, _column(pa, values, returns, "evaluate()")))
        raise Failure(PROTOCOL, f"unknown aggregate op {op}")

    # Async calls.

    def event_loop(self) -> Any:
        if self.loop is None:
            import asyncio

            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="dfship-runner-loop", daemon=True)
            thread.start()
            self.loop = loop
        return self.loop

    def start_async(self, request: int, target: Any, columns: list[Any]) -> None:
        import asyncio

        capture = Capture()

        async def run() -> Any:
            # This task's own context: what it writes is this call's.
            _capture.set(capture)
            return await target(*columns)

        future = asyncio.run_coroutine_threadsafe(run(), self.event_loop())
        with self.tasks_lock:
            self.tasks[request] = future
        future.add_done_callback(lambda done: self.finish_async(request, done, capture))

    def finish_async(self, request: int, future: Any, capture: Capture) -> None:
        with self.tasks_lock:
            self.tasks.pop(request, None)
        if future.cancelled():
            return
        self.send_output(request, capture)
        try:
            error = future.exception()
            if error is not None:
                if isinstance(error, MemoryError):
                    raise Failure(OUT_OF_MEMORY, _describe(error))
                raise Failure(RAISED, _describe(error))
            output = _result_stream(self.pa, _scalar_result(self.pa, future.result()))
        except Failure as failure:
            self.error(request, failure.error_class, failure.text)
            return
        self.send(RESULT, request, output)


def serve(sock: socket.socket) -> None:
    """Announces this runner on ``sock`` (READY; ERROR without pyarrow or cloudpickle), then serves it."""
    try:
        import cloudpickle
        import pyarrow as pa
        import pyarrow.compute  # noqa: F401
        import pyarrow.ipc  # noqa: F401
    except Exception as error:
        text = f"{_describe(error)} (Python {sys.version.split()[0]} at {sys.executable})"
        header = _HEADER.pack(ERROR, 0, 1 + len(text.encode()))
        sock.sendall(header + bytes([STARTUP]) + text.encode())
        return
    # A process's first compute call pays for pyarrow's kernel set-up (about
    # 0.2 s): here, before READY, in the background of a warm-up or a
    # replacement, not in a UDF's first call (under query isolation, every
    # query's first calls are on fresh runners).
    try:
        pyarrow.compute.add(pa.array([0], pa.int64()), 1)
    except Exception:  # noqa: BLE001 - a warm-up only; the UDFs will say what fails
        pass
    runner = Runner(sock, pa, cloudpickle)
    cloudpickle_major = int(cloudpickle.__version__.split(".")[0])
    info = sys.version_info
    ready = struct.pack("<HBBBI", PROTOCOL_VERSION, info.major, info.minor, cloudpickle_major, os.getpid())
    runner.send(READY, 0, ready)
    runner.serve()


def _make_undumpable() -> None:
    """PR_SET_DUMPABLE 0, before any UDF runs: processes of the same user
    (other runners among them) can then neither trace this one nor read its
    /proc/<pid>/mem, environ or descriptors, with or without Yama. exec
    resets the flag, so the runner sets it itself. A UDF may set it back on
    its own runner only, which exposes nothing of another query."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_dumpable = 4
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_dumpable, 0, 0, 0, 0) != 0:
        print(
            f"dfship runner: PR_SET_DUMPABLE failed (errno {ctypes.get_errno()}): processes of "
            "this user can read this runner's memory",
            file=sys.stderr,
        )


def main() -> None:
    _make_undumpable()
    # The parent handles Ctrl-C and stops its runners itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _capture_output()
    serve(socket.socket(fileno=3))


if __name__ == "__main__":
    main()
