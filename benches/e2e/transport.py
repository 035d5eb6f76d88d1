"""How a batch should travel between a process and its UDF runner: a Unix
socket (what the runner pool uses) or shared memory.

Both ways carry the same thing — an Arrow IPC stream of one float64 column —
to a peer process that reads it as pyarrow, adds 1, and sends the result
back the same way. Times the round trip per batch at 1 k, 8 k, 64 k and 1 M
rows, side by side in one run:

- socket: the runner's framing (kind u8 | length u64 | body) over a
  socketpair; each side copies the bytes through the kernel.
- shared memory: one memfd-backed mapping per direction; the IPC stream is
  written straight into it and read from it without a copy (pyarrow over a
  memoryview of the mapping); the socket carries only a 9-byte notice.

Run: .venv/bin/python benches/e2e/transport.py (benches/run.sh runs it).
"""

from __future__ import annotations

import mmap
import os
import socket
import statistics
import struct
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc

HEADER = struct.Struct("<BQ")
ROWS = [1024, 8192, 65536, 1 << 20]
REPEATS = {1024: 2000, 8192: 1000, 65536: 300, 1 << 20: 40}
SHM_BYTES = 64 << 20


def recv_exactly(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise EOFError
        got += n
    return buffer


def ipc_bytes(batch: pa.RecordBatch) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def ipc_into(batch: pa.RecordBatch, target: memoryview) -> int:
    """Writes the IPC stream of `batch` into `target`; returns its length."""
    stream = pa.FixedSizeBufferWriter(pa.py_buffer(target))
    with pa.ipc.new_stream(stream, batch.schema) as writer:
        writer.write_batch(batch)
    return stream.tell()


def compute(batch: pa.RecordBatch) -> pa.RecordBatch:
    return pa.record_batch([pc.add(batch.column(0), 1.0)], names=["result"])


def peer(kind: str, fd: int, shm_fds: tuple[int, int]) -> None:
    sock = socket.socket(fileno=fd)
    if kind == "socket":
        while True:
            try:
                _, length = HEADER.unpack(recv_exactly(sock, HEADER.size))
            except EOFError:
                return
            body = recv_exactly(sock, length)
            batch = pa.ipc.open_stream(pa.py_buffer(body)).read_next_batch()
            out = ipc_bytes(compute(batch))
            sock.sendall(HEADER.pack(12, out.size))
            sock.sendall(out)
    else:
        inbound = mmap.mmap(shm_fds[0], SHM_BYTES)
        outbound = mmap.mmap(shm_fds[1], SHM_BYTES)
        while True:
            try:
                _, length = HEADER.unpack(recv_exactly(sock, HEADER.size))
            except EOFError:
                return
            batch = pa.ipc.open_stream(pa.py_buffer(memoryview(inbound)[:length])).read_next_batch()
            written = ipc_into(compute(batch), memoryview(outbound))
            del batch
            sock.sendall(HEADER.pack(12, written))


def measure(kind: str) -> dict[int, float]:
    parent, child = socket.socketpair()
    shm_in = os.memfd_create("to-peer")
    shm_out = os.memfd_create("from-peer")
    for fd in (shm_in, shm_out):
        os.ftruncate(fd, SHM_BYTES)
    pid = os.fork()
    if pid == 0:
        parent.close()
        peer(kind, child.fileno(), (shm_in, shm_out))
        os._exit(0)
    child.close()
    to_peer = mmap.mmap(shm_in, SHM_BYTES)
    from_peer = mmap.mmap(shm_out, SHM_BYTES)
    results = {}
    for rows in ROWS:
        batch = pa.record_batch([pa.array(range(rows), pa.float64())], names=["arg_0"])
        times = []
        for _ in range(REPEATS[rows]):
            started = time.perf_counter()
            if kind == "socket":
                body = ipc_bytes(batch)
                parent.sendall(HEADER.pack(2, body.size))
                parent.sendall(body)
                _, length = HEADER.unpack(recv_exactly(parent, HEADER.size))
                reply = recv_exactly(parent, length)
                result = pa.ipc.open_stream(pa.py_buffer(reply)).read_next_batch()
            else:
                length = ipc_into(batch, memoryview(to_peer))
                parent.sendall(HEADER.pack(2, length))
                _, length = HEADER.unpack(recv_exactly(parent, HEADER.size))
                # The engine keeps the result past the next call: copy it out of the mapping.
                reply = bytes(memoryview(from_peer)[:length])
                result = pa.ipc.open_stream(pa.py_buffer(reply)).read_next_batch()
            assert result.num_rows == rows
            times.append(time.perf_counter() - started)
        results[rows] = statistics.median(times) * 1e6
    parent.close()
    os.waitpid(pid, 0)
    return results


def main() -> int:
    socket_us = measure("socket")
    shm_us = measure("shared memory")
    print("### Runner transport: round trip of one float64 batch (median µs)\n")
    print("| rows | IPC bytes each way | Unix socket | shared memory | socket / shared memory |")
    print("|---:|---:|---:|---:|---:|")
    for rows in ROWS:
        size = ipc_bytes(pa.record_batch([pa.array(range(rows), pa.float64())], names=["a"])).size
        print(
            f"| {rows:,} | {size:,} | {socket_us[rows]:.0f} | {shm_us[rows]:.0f} | "
            f"{socket_us[rows] / shm_us[rows]:.2f}× |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
