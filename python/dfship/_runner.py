"""A UDF runner: one process of a worker's runner pool.

A process that executes query stages (a worker, or a coordinator for the
stages it keeps) starts a few of these and sends them the batches its Python
UDFs must evaluate, so Python runs on every core, outside the engine's
threads, and a UDF that crashes or hangs takes down one runner, not the worker.

The parent runs this file's source with ``python -c`` (it embeds the text,
so the runner needs only pyarrow and cloudpickle, not the dfship package)
and talks to it over the one socket it inherits as file descriptor 3; a
runner opens no other connection. Messages both ways are framed as

    kind: u8 | length: u64 little-endian | body: `length` bytes

Parent to runner:
    LOAD      digest[32] | content u8 (0 a callable, 1 a DFPYUDF tuple) | pickle
    CALL      digest[32] | Arrow IPC stream: one batch, one column per argument
    FORGET    digest[32]
    AGGREGATE digest[32] | op u8 | streams   (the callable is an accumulator factory)
    WINDOW    digest[32] | op u8 | streams   (the callable is a window evaluator factory)
Runner to parent:
    READY     python major u8 | python minor u8 | cloudpickle major u8 | pid u32
    LOADED    (empty)
    RESULT    Arrow IPC stream: one batch, one column named "result"
    ERROR     class u8 | UTF-8 text (class: 0 the UDF raised, 1 a module is
              missing (text = its name), 2 unpickling failed, 3 the UDF
              returned something that is not an Arrow array, 4 out of
              memory, 5 protocol error, 6 start-up failed, 7 the UDF
              returned a value of the wrong shape (text says how))

AGGREGATE and WINDOW are stateless: all state an accumulator holds between
calls travels with the call as Arrow (its declared state schema), so any
runner can serve any call and a lost runner loses no state. `streams` is a
sequence of `length: u64 LE | Arrow IPC stream of one batch`; the answer is a
RESULT. See `_aggregate` and `_window` for the ops and their streams.

The parent checks cluster-key signatures, strict mode and size limits before
a runner ever sees a pickle, and validates every result (length, type,
nullability, full Arrow validity) before the engine uses it.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
import traceback
from typing import Any

LOAD, CALL, FORGET, AGGREGATE, WINDOW = 1, 2, 3, 4, 5
READY, LOADED, RESULT, ERROR = 10, 11, 12, 13
RAISED, MODULE_MISSING, UNPICKLE_FAILED, NOT_AN_ARRAY, OUT_OF_MEMORY, PROTOCOL, STARTUP, BAD_RESULT = range(8)
# Aggregate ops.
UPDATE, MERGE, EVALUATE = 0, 1, 2
# Window ops.
DESCRIBE, ALL, RANK, FRAME = 0, 1, 2, 3
HEADER = struct.Struct("<BQ")
TRACEBACK_FRAMES = 5


def _recv_exactly(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        count = sock.recv_into(view[received:], size - received)
        if count == 0:
            raise EOFError("the parent closed the connection")
        received += count
    return buffer


def _send(sock: socket.socket, kind: int, *parts: Any) -> None:
    length = sum(len(memoryview(part).cast("B")) for part in parts)
    sock.sendall(HEADER.pack(kind, length))
    for part in parts:
        sock.sendall(part)


def _error(sock: socket.socket, error_class: int, text: str) -> None:
    _send(sock, ERROR, bytes([error_class]), text.encode("utf-8", "replace"))


def _describe(error: BaseException) -> str:
    frames = traceback.format_tb(error.__traceback__)[-TRACEBACK_FRAMES:]
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
        batches.append(pa.ipc.open_stream(pa.py_buffer(streams[at : at + length])).read_next_batch())
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
        result = pa.array(result)
    if not isinstance(result, pa.Array):
        detail = (
            f"{what} must return a pyarrow.Array (e.g. pa.array(values, type=...)), "
            f"but it returned a {type(result).__name__}"
        )
        raise Failure(BAD_RESULT, detail)
    return result


def _rows_by_group(pa: Any, groups: Any, columns: list[Any]) -> tuple[list[Any], dict[int, tuple[int, int]]]:
    """``columns`` with their rows ordered by group, and each group's (start, length) in them.

    One ``take`` per column for the whole batch; each group's rows are then a
    zero-copy slice (as DataFusion's own per-group adapter does)."""
    import pyarrow.compute as pc

    if len(groups) == 0:
        return columns, {}
    order = pc.sort_indices(groups)
    runs = pc.run_end_encode(groups.take(order))
    spans, start = {}, 0
    for group, end in zip(runs.values.to_pylist(), runs.run_ends.to_pylist(), strict=True):
        spans[group] = (start, end - start)
        start = end
    return [column.take(order) for column in columns], spans


def _aggregate(pa: Any, factory: Any, op: int, batches: list[Any]) -> Any:
    """One op over the accumulators of several groups.

    Stream 0 holds one row per group: ``known`` (bool; false means no state
    yet) and the state fields. UPDATE: stream 1 is ``group`` (int64, an index
    into stream 0) and the arguments; MERGE: ``group`` and state fields of
    other accumulators; both answer the groups' new states as one struct
    column. EVALUATE: stream 1 is an empty batch whose one field is the
    return type; answers one value per group.
    """
    states = batches[0]
    known = states.column(0).to_pylist()
    state_columns = states.columns[1:]
    state_fields = list(states.schema)[1:]

    def accumulator(group: int) -> Any:
        created = _user("the accumulator factory", factory)
        if known[group]:
            _user("merge()", created.merge, [column.slice(group, 1) for column in state_columns])
        return created

    if op == EVALUATE:
        returns = batches[1].schema.field(0).type
        values = [_user("evaluate()", accumulator(group).evaluate) for group in range(len(known))]
        return _column(pa, values, returns, "evaluate()")
    if op not in (UPDATE, MERGE):
        raise Failure(PROTOCOL, f"unknown aggregate op {op}")
    rows = batches[1]
    data, spans = _rows_by_group(pa, rows.column(0), rows.columns[1:])
    new_states = []
    for group in range(len(known)):
        created = accumulator(group)
        span = spans.get(group)
        if span is not None:
            sliced = [column.slice(*span) for column in data]
            if op == UPDATE:
                _user("update()", created.update, *sliced)
            else:
                _user("merge()", created.merge, sliced)
        state = _user("state()", created.state)
        state = list(state) if isinstance(state, (list, tuple, pa.Array)) else [state]
        if len(state) != len(state_fields):
            types = ", ".join(str(field.type) for field in state_fields)
            raise Failure(
                BAD_RESULT,
                f"state() returned {len(state)} values, but the aggregate declares "
                f"{len(state_fields)} state fields ({types}); return one value per state type",
            )
        new_states.append(state)
    columns = [
        _column(pa, [state[i] for state in new_states], field.type, f"state() value {i}")
        for i, field in enumerate(state_fields)
    ]
    return pa.StructArray.from_arrays(columns, fields=state_fields)


def _flag(evaluator: Any, name: str) -> bool:
    method = getattr(evaluator, name, None)
    return bool(_user(f"{name}()", method)) if callable(method) else False


def _window(pa: Any, factory: Any, op: int, batches: list[Any]) -> Any:
    """One op of a window evaluator over one partition.

    DESCRIBE (no streams): answers the evaluator's flags ``uses_window_frame``,
    ``supports_bounded_execution``, ``include_rank``, ``is_causal``. ALL, RANK
    and FRAME: stream 0 holds the partition's argument (and ORDER BY) columns,
    stream 1 is an empty batch whose one field is the return type; RANK adds
    stream 2 with the ``start``/``end`` of each rank. ALL and RANK answer one
    value per row; FRAME evaluates the whole of stream 0 as one frame and
    answers one value.
    """
    evaluator = _user("the window evaluator factory", factory)
    if op == DESCRIBE:
        names = ("uses_window_frame", "supports_bounded_execution", "include_rank", "is_causal")
        return pa.array([_flag(evaluator, name) for name in names])
    values, returns = batches[0], batches[1].schema.field(0).type
    columns, rows = list(values.columns), values.num_rows
    if op == ALL:
        bounded = _flag(evaluator, "supports_bounded_execution")
        if bounded and not _flag(evaluator, "uses_window_frame") and not _flag(evaluator, "include_rank"):
            # An evaluator that computes one row at a time: every row, in order.
            results = []
            for row in range(rows):
                start, end = _user("get_range()", evaluator.get_range, row, rows)
                results.append(_user("evaluate()", evaluator.evaluate, columns, (start, end)))
            return _column(pa, results, returns, "evaluate()")
        return _as_array(pa, _user("evaluate_all()", evaluator.evaluate_all, columns, rows), "evaluate_all()")
    if op == RANK:
        ranks = batches[2]
        pairs = list(zip(ranks.column(0).to_pylist(), ranks.column(1).to_pylist(), strict=True))
        result = _user("evaluate_all_with_rank()", evaluator.evaluate_all_with_rank, rows, pairs)
        return _as_array(pa, result, "evaluate_all_with_rank()")
    if op == FRAME:
        value = _user("evaluate()", evaluator.evaluate, columns, (0, rows))
        return _column(pa, [value], returns, "evaluate()")
    raise Failure(PROTOCOL, f"unknown window op {op}")


def stateless_call(pa: Any, kind: int, factory: Any, body: memoryview) -> bytes:
    """An AGGREGATE or WINDOW call (``body`` after the digest) to RESULT bytes.

    Runs in a runner, and in a worker's own interpreter in in-process mode.
    """
    if len(body) < 1:
        raise Failure(PROTOCOL, "a call without an op")
    op, batches = body[0], _batches(pa, body[1:])
    result = (_aggregate if kind == AGGREGATE else _window)(pa, factory, op, batches)
    try:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, pa.schema([pa.field("result", result.type)])) as writer:
            writer.write_batch(pa.record_batch([result], names=["result"]))
        output: bytes = sink.getvalue().to_pybytes()
        return output
    except MemoryError as error:
        raise Failure(OUT_OF_MEMORY, _describe(error)) from None
    except Exception as error:
        detail = f"returned a value that cannot be sent as Arrow ({_describe(error)})"
        raise Failure(BAD_RESULT, detail) from None


