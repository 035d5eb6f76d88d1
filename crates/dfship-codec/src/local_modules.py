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
    environment = _environment_of(obj)
    if environment is not None:
        obj = obj.__dfship_function__
    with _LOCK:
        local, installed = reached(obj)
        if environment is not None:
            # What the environment ships is imported from it, by reference.
            shipped = set(environment["shipped"])
            local = [m for m in local if m.__name__.partition(".")[0] not in shipped]
        pickle = _dumps_with(obj, local)
        versions = _versions(installed) if level != "off" else {}
        if versions:
            pickle = cloudpickle.dumps(_Checked(versions, level, pickle))
        if environment is not None:
            pickle = cloudpickle.dumps(_Entering(environment, pickle))
        return pickle


def _environment_of(obj):
    """The environment a ``dfship.ClusterContext`` bound ``obj`` to
    (``dfship/environment.py``), or None."""
    if type(obj).__name__ != "InEnvironment":
        return None
    environment = getattr(obj, "__dfship_environment__", None)
    return environment if isinstance(environment, dict) else None


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
where = sys.prefix + "".join(f" + environment {e[:12]}" for e in sys.__dict__.get("_dfship_environments", ()))
if skewed:
    raise ImportError(
        "[version-skew] this UDF was pickled next to other package versions than this "
        f"worker's Python environment ({where}) has, a different {level} version: "
        + "; ".join(skewed) + ". Install the coordinator's versions on every worker "
        "(deploy/requirements.txt), or pin the coordinator to the workers' "
        "(DFSHIP_VERSION_SKEW=minor, major or off on the coordinator sets how strict this is)"
    )
loaded = cloudpickle.loads(pickle)
"""


class _RunsSource:
    """Pickles as ``eval`` of its ``SOURCE`` over ``self.scope``: loading it
    runs the source, which leaves the UDF in ``loaded``."""

    SOURCE = ""

    def __reduce__(self):
        run = "exec(source, scope) or scope['loaded']"
        return (eval, (run, {"source": self.SOURCE, "scope": self.scope}))


class _Checked(_RunsSource):
    """:data:`_CHECK_SOURCE` over the versions, the strictness and the UDF's
    own pickle."""

    SOURCE = _CHECK_SOURCE

    def __init__(self, versions, level, pickle):
        self.scope = {"versions": versions, "level": level, "pickle": pickle}


# What runs where the pickle is loaded (a runner), before anything else of
# the UDF: make the environment's files ready in this machine's cache (once
# per environment, under a lock), build its requirements into a venv layered
# on this interpreter's packages (once), and put both first on `sys.path`.
# Travels as source text, like _CHECK_SOURCE. A runner serves one
# environment only (the worker's pool sees to it, `scheduler.rs`).
_ENTER_SOURCE = r"""
import fcntl, hashlib, importlib, io, os, re, shutil, stat, subprocess, sys, tempfile, time, zipfile
import cloudpickle

# A zip that unpacks to more than this is refused before anything is written.
MAX_UNPACKED = 4 * 2**30

def fail(what):
    raise ImportError(f"[environment {label}] {what}")

def cache_folder():
    folder = os.environ.get("DFSHIP_ENVIRONMENT_CACHE") or os.path.join(
        tempfile.gettempdir(), f"dfship-environments-{os.getuid()}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        fail(f"the environment cache {folder} is not a folder of this runner's user (uid "
             f"{os.getuid()}) closed to others; remove it, or point DFSHIP_ENVIRONMENT_CACHE on "
             "the worker at a folder of that user")
    return folder

