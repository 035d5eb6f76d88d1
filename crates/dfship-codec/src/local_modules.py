"""Which of a callable's modules travel inside its pickle.

cloudpickle pickles a function defined in an imported module *by
reference* (``import mylib; mylib.double``): the process that unpickles it
must be able to import ``mylib``. That holds for installed packages, which
the workers install too, but not for a user's own files (``mylib.py`` beside
a script, a ``src/`` folder on ``sys.path``): those exist only where the
coordinator runs. This module finds the modules a callable reaches (through
its module, its globals, its closure, its class and what those modules
import in turn) whose files lie outside the standard library and every
installed-packages folder, and pickles them *by value* with the callable
(``cloudpickle.register_pickle_by_value`` for the duration of one
``dumps``; modules the user registered stay registered).

It also records the version of every installed distribution the callable
reaches *by reference* (``pandas``, ``numpy``, ``sklearn``…) as this process
has it, and wraps the pickle so that the process that loads it compares
those versions with its own *before* unpickling the callable: a different
major version (``DFSHIP_VERSION_SKEW=minor``: minor version; ``off``: no
check) is refused with an error naming each package, both versions and the
environment, instead of an obscure failure deep inside ``pickle``.

Loaded by ``dfship-codec`` (``python.rs``); nothing here imports dfship.
"""

import importlib.metadata
import os
import site
import sys
import sysconfig
import threading
import types
import warnings

import cloudpickle

# Folders whose modules are installed, not the user's own: the standard
# library and every site-packages folder this interpreter knows.
_INSTALLED = None

# How many objects one search looks at, at most (a callable reaching a huge
# object graph is pickled as cloudpickle would, with what was found so far).
_MAX_VISITS = 20_000


def _installed_folders():
    global _INSTALLED
    if _INSTALLED is None:
        folders = set()
        for name in ("stdlib", "platstdlib", "purelib", "platlib"):
            path = sysconfig.get_paths().get(name)
            if path:
                folders.add(path)
        for getter in (site.getsitepackages, lambda: [site.getusersitepackages()]):
            try:
                folders.update(getter())
            except Exception:
                pass
        for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
            folders.add(os.path.join(prefix, "lib"))
            folders.add(os.path.join(prefix, "lib64"))
        _INSTALLED = tuple(os.path.realpath(f) + os.sep for f in folders if f)
    return _INSTALLED


# Never shipped by value: the packages that do the shipping.
_NEVER = ("dfship", "cloudpickle", "pyarrow")


# The distributions that provide each importable top-level name, and the
# versions looked up so far, per ``sys.path`` (scanning the installed
# distributions takes milliseconds).
_DISTRIBUTIONS = (None, {}, {})


def _metadata():
    """``(providers, versions)`` for the current ``sys.path``: the
    distributions providing each top-level name, and the versions looked
    up so far."""
    global _DISTRIBUTIONS
    path = tuple(sys.path)
    if _DISTRIBUTIONS[0] != path:
        try:
            found = importlib.metadata.packages_distributions()
        except Exception:
            found = {}
        _DISTRIBUTIONS = (path, found, {})
    return _DISTRIBUTIONS[1], _DISTRIBUTIONS[2]


def _version(dist):
    known = _metadata()[1]
    if dist not in known:
        try:
            known[dist] = importlib.metadata.version(dist)
        except Exception:
            known[dist] = None
    return known[dist]


def _is_local(module):
    """True for a pure-Python module loaded from a file outside the standard
    library and the installed packages, that no installed distribution
    provides (``__main__`` travels by value anyway; a compiled extension
    cannot)."""
    name = getattr(module, "__name__", None)
    if not isinstance(name, str) or name == "__main__" or name in sys.builtin_module_names:
        return False
    top = name.partition(".")[0]
    if top in _NEVER or sys.modules.get(name) is not module:
        return False
    path = getattr(module, "__file__", None)
    if not isinstance(path, str) or not path.endswith(".py"):
        return False
    if os.path.realpath(path).startswith(_installed_folders()):
        return False
    return top not in _metadata()[0]


def _installed_top(module):
    """The top-level name of an installed, non-standard module (one that
    travels by reference and that a worker must have in the same version)."""
    name = getattr(module, "__name__", None)
    if not isinstance(name, str) or name == "__main__":
        return None
    top = name.partition(".")[0]
    if top in sys.builtin_module_names or top in getattr(sys, "stdlib_module_names", ()):
        return None
    return top


def reached(obj):
    """The local modules ``obj`` reaches (each one, packages and submodules
    alike: a package may hold compiled submodules that cannot travel), and
    the top-level names of the installed modules it reaches. Only what travels by value is looked into
    (functions and classes of ``__main__``, of local or dynamic modules,
    and plain data); what is installed is only named."""
    found = {}
    installed = set()
    seen = set()
    stack = [obj]
    visits = 0
    verdicts = {}  # id(module) -> _is_local(module), asked once per walk

    def is_local(module):
        if id(module) not in verdicts:
            verdicts[id(module)] = _is_local(module)
        return verdicts[id(module)]

    while stack and visits < _MAX_VISITS:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        visits += 1
        if isinstance(item, types.ModuleType):
            if is_local(item):
                found[item.__name__] = item
                stack.extend(v for k, v in vars(item).items() if not k.startswith("__"))
            else:
                top = _installed_top(item)
                if top is not None:
                    installed.add(top)
            continue
        if isinstance(item, (str, bytes, int, float, bool, type(None))):
            continue
        try:
            name = getattr(item, "__module__", None)
        except Exception:
            name = None
        module = sys.modules.get(name) if isinstance(name, str) else None
        if module is not None:
            stack.append(module)
            if module.__name__ != "__main__" and not is_local(module):
                if isinstance(item, (types.FunctionType, type)):
                    continue  # pickled by reference: only its module matters
        if isinstance(item, types.FunctionType):
            stack.extend(item.__globals__.get(n) for n in item.__code__.co_names if n in item.__globals__)
            stack.extend(c.cell_contents for c in item.__closure__ or () if _filled(c))
            stack.extend(item.__defaults__ or ())
        elif isinstance(item, types.MethodType):
            stack.append(item.__func__)
            stack.append(item.__self__)
        elif isinstance(item, type):
            members = vars(item).values()
            stack.extend(v for v in members if callable(v) or isinstance(v, (staticmethod, classmethod)))
        elif isinstance(item, (staticmethod, classmethod)):
            stack.append(item.__func__)
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        else:
            # An instance (a callable class's object): its class and state.
            stack.append(type(item))
            state = getattr(item, "__dict__", None)
            if isinstance(state, dict):
                stack.extend(state.values())
    return list(found.values()), installed


