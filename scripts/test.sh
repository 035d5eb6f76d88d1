#!/usr/bin/env bash
# Runs every check and test of the project, after setting up what they need.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/setup.sh
export VIRTUAL_ENV="$root/.venv"

# A clean build of every test binary takes about 25 GB; CI builds once, so
# incremental caches (several GB more) buy nothing there.
if [ "${CI:-}" = "true" ]; then
    export CARGO_INCREMENTAL=0
fi
free_gb="$(df -P -BG . | awk 'NR == 2 { sub("G", "", $4); print $4 }')"
echo "== disk: ${free_gb} GB free here"
if [ "${free_gb:-0}" -lt 30 ]; then
    echo "warning: less than 30 GB free; the build may run out of space (remove old target/ folders)" >&2
fi

echo "== format and lint"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
.venv/bin/ruff check .
.venv/bin/ruff format --check .
(cd python && ../.venv/bin/mypy dfship ../crates/dfship-runtime/runner/dfship_runner.py)

echo "== Rust tests (one process per test: each may start its own interpreter)"
# Integration tests spawn the worker binary and load the FFI example library.
cargo build --workspace --locked
cargo nextest run --workspace --locked --no-fail-fast
cargo test --workspace --doc --locked

echo "== Python package (wheel installed in a fresh venv, pytest on local clusters)"
scripts/python-tests.sh

echo "== cluster in containers (Docker; images built here, nothing pulled)"
integration-tests/containers/run.sh
