"""A local cluster of worker processes, started and stopped from Python."""

from __future__ import annotations

import base64
import collections
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["LocalCluster"]

_READY = "dfship-worker listening on "


LOG_LINES = 200
"""Lines of each worker's output a :class:`LocalCluster` keeps (the newest)."""


def key_parent() -> str | None:
    """Where local clusters keep their key's folder: $XDG_RUNTIME_DIR, else
    /var/tmp, else the default temporary folder (None)."""
    for candidate in (os.environ.get("XDG_RUNTIME_DIR"), "/var/tmp"):
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
            return candidate
    return None


def remove_stale_key_folders(parent: str | None) -> list[str]:
    """Removes the key folders of local clusters whose process is gone
    (killed before it could clean up: a key should not outlive its cluster).
    Only this user's folders whose ``owner.pid`` names no live process.
    Returns the folders removed."""
    parent = parent or tempfile.gettempdir()
    removed: list[str] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        folder = os.path.join(parent, name)
        if not name.startswith("dfship-key-"):
            continue
        try:
            if os.lstat(folder).st_uid != os.getuid():
                continue
            with open(os.path.join(folder, "owner.pid")) as owner:
                pid = int(owner.read().strip())
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


class LocalCluster:
    """``workers`` worker processes on 127.0.0.1, each running
    ``python -m dfship worker`` with this interpreter, so the modules your
    UDFs import are importable on them as they are here.

    Use it as a context manager; leaving the block stops the workers::

        with dfship.LocalCluster(workers=2) as cluster:
            ctx = cluster.context()
            ...

    ``worker_args`` are extra ``dfship worker`` flags (``--strict``,
    ``--cluster-key-file F``, ``--ffi-udf SPEC``...). ``env`` adds environment
    variables for the workers.

    The workers are keyed by default: a fresh random cluster key per
    cluster, in a file only this user can read (mode 0600, in a 0700
    folder; never on a command line or in an environment), which workers
    read with ``--cluster-key-file`` and :meth:`context` uses. Other users of
    the machine reach the ports but every call they make is refused.
    ``key=False`` starts workers without one (any local user can then run
    code as you on them); a key given in ``worker_args`` or ``env`` is used
    instead of a fresh one (pass it to :meth:`context` yourself).
    :attr:`key_file` is the fresh key's path, while the cluster runs.

    ``tls=True`` generates an ephemeral certificate authority and a
    certificate for 127.0.0.1 in a temporary folder: the workers serve mutual
    TLS (``https://`` URLs) and :meth:`context` connects with the same files
    (``self.tls`` holds their paths: ``ca``, ``cert``, ``key``).
    """

    def __init__(
        self,
        workers: int = 2,
        *,
        worker_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        tls: bool = False,
        key: bool = True,
        python: str | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        if workers < 1:
            raise ValueError("a cluster needs at least one worker")
        self.size = workers
        self.worker_args = list(worker_args)
        self.env = dict(env or {})
        self.python = python or sys.executable
        self.startup_timeout = startup_timeout
        self.urls: list[str] = []
        self._processes: list[subprocess.Popen[str]] = []
        self._logs: dict[int, collections.deque[str]] = {}
        self.tls: dict[str, str] | None = None
        self._tls_dir: tempfile.TemporaryDirectory[str] | None = None
        given = any(a.split("=", 1)[0] == "--cluster-key-file" for a in self.worker_args) or any(
            name in self.env for name in ("DFSHIP_CLUSTER_KEY", "DFSHIP_CLUSTER_KEY_FILE")
        )
        self._fresh_key = key and not given
        self._key_dir: tempfile.TemporaryDirectory[str] | None = None
        self.key_file: str | None = None
        if tls:
            from dfship import _native

            self._tls_dir = tempfile.TemporaryDirectory(prefix="dfship-tls-")
            ca, cert, tls_key = _native.generate_tls_files(self._tls_dir.name, ["localhost", "127.0.0.1"])
            self.tls = {"ca": str(ca), "cert": str(cert), "key": str(tls_key)}
            self.worker_args += ["--tls-cert", self.tls["cert"], "--tls-key", self.tls["key"]]
            self.worker_args += ["--tls-ca", self.tls["ca"]]

    def start(self) -> LocalCluster:
        """Starts the workers and waits until each accepts connections."""
        try:
            if self._fresh_key:
                self._write_key()
            for _ in range(self.size):
                process = self._spawn(0)
                self._processes.append(process)
                self.urls.append(self._wait_ready(process))
        except BaseException:
            self.stop()
            raise
        return self

    def _write_key(self) -> None:
        """A fresh random key in a new owner-only folder, written 0600 from its first byte.

        The folder is not made in /tmp: UDF runners cannot open the key (the
        workers close it to them with Landlock), and with it the entries
        created while they run directly in the folders on the way to it
        (see crates/dfship-runtime/src/landlock.rs); UDFs create files in
        /tmp, seldom in $XDG_RUNTIME_DIR or /var/tmp."""
        parent = key_parent()
        remove_stale_key_folders(parent)
        self._key_dir = tempfile.TemporaryDirectory(prefix="dfship-key-", dir=parent)
        with open(os.path.join(self._key_dir.name, "owner.pid"), "w") as owner:
            owner.write(str(os.getpid()))
        path = os.path.join(self._key_dir.name, "cluster.key")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(base64.b64encode(os.urandom(32)))
        self.key_file = path

    def _spawn(self, port: int) -> subprocess.Popen[str]:
        key = ["--cluster-key-file", self.key_file] if self.key_file else []
        return subprocess.Popen(
            [self.python, "-m", "dfship", "worker", "--port", str(port), *key, *self.worker_args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **self.env},
        )

    @property
    def pids(self) -> list[int]:
        """The process id of each worker, in the order of :attr:`urls`."""
        return [process.pid for process in self._processes]

    def kill(self, index: int) -> None:
        """Kills worker ``index`` with SIGKILL, as a crash would (no clean-up)."""
        self._processes[index].kill()
        self._processes[index].wait()

    def drain(self, index: int, timeout: float = 120.0) -> int:
        """Stops worker ``index`` gracefully (SIGTERM): it tells coordinators
        it is draining, finishes the queries it runs, then exits. Returns its
        exit code."""
        process = self._processes[index]
        process.terminate()
        return process.wait(timeout=timeout)

    def restart(self, index: int) -> None:
        """Starts worker ``index`` again on its port (after :meth:`kill`, or
        stopping it), and waits until it accepts connections."""
        old = self._processes[index]
        if old.poll() is None:
            old.send_signal(signal.SIGINT)
            old.wait()
        port = int(self.urls[index].rsplit(":", 1)[1].rstrip("/"))
        process = self._spawn(port)
        self._processes[index] = process
        url = self._wait_ready(process)
        if url != self.urls[index]:
            raise RuntimeError(f"worker {index} came back as {url}, not {self.urls[index]}")

    def logs(self, index: int) -> list[str]:
        """The last :data:`LOG_LINES` lines worker ``index`` wrote (stdout and
        stderr, after it started): for a test's failure message or a look
        at what a worker said. Older lines are dropped, never kept in memory."""
        return list(self._logs.get(self._processes[index].pid, ()))

    def _wait_ready(self, process: subprocess.Popen[str]) -> str:
        lines: queue.Queue[str | None] = queue.Queue()
        recent: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self._logs[process.pid] = recent
        ready = threading.Event()
        assert process.stdout is not None

        def pump(stream: Any) -> None:
            # Until the worker is ready its lines go to the waiter below;
            # then to a bounded buffer (a chatty worker never fills a pipe
            # nor this process's memory).
            for line in stream:
                if ready.is_set():
                    recent.append(line.rstrip("\n"))
                else:
                    lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, args=(process.stdout,), daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(
                    f"a dfship worker did not start within {self.startup_timeout:.0f} s"
                ) from None
            if line is None:
                stderr = process.stderr.read() if process.stderr else ""
                raise RuntimeError(f"a dfship worker exited at start-up:\n{stderr.strip()}")
            if line.startswith(_READY):
                ready.set()
                threading.Thread(target=pump, args=(process.stderr,), daemon=True).start()
                return line[len(_READY) :].strip()

    def stop(self) -> None:
        """Stops every worker at once (SIGINT, then SIGKILL after 10 s).
        :meth:`drain` stops one gracefully."""
        for process in self._processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in self._processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._processes.clear()
        self.urls.clear()
        if self._key_dir is not None:
            self._key_dir.cleanup()
            self._key_dir = None
            self.key_file = None

    def context(self, **options: Any) -> Any:
        """A :class:`dfship.ClusterContext` for these workers (options as for it;
        the cluster's fresh key, and with ``tls=True`` its TLS files, unless given)."""
        from dfship.context import ClusterContext

        if self.key_file and "cluster_key" not in options and "cluster_key_file" not in options:
            options["cluster_key_file"] = self.key_file
        if self.tls is not None:
            options.setdefault("tls_ca", self.tls["ca"])
            options.setdefault("tls_cert", self.tls["cert"])
            options.setdefault("tls_key", self.tls["key"])
        return ClusterContext(self.urls, **options)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
