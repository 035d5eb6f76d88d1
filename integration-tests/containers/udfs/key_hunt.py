"""A hostile UDF looking for the cluster key: every ancestor's environment
and command line, and the key files those command lines name. It returns
what it could read that might hold a key (DFSHIP_* and *KEY* variables, the
arguments, the key files' contents) and the user it ran as, so a test can
look for the key in it. Computed once per runner; a short string per row."""

import os

import pyarrow as pa

from dfship import udf

_FOUND: list[str] = []


def _hunt() -> str:
    found = [f"uid={os.getuid()}"]
    key_files = []
    pid = os.getpid()
    while True:
        for name in ("environ", "cmdline"):
            try:
                with open(f"/proc/{pid}/{name}", "rb") as source:
                    parts = source.read().split(b"\0")
            except OSError as error:
                found.append(f"{pid}/{name}={type(error).__name__}")
                continue
            if name == "environ":
                kept = [p for p in parts if p.startswith(b"DFSHIP") or b"KEY" in p.split(b"=")[0]]
            else:
                # Everything but a `python -c` script's text.
                kept = [p for i, p in enumerate(parts) if i == 0 or parts[i - 1] != b"-c"]
                flag = b"--cluster-key-file"
                key_files += [parts[i + 1].decode() for i, p in enumerate(parts[:-1]) if p == flag]
                key_files += [p.split(b"=", 1)[1].decode() for p in parts if p.startswith(flag + b"=")]
            found.append(f"{pid}/{name}={kept!r}")
        if pid <= 1:
            break
        with open(f"/proc/{pid}/stat") as stat:
            pid = int(stat.read().rsplit(")", 1)[1].split()[1])
    for path in key_files:
        try:
            with open(path, "rb") as source:
                found.append(f"{path}={source.read()!r}")
        except OSError as error:
            found.append(f"{path}={type(error).__name__}")
    return " ".join(found)


@udf([pa.int64()], pa.string(), "volatile")
def hunt(values: pa.Array) -> pa.Array:
    if not _FOUND:
        _FOUND.append(_hunt())
    return pa.array(_FOUND * len(values), pa.string())