def unpack(archive, into, cap):
    try:
        archive_file = zipfile.ZipFile(io.BytesIO(archive))
        members = archive_file.infolist()
    except zipfile.BadZipFile as error:
        fail(f"its archive is not a zip file ({error}); nothing was unpacked")
    if sum(m.file_size for m in members) > cap:
        fail(f"its files unpack to more than {cap} bytes; nothing was unpacked")
    for member in members:
        name = member.filename
        parts = name.split("/")
        kind = stat.S_IFMT(member.external_attr >> 16)
        if (not name or name.startswith("/") or "\\" in name or "\0" in name
                or ".." in parts or ":" in parts[0]
                or kind not in (0, stat.S_IFREG, stat.S_IFDIR)):
            fail(f"its archive holds {name!r}: a member must be a file or folder named by a "
                 "relative path inside the archive (no '..', no absolute path, no link); the "
                 "environment was refused and nothing of it was kept")
    for member in members:
        target = os.path.join(into, *[p for p in member.filename.split("/") if p not in ("", ".")])
        if member.is_dir():
            os.makedirs(target, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        mode = 0o755 if (member.external_attr >> 16) & 0o111 else 0o644
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(archive_file.read(member))

def install(home):
    venv = os.path.join(home, "venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True,
                   capture_output=True)
    site = subprocess.run(
        [os.path.join(venv, "bin", "python"), "-c",
         "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip()
    # Layered: the venv sees this interpreter's packages (pyarrow, pip…).
    with open(os.path.join(site, "_dfship_base.pth"), "w") as pth:
        pth.write("\n".join(p for p in sys.path if p and os.path.isdir(p)) + "\n")
    command = [os.path.join(venv, "bin", "python"), "-m", "pip", "install", "--no-input",
               "--disable-pip-version-check", "--only-binary", ":all:", "--no-cache-dir"]
    if wheels:
        command += ["--no-index", "--find-links", os.path.join(home, "wheels")]
    command += requirements
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        said = done.stdout + done.stderr
        lines = said.strip().splitlines()
        named = sorted(set(re.findall(
            r"(?:No matching distribution found for|satisfies the requirement) (\S+)", said)))
        fail(f"installing its requirements failed ({', '.join(named or requirements)}): pip "
             f"answered with exit code {done.returncode}: " + " | ".join(lines[-6:])
             + (". The packages come from the wheelhouse the coordinator shipped: add the "
                "missing wheels (built for this worker's platform and Python "
                f"{sys.version_info[0]}.{sys.version_info[1]}) to it" if wheels else
                ". Wheels only (no source builds): check the names and versions, and that this "
                "worker reaches its package index (PIP_INDEX_URL)"))
    return site

def evict(folder, keep, cap):
    homes = []
    for name in os.listdir(folder):
        ready = os.path.join(folder, name, ".ready")
        if len(name) != 64:
            continue
        try:  # another runner may be evicting it right now
            with open(ready) as stamp:
                size = int(stamp.read() or 0)
            homes.append((os.stat(ready).st_mtime, name, size))
        except (OSError, ValueError):
            continue
    total = sum(size for _, _, size in homes)
    for _, name, size in sorted(homes):
        if total <= cap:
            break
        if name == keep:
            continue
        fd = os.open(os.path.join(folder, name + ".use"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # a runner uses it
        try:
            gone = os.path.join(folder, f".evicted-{name}-{os.getpid()}")
            os.rename(os.path.join(folder, name), gone)
            shutil.rmtree(gone, ignore_errors=True)
            total -= size
            with open(os.path.join(folder, "evictions.log"), "a") as log:
                log.write(f"{name} {size}\n")
        finally:
            os.close(fd)

def enter():
    entered = sys.__dict__.setdefault("_dfship_environments", {})
    if digest in entered:
        return
    if entered:
        fail("this interpreter already entered environment " + ", ".join(e[:12] for e in entered)
             + ": in-process runners (python_mode in-process) share the worker's interpreter, so a "
             "worker serves one environment that way; use runner processes (the default) for several")
    if not re.fullmatch("[0-9a-f]{64}", digest):
        fail("its name is not a SHA-256 in hex; the environment was refused")
    cap = int(os.environ.get("DFSHIP_ENVIRONMENT_CACHE_BYTES") or 10 * 2**30)
    folder = cache_folder()
    home = os.path.join(folder, digest)
    # Shared while this runner lives: eviction (which needs it exclusive)
    # never removes an environment in use.
    in_use = os.open(home + ".use", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(in_use, fcntl.LOCK_SH)
        if not os.path.exists(os.path.join(home, ".ready")):
            build_lock = os.open(home + ".build", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(build_lock, fcntl.LOCK_EX)  # one build at a time; others wait for it
                if not os.path.exists(os.path.join(home, ".ready")):
                    build(folder, home)
            finally:
                os.close(build_lock)
        os.utime(os.path.join(home, ".ready"))
    except BaseException:
        os.close(in_use)
        raise
    entered[digest] = in_use
    paths = [os.path.join(home, "code")]
    if requirements:
        with open(os.path.join(home, ".site")) as where:
            paths.insert(0, os.path.join(home, where.read().strip()))
    sys.path[0:0] = [p for p in paths if os.path.isdir(p)]
    importlib.invalidate_caches()
    if working_dir:
        os.chdir(os.path.join(home, "code"))
    evict(folder, digest, cap)

def build(folder, home):
    started = time.monotonic()
    print(f"dfship: building environment {label} ({len(archive)} bytes of files"
          + (f", requirements {' '.join(requirements)}" if requirements else "") + ")",
          file=sys.__stderr__, flush=True)
    building = tempfile.mkdtemp(prefix=f".building-{digest[:16]}-", dir=folder)
    try:
        unpack(archive, building, MAX_UNPACKED)
        if requirements:
            with open(os.path.join(building, ".site"), "w") as where:
                where.write(os.path.relpath(install(building), building))
        size = sum(os.lstat(os.path.join(d, f)).st_size
                   for d, _, files in os.walk(building) for f in files)
        shutil.rmtree(home, ignore_errors=True)
        os.rename(building, home)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    with open(os.path.join(home, ".ready"), "w") as stamp:
        stamp.write(str(size))
    seconds = time.monotonic() - started
    with open(os.path.join(folder, "builds.log"), "a") as log:
        log.write(f"{digest} {os.getpid()} {seconds:.3f}\n")
    print(f"dfship: built environment {label} in {seconds:.2f} s", file=sys.__stderr__, flush=True)

enter()
loaded = cloudpickle.loads(pickle)
"""


class _Entering(_RunsSource):
    """:data:`_ENTER_SOURCE` over an environment (``dfship/environment.py``)
    and the UDF's own pickle."""

    SOURCE = _ENTER_SOURCE

    def __init__(self, environment, pickle):
        self.scope = {
            "digest": environment["digest"],
            "label": environment["digest"][:12],
            "archive": environment["archive"],
            "requirements": list(environment["requirements"]),
            "wheels": bool(environment["wheels"]),
            "working_dir": bool(environment["working_dir"]),
            "pickle": pickle,
        }
