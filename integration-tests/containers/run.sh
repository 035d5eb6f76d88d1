#!/usr/bin/env bash
# Builds the images (reused when unchanged), runs the container cluster tests
# one at a time, and removes every container and network they made, whether
# they pass or fail. A missing Docker engine is a failure.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

cleanup() {
    local ids
    ids="$( (docker ps -aq --filter label=dfship.test; docker ps -aq --filter label=com.docker.compose.project=dfship-compose-test) 2>/dev/null || true)"
    [ -n "$ids" ] && docker rm -f $ids >/dev/null 2>&1 || true
    ids="$( (docker network ls -q --filter label=dfship.test; docker network ls -q --filter label=com.docker.compose.project=dfship-compose-test) 2>/dev/null || true)"
    [ -n "$ids" ] && docker network rm $ids >/dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup

started=$SECONDS
"$here/images.sh"
echo "containers: images ready in $((SECONDS - started)) s"
tests_started=$SECONDS
# --workspace (with a filter) rather than -p: the same feature set as the
# main test run, so nothing is rebuilt. --no-capture also runs them one at a time.
cargo nextest run --workspace --locked -E 'binary(containers)' \
    --run-ignored only --no-capture --no-fail-fast
echo "containers: tests took $((SECONDS - tests_started)) s; images and tests $((SECONDS - started)) s"
