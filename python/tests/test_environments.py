"""Environments: code and packages a context ships reach its UDFs on the
workers, and only its UDFs.

One 2-worker cluster with one runner per worker (so environments must take
turns on each worker's only runner) and a cache folder of the test's own
whose byte cap is 1: every environment built evicts every other that no
runner uses. Packages come from wheels built here (no index is reached).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import counting_parquet

import dfship
from dfship.environment import Environment

FILES = 4
ROWS = 2000
TOTAL = sum(range(FILES * ROWS))
INT64 = [pa.int64()], pa.int64()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("environments") / "cache"
    return folder


@pytest.fixture(scope="module")
def cluster(cache: Path) -> Iterator[dfship.LocalCluster]:
    env = {"DFSHIP_ENVIRONMENT_CACHE": str(cache), "DFSHIP_ENVIRONMENT_CACHE_BYTES": "1"}
    # This process runs a query's last stage with runners of its own: the
    # same cache for them (a machine's workers and coordinator share one).
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        with dfship.LocalCluster(workers=2, worker_args=["--python-runners", "1"], env=env) as running:
            yield running
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def numbers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return counting_parquet(tmp_path_factory.mktemp("numbers"), FILES, ROWS)


def context(cluster: dfship.LocalCluster, numbers: Path, **environment: object) -> dfship.ClusterContext:
    ctx = cluster.context(bytes_per_partition=1, **environment)
    ctx.register_parquet("numbers", numbers)
    return ctx


def total(ctx: dfship.ClusterContext, udf: str) -> int:
    value: int = ctx.sql(f"SELECT sum({udf}(v)) AS s FROM numbers").collect().column("s")[0].as_py()
    return value


def builds(cache: Path, environment: Environment) -> int:
    log = cache / "builds.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return sum(line.split()[0] == environment.name for line in lines)


def wheel(folder: Path, name: str, version: str, body: str) -> Path:
    """A pure-Python wheel of ``name`` at ``version`` whose module is ``body``,
    written by hand (a wheel is a zip with three metadata files)."""
    folder.mkdir(parents=True, exist_ok=True)
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": body.encode(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: dfship-tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
        f"{info}/top_level.txt": f"{name}\n".encode(),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in files.items():
            archive.writestr(member, data)
    return path


def uses_shipped(v: pa.Array) -> pa.Array:
    import shippedpkg  # only the environment has it

    return shippedpkg.twice(v)


def uses_mylib(v: pa.Array) -> pa.Array:
    import mylib

    return mylib.scale(v)


def uses_tinypkg(v: pa.Array) -> pa.Array:
    import pyarrow.compute as pc
    import tinypkg

    return pc.add(v, tinypkg.BONUS)


def where_am_i(v: pa.Array) -> pa.Array:
    import pyarrow as pa

    return pa.array([open("marker.txt").read()] * len(v), pa.string())


def test_a_package_no_worker_has_is_shipped_and_imported(
    cluster: dfship.LocalCluster, numbers: Path, tmp_path: Path, cache: Path
) -> None:
    package = tmp_path / "shippedpkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from shippedpkg.sub.ops import twice\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "ops.py").write_text(
        "import pyarrow.compute as pc\n\ndef twice(v):\n    return pc.multiply(v, 2)\n"
    )
    ctx = context(cluster, numbers, py_modules=[package])
    assert ctx.environment is not None
    ctx.register_udf(dfship.udf(*INT64, "immutable", name="shipped")(uses_shipped))
    assert total(ctx, "shipped") == 2 * TOTAL
    # Both workers' runners entered it; the cache (shared by the two
    # workers of this machine) built it once.
    assert builds(cache, ctx.environment) == 1
    assert (cache / ctx.environment.name / "code" / "shippedpkg" / "sub" / "ops.py").is_file()
    # A context without the environment cannot import it: runners of the
    # environment never serve another.
    plain = context(cluster, numbers)
    plain.register_udf(dfship.udf(*INT64, "immutable", name="shipped")(uses_shipped))
    with pytest.raises(dfship.DfshipError, match="No module named 'shippedpkg'"):
        total(plain, "shipped")


def test_a_working_dir_is_importable_and_the_runners_working_directory(
    cluster: dfship.LocalCluster, numbers: Path, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "marker.txt").write_text("from the working dir")
    ctx = context(cluster, numbers, working_dir=project)
    ctx.register_udf(dfship.udf([pa.int64()], pa.string(), "immutable", name="where_am_i")(where_am_i))
    rows = ctx.sql("SELECT DISTINCT where_am_i(v) AS w FROM numbers").collect().to_pylist()
    assert rows == [{"w": "from the working dir"}]


def test_two_contexts_ship_two_versions_of_one_module_at_the_same_time(
    cluster: dfship.LocalCluster, numbers: Path, tmp_path: Path
) -> None:
    contexts = {}
    for factor in (3, 5):
        folder = tmp_path / f"v{factor}"
        folder.mkdir()
        (folder / "mylib.py").write_text(
            f"import pyarrow.compute as pc\n\ndef scale(v):\n    return pc.multiply(v, {factor})\n"
        )
        ctx = context(cluster, numbers, py_modules=[folder / "mylib.py"])
        ctx.register_udf(dfship.udf(*INT64, "immutable", name="scaled")(uses_mylib))
        contexts[factor] = ctx
    results: dict[int, list[int]] = {3: [], 5: []}
    errors: list[BaseException] = []

    def run(factor: int) -> None:
        try:
            for _ in range(3):
                results[factor].append(total(contexts[factor], "scaled"))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(factor,)) for factor in (3, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert results == {3: [3 * TOTAL] * 3, 5: [5 * TOTAL] * 3}


def test_requirements_from_a_wheelhouse_are_built_once_reused_and_evicted(
    cluster: dfship.LocalCluster, numbers: Path, tmp_path: Path, cache: Path
) -> None:
    wheelhouse = tmp_path / "wheelhouse"
    wheel(wheelhouse, "tinypkg", "1.0", "BONUS = 1\n")
    wheel(wheelhouse, "tinypkg", "2.0", "BONUS = 2\n")

    def with_requirements(pin: str) -> dfship.ClusterContext:
        ctx = context(cluster, numbers, requirements=[pin], wheelhouse=wheelhouse)
        ctx.register_udf(dfship.udf(*INT64, "immutable", name="bonus")(uses_tinypkg))
        return ctx

    first = with_requirements("tinypkg==1.0")
    assert total(first, "bonus") == TOTAL + FILES * ROWS
    assert first.environment is not None and builds(cache, first.environment) == 1
    # A second context with the same set: the same environment, not built again.
    second = with_requirements("tinypkg==1.0")
    assert second.environment is not None and second.environment.name == first.environment.name
    assert total(second, "bonus") == TOTAL + FILES * ROWS
    assert builds(cache, first.environment) == 1
    # Another set: built separately; with a cap of 1 byte, the first (unused
    # once its runners made room) is evicted.
    third = with_requirements("tinypkg==2.0")
    assert total(third, "bonus") == TOTAL + 2 * FILES * ROWS
    assert third.environment is not None and builds(cache, third.environment) == 1
    assert not (cache / first.environment.name).exists()
    assert first.environment.name in (cache / "evictions.log").read_text()
    # Asked for again, it is built again.
    assert total(first, "bonus") == TOTAL + FILES * ROWS
    assert builds(cache, first.environment) == 2


def test_a_broken_requirement_is_named_in_the_error(
    cluster: dfship.LocalCluster, numbers: Path, tmp_path: Path, cache: Path
) -> None:
    wheelhouse = tmp_path / "wheelhouse"
    wheel(wheelhouse, "tinypkg", "1.0", "BONUS = 1\n")
    ctx = context(cluster, numbers, requirements=["tinypkg==1.0", "nosuchpkg==3.1"], wheelhouse=wheelhouse)
    ctx.register_udf(dfship.udf(*INT64, "immutable", name="bonus")(uses_tinypkg))
    with pytest.raises(dfship.UdfLoadError) as failed:
        total(ctx, "bonus")
    text = str(failed.value)
    assert "installing its requirements failed (nosuchpkg==3.1)" in text, text
    assert "nosuchpkg" in text.split("pip answered", 1)[1], text
    assert ctx.environment is not None and not (cache / ctx.environment.name).exists()


def hostile(environment: Environment, members: dict[str, tuple[int, bytes]]) -> Environment:
    """``environment`` with its archive replaced by one holding ``members``
    (name -> (mode, data)), as a peer holding the cluster key could send."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, (mode, data) in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            archive.writestr(info, data)
    environment.archive = out.getvalue()
    environment.digest = hashlib.sha256(environment.archive).digest()
    return environment


