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

Loaded by ``dfship-codec`` (``python.rs``); nothing here imports dfship.
"""

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


def _is_local(module):
    """True for a pure-Python module loaded from a file outside the standard
    library and the installed packages (``__main__`` travels by value anyway;
    a compiled extension cannot)."""
    name = getattr(module, "__name__", None)
    if not isinstance(name, str) or name == "__main__" or name in sys.builtin_module_names:
        return False
    if name.partition(".")[0] in _NEVER or sys.modules.get(name) is not module:
        return False
    path = getattr(module, "__file__", None)
    if not isinstance(path, str) or not path.endswith(".py"):
        return False
    return not os.path.realpath(path).startswith(_installed_folders())


def local_modules(obj):
    """The local modules ``obj`` reaches (each one, packages and submodules
    alike: a package may hold compiled submodules that cannot travel)."""
    found = {}
    seen = set()
    stack = [obj]
    visits = 0
    while stack and visits < _MAX_VISITS:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        visits += 1
        if isinstance(item, types.ModuleType):
            if _is_local(item):
                found[item.__name__] = item
                stack.extend(vars(item).values())
            continue
        module = sys.modules.get(getattr(item, "__module__", None) or "")
        if module is not None:
            stack.append(module)
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
        elif not isinstance(item, (str, bytes, int, float, bool, type(None))):
            # An instance (a callable class's object): its class and state.
            stack.append(type(item))
            state = getattr(item, "__dict__", None)
            if isinstance(state, dict):
                stack.extend(state.values())
    return list(found.values())


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
    """``cloudpickle.dumps(obj)`` with the local modules it reaches by value.

    When one of them cannot be pickled by value (a global holding a lock, a
    connection…), the callable is pickled as before, by reference: workers
    that can import those modules (the same code on their ``sys.path``) run
    it, the others answer with an error naming the module."""
    with _LOCK:
        registered = getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", set())
        added = []
        for module in local_modules(obj):
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
                stacklevel=2,
            )
        finally:
            for module in added:
                cloudpickle.unregister_pickle_by_value(module)
        return cloudpickle.dumps(obj)
