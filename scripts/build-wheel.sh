#!/usr/bin/env bash
# Builds the dfship wheel (abi3, any CPython >= 3.10) into target/wheels and
# prints its path. Profile 'wheel': unoptimized, no debug info (fast to build
# for tests); DFSHIP_WHEEL_PROFILE=release for a wheel to ship.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh >/dev/null
rm -f target/wheels/dfship-*.whl
(cd python && ../.venv/bin/maturin build --locked --profile "${DFSHIP_WHEEL_PROFILE:-wheel}" --strip \
    -i ../.venv/bin/python --out ../target/wheels) >&2
ls "$root"/target/wheels/dfship-*.whl
