"""Environments: the code and packages a context's UDFs run with on workers.

An environment is the worker's own interpreter and packages, plus what a
:class:`dfship.ClusterContext` ships with ``py_modules=``, ``working_dir=``
and ``requirements=`` (optionally with a ``wheelhouse=``). It is packed here
once, into one deterministic zip, and named by the SHA-256 of that zip and
the requirements: the same files and requirements name the same environment
on every coordinator.

Each UDF the context registers carries its environment inside its pickle
(so it is signed with the payload and reaches each worker once, with the
pickle, through the payload service) and names it in its frame, so a
worker's runner pool keeps runners per environment. A runner entering an
environment unpacks it into the worker machine's cache
(``$DFSHIP_ENVIRONMENT_CACHE``, by default ``$TMPDIR/dfship-environments-<uid>``),
once per environment under a lock, builds its requirements into a venv
layered on the worker's packages (wheels only), and puts both first on its
``sys.path``. Unused environments are evicted, least recently used first,
past ``$DFSHIP_ENVIRONMENT_CACHE_BYTES`` (10 GiB by default).

Example::

    ctx = dfship.ClusterContext(
        workers,
        py_modules=["src/mylib"],          # a package folder, a .py file or a module
        requirements=["tinypkg==1.0"],     # built on each worker machine, once
        wheelhouse="wheels/",              # wheels shipped to workers with no index
    )
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import types
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: The most bytes an environment's zip may hold, by default.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

# Never packed from a folder: caches and version-control data.
_SKIPPED = {"__pycache__", ".git", ".hg", ".svn", ".mypy_cache", ".pytest_cache", ".ruff_cache"}

# A fixed time for every member, so the same files make the same zip.
_EPOCH = (1980, 1, 1, 0, 0, 0)


def _fail(message: str) -> ValueError:
    """What a context was asked to ship cannot be shipped."""
    return ValueError(message)


class Environment:
    """What a context ships: see the module docs. Built by :class:`dfship.ClusterContext`."""

    def __init__(
        self,
        *,
        py_modules: Sequence[str | os.PathLike[str] | types.ModuleType] = (),
        working_dir: str | os.PathLike[str] | None = None,
        requirements: Sequence[str] | str | os.PathLike[str] | None = None,
        wheelhouse: str | os.PathLike[str] | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self.max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else int(max_bytes)
        self.requirements = _requirements(requirements)
        if wheelhouse is not None and not self.requirements:
            raise _fail(
                "wheelhouse= ships wheels for requirements=: give the requirements to install from it"
            )
        files: dict[str, tuple[Path, bool]] = {}
        self.shipped: list[str] = []
        for module in py_modules:
            path = _module_path(module)
            top = path.stem if path.is_file() else path.name
            if not top.isidentifier():
                raise _fail(
                    f"py_modules: {path} does not name an importable module ('{top}' is not an identifier)"
                )
            self.shipped.append(top)
            _add(files, path, f"code/{path.name}")
        if working_dir is not None:
            folder = Path(working_dir)
            if not folder.is_dir():
                raise _fail(f"working_dir={str(folder)!r} is not a folder")
            for child in sorted(folder.iterdir()):
                if child.name in _SKIPPED:
                    continue
                if child.suffix == ".py" or (child.is_dir() and (child / "__init__.py").exists()):
                    self.shipped.append(child.stem if child.is_file() else child.name)
                _add(files, child, f"code/{child.name}")
        if wheelhouse is not None:
            folder = Path(wheelhouse)
            wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
            if not wheels:
                raise _fail(
                    f"wheelhouse={str(folder)!r} holds no .whl files; build or download them with "
                    "`pip download --only-binary :all: -d <folder> <requirements>`"
                )
            for wheel in wheels:
                _add(files, wheel, f"wheels/{wheel.name}")
        self.archive = _zip(files, self.max_bytes)
        self.wheels = wheelhouse is not None
        self.working_dir = working_dir is not None
        digest = hashlib.sha256(self.archive)
        for requirement in self.requirements:
            digest.update(b"\0" + requirement.encode())
        digest.update(b"\0wheels" if self.wheels else b"\0index")
        digest.update(b"\0cwd" if self.working_dir else b"")
        self.digest = digest.digest()

    @property
    def name(self) -> str:
        """The environment's name: the hex SHA-256 of what it ships."""
        return self.digest.hex()

    def payload(self) -> dict[str, Any]:
        """What travels in each UDF's pickle (``local_modules.py`` reads it)."""
        return {
            "digest": self.name,
            "archive": self.archive,
            "requirements": list(self.requirements),
            "wheels": self.wheels,
            "working_dir": self.working_dir,
            "shipped": list(self.shipped),
        }

    def bind(self, spec: dict[str, Any]) -> dict[str, Any]:
        """A UDF declaration's ``__dfship_udf__`` with this environment."""
        return {**spec, "func": InEnvironment(spec["func"], self), "environment": self.digest}

    def __repr__(self) -> str:
        parts = [f"{len(self.archive)} bytes of files"]
        if self.requirements:
            parts.append("requirements " + " ".join(self.requirements))
        return f"Environment({self.name[:12]}: {', '.join(parts)})"


