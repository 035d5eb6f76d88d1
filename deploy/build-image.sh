#!/usr/bin/env bash
# Builds the dfship worker image from deploy/Dockerfile.
#
#   BASE          the CPython image to build on (default python:3.13-slim);
#                 it must be present locally or pullable
#   REQUIREMENTS  your UDFs' Python dependencies (default deploy/requirements.txt)
#   TAG           the image's name (default dfship-worker:latest)
#   DFSHIP_WHEEL  a dfship wheel to install (default: build one, scripts/build-wheel.sh)
#
# Everything the image installs is downloaded here first, into a wheelhouse
# in the build context, for the base image's Python version and this
# machine's architecture (`pip download`); `docker build` then installs with
# `--no-index` and needs no network.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
base="${BASE:-python:3.13-slim}"
requirements="${REQUIREMENTS:-$here/requirements.txt}"
tag="${TAG:-dfship-worker:latest}"
context="${DFSHIP_IMAGE_CONTEXT:-$root/target/deploy-image}"
log() { echo "build-image: $*" >&2; }

[ -f "$requirements" ] || { log "REQUIREMENTS=$requirements: no such file"; exit 1; }
wheel="${DFSHIP_WHEEL:-$("$root/scripts/build-wheel.sh")}"
[ -f "$wheel" ] || { log "DFSHIP_WHEEL=$wheel: no such file"; exit 1; }

# The base's Python: wheels are downloaded for its version.
version="$(docker run --rm --network none --entrypoint python3 "$base" \
    -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
    || { log "could not run python3 in BASE=$base (is the image there, with CPython >= 3.10?)"; exit 1; }
arch="$(uname -m)"
log "base $base (Python $version, $arch), requirements $requirements"

rm -rf "$context"
mkdir -p "$context/wheelhouse"
cp "$wheel" "$context/wheelhouse/"
cp "$requirements" "$context/requirements.txt"
# dfship's own dependencies, from the wheel's metadata.
"$root/.venv/bin/python" - "$wheel" >"$context/dfship-deps.txt" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    for line in wheel.read(meta).decode().splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            print(line.split(":", 1)[1].strip())
PY
platforms=()
for glibc in 2014 2_17 2_24 2_27 2_28 2_31 2_34; do
    case "$glibc" in 2014) platforms+=(--platform "manylinux2014_$arch") ;; *) platforms+=(--platform "manylinux_${glibc}_$arch") ;; esac
done
"$root/.venv/bin/python" -m pip download --quiet --disable-pip-version-check \
    --dest "$context/wheelhouse" --only-binary=:all: --implementation cp \
    --python-version "$version" "${platforms[@]}" \
    -r "$context/dfship-deps.txt" -r "$context/requirements.txt" \
    || { log "pip download failed: check REQUIREMENTS (pinned versions with wheels for Python $version, $arch)"; exit 1; }
rm "$context/dfship-deps.txt"

DOCKER_BUILDKIT=0 docker build --quiet --build-arg "BASE=$base" -f "$here/Dockerfile" -t "$tag" "$context" >/dev/null \
    || { log "docker build of $tag failed (above)"; exit 1; }
log "built $tag"
