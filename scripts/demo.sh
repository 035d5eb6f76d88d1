#!/usr/bin/env bash
# Sets up the project, then runs the main demo on its embedded default.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
export VIRTUAL_ENV="$root/.venv"
exec cargo run --locked -p dfship-cli --bin dfship -- demo "$@"
