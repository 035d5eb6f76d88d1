#!/usr/bin/env bash
# Runs every check and test of the project, after setting up what they need.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/setup.sh
export VIRTUAL_ENV="$root/.venv"

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