@pytest.mark.parametrize(
    "name, mode",
    [
        ("code/../../escaped.py", 0o100644),
        ("/tmp/dfship-absolute-escape.py", 0o100644),
        ("code/link.py", 0o120777),
    ],
    ids=["dot-dot", "absolute", "symlink"],
)
def test_an_archive_reaching_outside_its_folder_is_refused(
    cluster: dfship.LocalCluster, numbers: Path, tmp_path: Path, cache: Path, name: str, mode: int
) -> None:
    module = tmp_path / "harmless.py"
    module.write_text("X = 1\n")
    ctx = context(cluster, numbers, py_modules=[module])
    assert ctx.environment is not None
    target = "/root/.bashrc" if mode == 0o120777 else "print('escaped')\n"
    hostile(ctx.environment, {"code/harmless.py": (0o100644, b"X = 1\n"), name: (mode, target.encode())})
    ctx.register_udf(dfship.udf(*INT64, "immutable", name="shipped")(uses_shipped))
    with pytest.raises(dfship.UdfLoadError) as refused:
        total(ctx, "shipped")
    assert f"its archive holds {name!r}" in str(refused.value), refused.value
    assert "refused" in str(refused.value)
    # Nothing of it was kept, and nothing was written outside (the other
    # worker's runner may still be refusing it: give it a moment).
    deadline = time.monotonic() + 10
    while list(cache.glob(".building-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (cache / ctx.environment.name).exists()
    assert not (cache.parent / "escaped.py").exists() and not (cache / "escaped.py").exists()
    assert not Path("/tmp/dfship-absolute-escape.py").exists()
    assert not list(cache.glob(".building-*"))


def test_what_cannot_be_shipped_is_refused_on_the_coordinator(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.mkdir()
    (big / "data.bin").write_bytes(os.urandom(2 * 2**20))
    with pytest.raises(ValueError, match=r"2\.0 MiB, over the cap of 1\.0 MiB .*max_environment_bytes"):
        Environment(working_dir=big, max_bytes=2**20)
    with pytest.raises(ValueError, match="not a package requirement"):
        Environment(requirements=["--index-url=http://evil/", "x"])
    with pytest.raises(ValueError, match="give the requirements"):
        Environment(wheelhouse=tmp_path)
    with pytest.raises(ValueError, match="neither a .py file nor a package folder"):
        Environment(py_modules=[tmp_path / "missing.py"])
    # The same files name the same environment; any change, another.
    (tmp_path / "lib.py").write_text("A = 1\n")
    first = Environment(py_modules=[tmp_path / "lib.py"])
    assert Environment(py_modules=[tmp_path / "lib.py"]).name == first.name
    (tmp_path / "lib.py").write_text("A = 2\n")
    assert Environment(py_modules=[tmp_path / "lib.py"]).name != first.name


FAKE_PANDAS = """
import sys
sys.path.insert(0, sys.argv[1])
import pyarrow as pa
import pandas
import dfship

assert pandas.__version__ == "99.1.0", pandas.__file__
ctx = dfship.ClusterContext(sys.argv[2].split(","), cluster_key_file=sys.argv[3])
ctx.register_parquet("t", sys.argv[4])  # (pa.array would ask pandas, here the fake, for help)
ctx.register_udf(dfship.udf([pa.int64()], pa.int64(), "immutable", name="p")(lambda v: pandas.same(v)))
try:
    ctx.sql("SELECT sum(p(v)) FROM t").collect()
except dfship.UdfLoadError as error:
    print(error)
"""


def test_a_coordinator_with_another_major_pandas_is_refused_naming_both_versions(
    cluster: dfship.LocalCluster, numbers: Path, tmp_path: Path
) -> None:
    import importlib.metadata

    workers_pandas = importlib.metadata.version("pandas")
    fake = tmp_path / "fake"
    (fake / "pandas").mkdir(parents=True)
    (fake / "pandas" / "__init__.py").write_text("__version__ = '99.1.0'\n\ndef same(v):\n    return v\n")
    info = fake / "pandas-99.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pandas\nVersion: 99.1.0\n")
    (info / "top_level.txt").write_text("pandas\n")
    script = tmp_path / "coordinator.py"
    script.write_text(FAKE_PANDAS)
    assert cluster.key_file is not None
    done = subprocess.run(
        [sys.executable, str(script), str(fake), ",".join(cluster.urls), cluster.key_file, str(numbers)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "[version-skew]" in done.stdout, done.stdout + done.stderr
    assert f"pandas 99.1.0 on the coordinator but {workers_pandas} here" in done.stdout, done.stdout


def test_skew_is_checked_against_the_environment_not_the_worker(
    cluster: dfship.LocalCluster, numbers: Path, tmp_path: Path
) -> None:
    import importlib

    import pyarrow.compute as pc

    wheelhouse = tmp_path / "wheelhouse"
    wheel(wheelhouse, "tinypkg", "1.0", "BONUS = 1\n")
    # This process has tinypkg 2.0 installed (a distribution on sys.path);
    # the environment installs 1.0 on the workers.
    mine = tmp_path / "site"
    wheel_file = wheel(tmp_path / "mine", "tinypkg", "2.0", "BONUS = 2\n")
    with zipfile.ZipFile(wheel_file) as archive:
        archive.extractall(mine)
    sys.path.insert(0, str(mine))
    try:
        tinypkg = importlib.import_module("tinypkg")
        ctx = context(cluster, numbers, requirements=["tinypkg==1.0"], wheelhouse=wheelhouse)
        ctx.register_udf(dfship.udf(*INT64, "immutable", name="bonus")(lambda v: pc.add(v, tinypkg.BONUS)))
        with pytest.raises(dfship.UdfLoadError) as refused:
            total(ctx, "bonus")
    finally:
        sys.path.remove(str(mine))
        sys.modules.pop("tinypkg", None)
    text = str(refused.value)
    assert "tinypkg 2.0 on the coordinator but 1.0 here" in text, text
    assert ctx.environment is not None and f"environment {ctx.environment.name[:12]}" in text, text
