#!/usr/bin/env bash
# Sets up everything the project needs on a fresh machine; cheap when nothing changed.
#   - .venv: a Python virtual environment with scripts/requirements.txt
# Safe to run repeatedly: pip runs only when the requirements change.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

python="${DFSHIP_BASE_PYTHON:-python3}"
if ! "$python" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
    echo "setup: need Python >= 3.10 as '$python' (set DFSHIP_BASE_PYTHON to another interpreter)" >&2
    exit 1
fi
if ! "$python" -c 'import sysconfig, sys; sys.exit(0 if sysconfig.get_config_var("Py_ENABLE_SHARED") else 1)'; then
    echo "setup: '$python' has no shared libpython, which workers need to embed Python;" \
         "install one built with --enable-shared (e.g. Debian's libpython3-dev)" >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $("$python" --version)"
    "$python" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want="$(sha256sum scripts/requirements.txt | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing Python packages into .venv"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r scripts/requirements.txt
    echo "$want" > "$stamp"
fi
# Development install of the pure-Python part of the dfship package.
site_packages="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$root/python" > "$site_packages/dfship-dev.pth"
echo "setup: .venv ready ($(.venv/bin/python --version))"
