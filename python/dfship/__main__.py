"""``python -m dfship worker ...``: a worker inside this Python environment;
``python -m dfship demo --workers URLS``: the demo queries on a running cluster.

The worker's command line is parsed by the same parser as the
``dfship-worker`` binary's (``python -m dfship worker --help`` lists it), so
flags and environment variables mean the same everywhere.
"""

from __future__ import annotations

import sys

_USAGE = """usage: python -m dfship {worker,demo} [FLAGS]

commands:
  worker   serve a worker in this Python process; the UDFs it runs import
           modules from this environment (`python -m dfship worker --help`)
  demo     run the demo queries, with inline Python UDFs, on a running
           cluster (`python -m dfship demo --workers dns://NAME:PORT`)
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "demo":
        from dfship import demo
        from dfship.errors import DfshipError

        try:
            return demo.main(rest)
        except DfshipError as error:
            print(f"dfship demo: {error}", file=sys.stderr)
            return 1
    if command != "worker":
        print(f"python -m dfship: unknown command {command!r}\n\n{_USAGE}", end="", file=sys.stderr)
        return 2

    from dfship import _native

    try:
        return _native.run_worker(rest)
    except _native.DfshipError as error:
        print(f"dfship worker: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # SIGINT stopped the worker; tokio saw it too
        return 0


if __name__ == "__main__":
    sys.exit(main())
