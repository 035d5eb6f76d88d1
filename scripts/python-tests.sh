#!/usr/bin/env bash
# Builds the dfship wheel, installs it into a fresh virtual environment the
# way a user would (pip install of the wheel file), and runs the Python
# package's tests there against local clusters of real worker processes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh >/dev/null

echo "python-tests: building the wheel (profile 'wheel': unoptimized, no debug info)"
wheel="$(scripts/build-wheel.sh)"

venv=target/python-user-venv
stamp="$venv/.requirements.sha256"
want="$(cat python/tests/requirements.txt scripts/requirements.txt | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
    "${DFSHIP_BASE_PYTHON:-python3}" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r python/tests/requirements.txt \
        "$(grep -E '^pyarrow' scripts/requirements.txt | cut -d' ' -f1)" \
        "$(grep -E '^cloudpickle' scripts/requirements.txt | cut -d' ' -f1)"
    echo "$want" > "$stamp"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$wheel"

echo "python-tests: the stub of the native module against the built wheel (mypy.stubtest)"
# From outside the source tree, so the installed package is what is checked.
(cd "$venv" && bin/python -m mypy.stubtest dfship._native --mypy-config-file "$root/python/pyproject.toml")

echo "python-tests: pytest against $(basename "$wheel")"
# From the repository root, so the source tree's python/dfship (without the
# native module) is not what `import dfship` finds.
"$venv/bin/python" -m pytest -q -p no:cacheprovider python/tests "$@"