def _filled(cell):
    try:
        _ = cell.cell_contents
    except ValueError:
        return False
    return True


# cloudpickle's by-value registry is global: one pickling at a time here, so
# one thread's clean-up never unregisters what another is pickling with.
_LOCK = threading.Lock()


def dumps(obj):
    """``cloudpickle.dumps(obj)`` with the local modules it reaches by value,
    wrapped with the versions of the installed distributions it reaches by
    reference (checked by whoever loads it, before the callable is unpickled).

    When a local module cannot be pickled by value (a global holding a lock,
    a connection…), the callable is pickled by reference: workers that can
    import that module (the same code on their ``sys.path``) run it, the
    others answer with an error naming the module."""
    level = _skew_level()
    with _LOCK:
        local, installed = reached(obj)
        pickle = _dumps_with(obj, local)
        versions = _versions(installed) if level != "off" else {}
        if not versions:
            return pickle
        return cloudpickle.dumps(_Checked(versions, level, pickle))


def _dumps_with(obj, local):
    registered = getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", set())
    added = []
    for module in local:
        if module.__name__ not in registered:
            try:
                cloudpickle.register_pickle_by_value(module)
            except ValueError:  # not importable by its name
                continue
            added.append(module)
    try:
        return cloudpickle.dumps(obj)
    except Exception as error:
        if not added:
            raise
        names = ", ".join(m.__name__ for m in added)
        what = getattr(obj, "__name__", obj)
        warnings.warn(
            f"dfship: the module(s) {names} cannot travel by value with {what!r} "
            f"({type(error).__name__}: {error}); it is pickled by reference, so workers must be able "
            "to import them (install them there, or move what cannot be pickled out of the module's "
            "globals)",
            stacklevel=3,
        )
    finally:
        for module in added:
            cloudpickle.unregister_pickle_by_value(module)
    return cloudpickle.dumps(obj)


_LEVELS = ("major", "minor", "off")

# At most this many distributions are recorded per pickle.
_MAX_DISTRIBUTIONS = 64


def _skew_level():
    level = os.environ.get("DFSHIP_VERSION_SKEW", "major").strip().lower() or "major"
    if level not in _LEVELS:
        raise ValueError(
            f"DFSHIP_VERSION_SKEW is {level!r}; set it to major (refuse a different major version "
            "of a package a UDF uses on a worker, the default), minor, or off"
        )
    return level


def _versions(tops):
    """``{distribution: version}`` for the installed top-level names ``tops``."""
    versions = {}
    providers = _metadata()[0]
    for top in sorted(tops):
        for dist in providers.get(top, ()):
            if dist.lower() == "cloudpickle" or dist in versions:
                continue  # cloudpickle: the frame checks its major version
            version = _version(dist)
            if version is None:
                continue
            versions[dist] = version
            if len(versions) >= _MAX_DISTRIBUTIONS:
                return versions
    return versions


# What runs where the pickle is loaded, before the UDF is unpickled: refuse
# version skew, then unpickle. It travels as source text run by the
# loader's own `eval`/`exec` (a few hundred bytes, where a function pickled
# by value would add kilobytes to every payload).
_CHECK_SOURCE = """
import importlib.metadata, re, sys, cloudpickle
def release(version):
    match = re.match(r"(\\d+)(?:\\.(\\d+))?", version)
    return None if match is None else tuple(int(n) for n in match.groups("0"))[:parts]
parts = 2 if level == "minor" else 1
skewed = []
for dist, theirs in versions.items():
    try:
        ours = importlib.metadata.version(dist)
    except Exception:
        continue  # not installed: unpickling names the missing module
    if None not in (release(theirs), release(ours)) and release(theirs) != release(ours):
        skewed.append(f"{dist} {theirs} on the coordinator but {ours} here")
if skewed:
    raise ImportError(
        "[version-skew] this UDF was pickled next to other package versions than this "
        f"worker's Python environment ({sys.prefix}) has, a different {level} version: "
        + "; ".join(skewed) + ". Install the coordinator's versions on every worker "
        "(deploy/requirements.txt), or pin the coordinator to the workers' "
        "(DFSHIP_VERSION_SKEW=minor, major or off on the coordinator sets how strict this is)"
    )
loaded = cloudpickle.loads(pickle)
"""


class _Checked:
    """Pickles as ``eval`` of :data:`_CHECK_SOURCE` over the versions, the
    strictness and the UDF's own pickle; loading it gives the UDF."""

    def __init__(self, versions, level, pickle):
        self.scope = {"versions": versions, "level": level, "pickle": pickle}

    def __reduce__(self):
        run = "exec(source, scope) or scope['loaded']"
        return (eval, (run, {"source": _CHECK_SOURCE, "scope": self.scope}))
