"""A user's own modules reach the workers: a UDF imported from ``mylib.py``
beside the script (and a package of the user's with a submodule) runs on a
2-worker cluster whose runners cannot import either (they start in ``/``
with the worker's environment). Two coordinator processes shipping two
versions of one module name to the same workers at the same time each get
their own version's answer."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import counting_parquet

import dfship

FILES = 4
ROWS = 5000


@pytest.fixture(scope="module")
def cluster() -> Iterator[dfship.LocalCluster]:
    with dfship.LocalCluster(workers=2) as running:
        yield running


@pytest.fixture(scope="module")
def numbers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return counting_parquet(tmp_path_factory.mktemp("numbers"), FILES, ROWS)


def write_project(folder: Path, factor: int) -> Path:
    """``mylib.py`` and a package ``mytools`` with a submodule, as a user
    keeps them beside a script."""
    (folder / "mytools").mkdir(parents=True)
    (folder / "mytools" / "__init__.py").write_text("")
    (folder / "mytools" / "scale.py").write_text(
        textwrap.dedent(
            f"""
            import pyarrow.compute as pc

            FACTOR = {factor}

            def scale(v):
                return pc.multiply(v, FACTOR)
            """
        )
    )
    (folder / "mylib.py").write_text(
        textwrap.dedent(
            """
            import os

            import pyarrow as pa

            from mytools import scale

            def scaled(v):
                return scale.scale(v)

            def runner_parent(v):
                return pa.array([os.getppid()] * len(v), pa.int64())
            """
        )
    )
    return folder


def test_a_module_beside_the_script_reaches_workers_that_cannot_import_it(
    cluster: dfship.LocalCluster, numbers: Path, tmp_path: Path
) -> None:
    project = write_project(tmp_path / "project", 7)
    sys.path.insert(0, str(project))
    try:
        mylib = importlib.import_module("mylib")
        ctx = cluster.context(bytes_per_partition=1)
        ctx.register_parquet("numbers", numbers)
        int64 = [pa.int64()], pa.int64()
        ctx.register_udf(dfship.udf(*int64, "immutable", name="scaled")(mylib.scaled))
        ctx.register_udf(dfship.udf(*int64, "volatile", name="runner_parent")(mylib.runner_parent))
        table = ctx.sql("SELECT v, scaled(v) AS s, runner_parent(v) AS p FROM numbers").collect()
    finally:
        sys.path.remove(str(project))
        for name in ("mylib", "mytools", "mytools.scale"):
            sys.modules.pop(name, None)
    rows = table.to_pylist()
    assert len(rows) == FILES * ROWS
    assert all(r["s"] == 7 * r["v"] for r in rows)
    # Every worker ran the UDFs (none could import mylib or mytools), and
    # nothing else did but, perhaps, this process's own runners.
    ran_under = {r["p"] for r in rows}
    assert set(cluster.pids) <= ran_under <= {*cluster.pids, os.getpid()}, (ran_under, cluster.pids)


COORDINATOR = """
import sys
sys.path.insert(0, sys.argv[1])
import pyarrow as pa
import dfship
import mylib

ctx = dfship.ClusterContext(sys.argv[2].split(","), cluster_key_file=sys.argv[3], bytes_per_partition=1)
ctx.register_parquet("numbers", sys.argv[4])
ctx.register_udf(dfship.udf([pa.int64()], pa.int64(), "immutable", name="scaled")(mylib.scaled))
for _ in range(3):
    print(ctx.sql("SELECT sum(scaled(v)) AS s FROM numbers").collect().column("s")[0].as_py(), flush=True)
