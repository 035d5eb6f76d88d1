"""Settings are declared once (crates/dfship-settings): ClusterContext's
keywords are exactly the coordinator settings, and a settings file, an
environment variable and a keyword reach the same setting, in that order of
precedence."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import dfship


def test_cluster_context_takes_exactly_the_coordinator_settings() -> None:
    parameters = inspect.signature(dfship.ClusterContext.__init__).parameters
    keywords = {name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert parameters["workers"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    declared = {s["keyword"] for s in dfship.settings()}
    # The environment's keywords say what this context ships, not how it runs.
    shipped = {"py_modules", "working_dir", "requirements", "wheelhouse", "max_environment_bytes"}
    assert (keywords | {"workers"}) - {"cluster_key"} - shipped == declared
    for setting in dfship.settings():
        flag = "--" + setting["keyword"].replace("_", "-")
        # Repeatable list flags are singular: --ffi-udf, --storage-option.
        assert setting["flag"] == flag or setting["keyword"] in ("ffi_udfs", "storage_options")
        assert setting["env"] and setting["env"].startswith("DFSHIP_")
        assert setting["help"]


def test_a_settings_file_an_environment_variable_and_a_keyword_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "dfship.toml"
    # A file naming a setting that does not exist is refused with the known ones.
    config.write_text("[python]\nrunner = 2\n")
    with pytest.raises(dfship.PlanningError, match=r"unknown setting 'python.runner'.*python.runners"):
        dfship.ClusterContext(["http://127.0.0.1:9"], config=config)
    # A worker list from the file; the variable overrides the file, the keyword both.
    config.write_text('[coordinator]\nworkers = ["http://127.0.0.1:9"]\ntarget_partitions = 0\n')
    with pytest.raises(dfship.PlanningError, match="target-partitions"):
        dfship.ClusterContext([], config=config)
    monkeypatch.setenv("DFSHIP_TARGET_PARTITIONS", "0")
    config.write_text("[coordinator]\ntarget_partitions = 3\n")
    with pytest.raises(dfship.PlanningError, match="target-partitions"):
        dfship.ClusterContext(["http://127.0.0.1:9"], config=config)
    ctx = dfship.ClusterContext(["http://127.0.0.1:9"], config=config, target_partitions=2)
    assert ctx.workers == ["http://127.0.0.1:9"]
