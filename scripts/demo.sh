#!/usr/bin/env bash
# Sets up the project, then runs the main demo on its embedded default.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
export VIRTUAL_ENV="$root/.venv"
# Builds the worker, the CLI and the example FFI UDF library the demo loads.
cargo build --locked --workspace
exec target/debug/dfship demo "$@"