def _serve(sock: socket.socket, pa: Any, cloudpickle: Any) -> None:
    functions: dict[bytes, Any] = {}
    while True:
        kind, length = HEADER.unpack(_recv_exactly(sock, HEADER.size))
        body = _recv_exactly(sock, length)
        digest = bytes(body[:32])
        if kind == LOAD:
            content, pickle = body[32], memoryview(body)[33:]
            try:
                loaded = cloudpickle.loads(pickle)
                functions[digest] = loaded[1] if content == 1 else loaded
            except ModuleNotFoundError as error:
                _error(sock, MODULE_MISSING, error.name or str(error))
                continue
            except MemoryError as error:
                _error(sock, OUT_OF_MEMORY, _describe(error))
                continue
            except Exception as error:
                _error(sock, UNPICKLE_FAILED, _describe(error))
                continue
            _send(sock, LOADED)
        elif kind == CALL:
            function = functions.get(digest)
            if function is None:
                _error(sock, PROTOCOL, "CALL for a function that was never loaded")
                continue
            try:
                batch = pa.ipc.open_stream(pa.py_buffer(memoryview(body)[32:])).read_next_batch()
                result = function(*batch.columns)
            except MemoryError as error:
                _error(sock, OUT_OF_MEMORY, _describe(error))
                continue
            except Exception as error:
                _error(sock, RAISED, _describe(error))
                continue
            if not isinstance(result, pa.Array) and hasattr(result, "__arrow_c_array__"):
                try:
                    result = pa.array(result)
                except Exception as error:
                    _error(sock, NOT_AN_ARRAY, _describe(error))
                    continue
            if not isinstance(result, pa.Array):
                _error(sock, NOT_AN_ARRAY, f"it returned a {type(result).__name__}")
                continue
            try:
                sink = pa.BufferOutputStream()
                with pa.ipc.new_stream(sink, pa.schema([pa.field("result", result.type)])) as writer:
                    writer.write_batch(pa.record_batch([result], names=["result"]))
                output = sink.getvalue()
            except MemoryError as error:
                _error(sock, OUT_OF_MEMORY, _describe(error))
                continue
            except Exception as error:
                _error(sock, NOT_AN_ARRAY, _describe(error))
                continue
            _send(sock, RESULT, output)
        elif kind in (AGGREGATE, WINDOW):
            factory = functions.get(digest)
            if factory is None:
                _error(sock, PROTOCOL, "a call for a function that was never loaded")
                continue
            try:
                output = stateless_call(pa, kind, factory, memoryview(body)[32:])
            except Failure as failure:
                _error(sock, failure.error_class, failure.text)
                continue
            _send(sock, RESULT, output)
        elif kind == FORGET:
            functions.pop(digest, None)
        else:
            _error(sock, PROTOCOL, f"unknown message kind {kind}")


def main() -> None:
    # The parent handles Ctrl-C and stops its runners itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # `python -c` puts the working directory first on sys.path: a stray file
    # there must not shadow what UDFs import.
    if sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]
    sock = socket.socket(fileno=3)
    try:
        import cloudpickle
        import pyarrow as pa
        import pyarrow.ipc  # noqa: F401
    except Exception as error:
        _error(sock, STARTUP, f"{_describe(error)} (Python {sys.version.split()[0]} at {sys.executable})")
        return
    cloudpickle_major = int(cloudpickle.__version__.split(".")[0])
    info = sys.version_info
    _send(sock, READY, struct.pack("<BBBI", info.major, info.minor, cloudpickle_major, os.getpid()))
    try:
        _serve(sock, pa, cloudpickle)
    except EOFError:
        pass


if __name__ == "__main__":
    main()