"""


def test_two_coordinators_ship_two_versions_of_one_module_name_at_once(
    cluster: dfship.LocalCluster, numbers: Path, tmp_path: Path
) -> None:
    script = tmp_path / "coordinator.py"
    script.write_text(COORDINATOR)
    assert cluster.key_file is not None
    runs = {
        factor: subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(write_project(tmp_path / f"v{factor}", factor)),
                ",".join(cluster.urls),
                cluster.key_file,
                str(numbers),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for factor in (3, 5)
    }
    total = sum(range(FILES * ROWS))
    for factor, run in runs.items():
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        assert out.split() == [str(factor * total)] * 3, (out, err)


def test_a_module_that_cannot_travel_by_value_is_named_in_the_error(
    cluster: dfship.LocalCluster, numbers: Path, tmp_path: Path
) -> None:
    (tmp_path / "lockedlib.py").write_text(
        textwrap.dedent(
            """
            import threading

            LOCK = threading.Lock()

            def locked(v):
                with LOCK:
                    return v
            """
        )
    )
    sys.path.insert(0, str(tmp_path))
    try:
        lockedlib = importlib.import_module("lockedlib")
        ctx = cluster.context()
        ctx.register_parquet("numbers", numbers)
        ctx.register_udf(dfship.udf([pa.int64()], pa.int64(), "immutable", name="locked")(lockedlib.locked))
        with pytest.warns(UserWarning, match="lockedlib cannot travel by value"):
            with pytest.raises(dfship.UdfLoadError, match="lockedlib") as refused:
                ctx.sql("SELECT locked(v) FROM numbers").collect()
        # The error names the remedy too.
        assert "register_pickle_by_value" in str(refused.value), refused.value
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("lockedlib", None)


def fake_distribution(folder: Path, version: str) -> Path:
    """An installed-looking package ``skewpkg`` at ``version`` (its
    ``.dist-info`` beside it, as pip leaves it), in ``folder``."""
    (folder / "skewpkg").mkdir(parents=True, exist_ok=True)
    (folder / "skewpkg" / "__init__.py").write_text(
        "import pyarrow.compute as pc\n\ndef bump(v):\n    return pc.add(v, 1)\n"
    )
    info = folder / f"skewpkg-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: skewpkg\nVersion: {version}\n")
    (info / "top_level.txt").write_text("skewpkg\n")
    return folder


def test_a_package_in_another_version_on_the_workers_is_refused_naming_both_versions(
    numbers: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workers_copy = fake_distribution(tmp_path / "workers", "1.4.0")
    total = sum(range(FILES * ROWS)) + FILES * ROWS

    def run(cluster: dfship.LocalCluster, version: str) -> int:
        folder = fake_distribution(tmp_path / f"coordinator-{version}", version)
        sys.path.insert(0, str(folder))
        try:
            skewpkg = importlib.import_module("skewpkg")
            ctx = cluster.context(bytes_per_partition=1)
            ctx.register_parquet("numbers", numbers)
            bump = dfship.udf([pa.int64()], pa.int64(), "immutable", name="bump")(lambda v: skewpkg.bump(v))
            ctx.register_udf(bump)
            result: int = ctx.sql("SELECT sum(bump(v)) AS s FROM numbers").collect().column("s")[0].as_py()
            return result
        finally:
            sys.path.remove(str(folder))
            sys.modules.pop("skewpkg", None)

    with dfship.LocalCluster(workers=2, env={"PYTHONPATH": str(workers_copy)}) as cluster:
        # Another major version: refused before the UDF is unpickled, naming
        # the package, both versions and the worker's environment.
        with pytest.raises(dfship.UdfLoadError) as refused:
            run(cluster, "2.1.0")
        text = str(refused.value)
        assert "[version-skew]" in text and "skewpkg 2.1.0 on the coordinator but 1.4.0 here" in text, text
        assert sys.prefix in text, text
        # Another minor version passes by default; DFSHIP_VERSION_SKEW=minor refuses it.
        assert run(cluster, "1.9.0") == total
        monkeypatch.setenv("DFSHIP_VERSION_SKEW", "minor")
        with pytest.raises(dfship.UdfLoadError, match="skewpkg 1.9.0 on the coordinator but 1.4.0 here"):
            run(cluster, "1.9.0")
        monkeypatch.setenv("DFSHIP_VERSION_SKEW", "off")
        assert run(cluster, "2.1.0") == total
        monkeypatch.setenv("DFSHIP_VERSION_SKEW", "sometimes")
        with pytest.raises(dfship.DfshipError, match="DFSHIP_VERSION_SKEW is 'sometimes'"):
            run(cluster, "1.4.0")
