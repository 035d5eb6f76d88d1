"""``python -m dfship worker ...``: a worker inside this Python environment."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dfship")
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser(
        "worker",
        help="serve a worker; UDFs it runs import modules from this environment",
    )
    worker.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    worker.add_argument("--port", type=int, default=50051, help="port; 0 picks a free one (default 50051)")
    worker.add_argument("--strict", action="store_true", help="refuse every inline Python UDF")
    worker.add_argument("--cluster-key-file", help="require payloads signed with the key in this file")
    worker.add_argument("--max-payload-bytes", type=int, help="refuse larger inline payloads")
    worker.add_argument("--warn-payload-bytes", type=int, help="warn about larger inline payloads")
    worker.add_argument(
        "--ffi-udf",
        action="append",
        default=[],
        help="an FFI UDF to register by name: /path/lib.so:symbol or module:attribute (repeatable)",
    )
    args = parser.parse_args(argv)

    from dfship import _native

    try:
        _native.run_worker(
            args.host,
            args.port,
            strict=args.strict,
            cluster_key_file=args.cluster_key_file,
            max_payload_bytes=args.max_payload_bytes,
            warn_payload_bytes=args.warn_payload_bytes,
            ffi_udfs=args.ffi_udf,
        )
    except _native.DfshipError as error:
        print(f"dfship worker: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
