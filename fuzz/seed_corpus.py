"""Writes seed inputs for the decode_payload fuzz target into corpus/decode_payload.

Run with the project's venv: .venv/bin/python fuzz/seed_corpus.py
"""

import hashlib
import hmac
import struct
from pathlib import Path

import cloudpickle
import pyarrow as pa

KEY = b"fuzzing-cluster-key-0123456789ab"  # the key the fuzz target verifies with


def ipc(schema: pa.Schema) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema):
        pass
    return sink.getvalue().to_pybytes()


def frame(name: bytes, volatility: int, inputs, ret, pickle: bytes, key: bytes | None = None) -> bytes:
    head = b"DFSHIPU" + bytes([1, 3, 11, 3, 1 if key else 0])
    head += struct.pack("<H", len(name)) + name + bytes([volatility])
    for section in (ipc(pa.schema(inputs)), ipc(pa.schema([ret]))):
        head += struct.pack("<I", len(section)) + section
    head += hashlib.sha256(pickle).digest()
    tail = struct.pack("<I", len(pickle)) + pickle
    if key:
        head += hmac.new(key, head + tail, hashlib.sha256).digest()
    return head + tail


def main() -> None:
    out = Path(__file__).parent / "corpus" / "decode_payload"
    out.mkdir(parents=True, exist_ok=True)
    pickle = cloudpickle.dumps(lambda a: a)
    seeds = {
        "plain": frame(b"fuzz", 0, [pa.field("arg_0", pa.int64())], pa.field("fuzz", pa.int64()), pickle),
        "signed": frame(
            b"fuzz",
            1,
            [pa.field("arg_0", pa.string()), pa.field("arg_1", pa.float64())],
            pa.field("fuzz", pa.list_(pa.int64()), False),
            pickle,
            key=KEY,
        ),
        "dfpy": b"DFPYUDF\x01\x03\x0b" + pickle,
    }
    for name, data in seeds.items():
        (out / name).write_bytes(data)


if __name__ == "__main__":
    main()
