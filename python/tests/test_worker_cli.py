"""``python -m dfship worker`` parses its command line with the worker's own
parser: the same flags, the same environment variables, the same errors."""

from __future__ import annotations

import subprocess
import sys


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dfship", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_help_lists_every_worker_flag_and_its_environment_variable() -> None:
    done = _run("worker", "--help")
    assert done.returncode == 0, done.stderr
    for flag, variable in [
        ("--host", "DFSHIP_WORKER_HOST"),
        ("--port", "DFSHIP_WORKER_PORT"),
        ("--python-env", "DFSHIP_PYTHON_ENV"),
        ("--cluster-key-file", "DFSHIP_CLUSTER_KEY_FILE"),
        ("--strict", "DFSHIP_STRICT"),
        ("--max-payload-bytes", "DFSHIP_MAX_PAYLOAD_BYTES"),
        ("--warn-payload-bytes", "DFSHIP_WARN_PAYLOAD_BYTES"),
        ("--ffi-udf", "DFSHIP_FFI_UDFS"),
    ]:
        assert flag in done.stdout, flag
        assert variable in done.stdout, variable


def test_bad_flags_and_values_are_usage_errors() -> None:
    unknown = _run("worker", "--no-such-flag")
    assert unknown.returncode == 2
    assert "--no-such-flag" in unknown.stderr
    import os

    bad_bool = _run("worker", "--port", "0", env={**os.environ, "DFSHIP_STRICT": "maybe"})
    assert bad_bool.returncode == 2
    assert "maybe" in bad_bool.stderr


def test_unknown_command_and_no_command() -> None:
    assert _run("wroker").returncode == 2
    assert "worker" in _run().stdout