class InEnvironment:
    """A UDF's callable bound to an environment: the pickler (``local_modules.py``)
    pickles the callable inside the environment. Calling it here calls the callable."""

    def __init__(self, func: Callable[..., Any], environment: Environment) -> None:
        self.__dfship_function__ = func
        self.__dfship_environment__ = environment.payload()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__dfship_function__(*args, **kwargs)


class _Bound:
    """What ``ClusterContext.register_udf`` hands the engine for a UDF in an environment."""

    def __init__(self, udf: Any, environment: Environment) -> None:
        self.__dfship_udf__ = environment.bind(udf.__dfship_udf__)
        self._udf = udf

    def __repr__(self) -> str:
        return repr(self._udf)


def _requirements(requirements: Sequence[str] | str | os.PathLike[str] | None) -> list[str]:
    if requirements is None:
        return []
    if isinstance(requirements, (str, os.PathLike)):
        path = Path(requirements)
        if not path.is_file():
            raise _fail(
                f"requirements={str(path)!r} is not a file; "
                "give a requirements file or a list of requirements"
            )
        lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    else:
        lines = [str(line).strip() for line in requirements]
    found = []
    for line in lines:
        if not line:
            continue
        if line.startswith("-") or "://" in line or line.startswith((".", "/")):
            raise _fail(
                f"requirement {line!r} is not a package requirement: give names with versions "
                "(tinypkg==1.0); wheels only, from the workers' index or a wheelhouse= folder"
            )
        found.append(line)
    return found


def _module_path(module: str | os.PathLike[str] | types.ModuleType) -> Path:
    if isinstance(module, types.ModuleType):
        file = getattr(module, "__file__", None)
        if not isinstance(file, str):
            raise _fail(
                f"py_modules: module {module.__name__!r} has no file to ship (a built-in or namespace module)"
            )
        if "." in module.__name__:
            raise _fail(
                f"py_modules: {module.__name__!r} is a submodule; ship its top-level package "
                f"({module.__name__.partition('.')[0]!r})"
            )
        path = Path(file)
        return path.parent if path.name == "__init__.py" else path
    path = Path(module)
    if path.is_file() and path.suffix == ".py":
        return path
    if path.is_dir():
        return path
    raise _fail(f"py_modules: {str(path)!r} is neither a .py file nor a package folder")


def _add(files: dict[str, tuple[Path, bool]], path: Path, name: str) -> None:
    if path.is_symlink():
        target = path.resolve()
        if not target.exists():
            raise _fail(f"{path} is a link to nothing; remove it or ship what it points to")
        path = target
    if path.is_dir():
        for child in sorted(path.iterdir()):
            if child.name not in _SKIPPED and child.suffix not in (".pyc", ".pyo"):
                _add(files, child, f"{name}/{child.name}")
        return
    if not path.is_file():
        return  # a socket or a FIFO: nothing to ship
    if name in files:
        raise _fail(f"two shipped files are both named {name[5:]!r}: {files[name][0]} and {path}; rename one")
    files[name] = (path, bool(path.stat().st_mode & stat.S_IXUSR))


def _zip(files: dict[str, tuple[Path, bool]], max_bytes: int) -> bytes:
    total = sum(path.stat().st_size for path, _ in files.values())
    if total > max_bytes:
        biggest = sorted(files.values(), key=lambda f: f[0].stat().st_size, reverse=True)[:3]
        raise _fail(
            f"the environment's files are {total / 2**20:.1f} MiB, "
            f"over the cap of {max_bytes / 2**20:.1f} MiB "
            f"(largest: {', '.join(str(p) for p, _ in biggest)}): ship less (keep data in an object store "
            "the workers read) or raise max_environment_bytes="
        )
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            path, executable = files[name]
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.external_attr = (stat.S_IFREG | (0o755 if executable else 0o644)) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    return out.getvalue()
