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
Runner to parent:
    READY     python major u8 | python minor u8 | cloudpickle major u8 | pid u32
    LOADED    (empty)
    RESULT    Arrow IPC stream: one batch, one column named "result"
    ERROR     class u8 | UTF-8 text (class: 0 the UDF raised, 1 a module is
              missing (text = its name), 2 unpickling failed, 3 the UDF
              returned something that is not an Arrow array, 4 out of
              memory, 5 protocol error, 6 start-up failed)

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

LOAD, CALL, FORGET = 1, 2, 3
READY, LOADED, RESULT, ERROR = 10, 11, 12, 13
RAISED, MODULE_MISSING, UNPICKLE_FAILED, NOT_AN_ARRAY, OUT_OF_MEMORY, PROTOCOL, STARTUP = range(7)
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
