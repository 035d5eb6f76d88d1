#!/usr/bin/env bash
# Builds the images of the container cluster tests on a machine that can pull
# no image: Debian root filesystems made with debootstrap, imported with
# `docker import`, then the project's binaries layered on with `docker build`
# (whose FROM is the local base image, so nothing is pulled).
#
#   dfship-base:<suite>   Debian <suite> + /opt/dfship/venv (requirements-worker.txt, and
#                         requirements-s3.txt: moto, the S3 server of the object-store test)
#   dfship-node:bookworm  base + dfship-worker, dfship, dfship-cluster-check and the
#                         FFI example library, all built on the host (bookworm, Python 3.11)
#   dfship-python:trixie  Debian trixie with its Python 3.13 and nothing else
#   dfship-node:trixie    deploy/Dockerfile (the image users build) on
#                         dfship-python:trixie: the wheel, `python -m dfship
#                         worker`, for the version-skew test and compose
#
# Every image carries a label with the hash of its inputs and is rebuilt only
# when they change, so repeat runs take seconds. Build folders live under
# target/containers (never committed).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
work="$root/target/containers"
mkdir -p "$work"
log() { echo "images: $*" >&2; }

need() {
    if ! command -v "$1" >/dev/null; then
        log "installing $2 (for $1)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >/dev/null
    fi
}
docker info >/dev/null 2>&1 || { log "the Docker engine is not reachable ('docker info' failed); start it and retry"; exit 1; }
need debootstrap debootstrap
need docker-compose docker-compose

label_of() { docker image inspect -f '{{ index .Config.Labels "dfship.inputs" }}' "$1" 2>/dev/null || true; }

# Base image: rootfs by debootstrap, Python packages by pip inside a chroot
# (none for a dfship-python image: deploy/Dockerfile installs them).
build_base() {
    local suite="$1" packages="$2" image="${3:-dfship-base:$1}"
    local inputs
    inputs="$( (cat "$here/requirements-worker.txt" "$here/requirements-s3.txt"; echo "$suite $packages $image"; declare -f build_base) | sha256sum | cut -c1-16)"
    if [ "$(label_of "$image")" = "$inputs" ]; then
        log "$image is up to date"
        return
    fi
    local started=$SECONDS rootfs="$work/rootfs-$suite"
    log "building $image (debootstrap $suite)"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" http://deb.debian.org/debian >"$work/debootstrap-$suite.log" 2>&1 \
        || { log "debootstrap failed, see $work/debootstrap-$suite.log"; tail -5 "$work/debootstrap-$suite.log" >&2; exit 1; }
    # pip reaches PyPI through the host's TLS and DNS set-up.
    cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
    mkdir -p "$rootfs/etc/ssl/certs"
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    cp "$here/requirements-worker.txt" "$rootfs/tmp/requirements.txt"
    cp "$here/requirements-s3.txt" "$rootfs/tmp/requirements-s3.txt"
    # A clean environment: the host's PIP_* settings name host paths.
    local in_root=(env -i PATH=/usr/bin:/bin HOME=/root PIP_CERT=/etc/ssl/certs/ca-certificates.crt "$(command -v chroot)" "$rootfs")
    if [ "${image%%:*}" = dfship-base ]; then
        "${in_root[@]}" /usr/bin/python3 -m venv /opt/dfship/venv
        "${in_root[@]}" /opt/dfship/venv/bin/pip install --quiet --disable-pip-version-check \
            -r /tmp/requirements.txt -r /tmp/requirements-s3.txt
    fi
    rm -rf "$rootfs/tmp/requirements.txt" "$rootfs/tmp/requirements-s3.txt" "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/root/.cache"
    : > "$rootfs/etc/resolv.conf"
    tar -C "$rootfs" -c . | docker import \
        --change "LABEL dfship.inputs=$inputs" \
        --change "ENV PATH=/usr/local/bin:/usr/bin:/bin" \
        --change "ENV DFSHIP_PYTHON_ENV=/opt/dfship/venv" \
        - "$image" >/dev/null
    rm -rf "$rootfs"
    log "built $image in $((SECONDS - started)) s"
}

# Node image: the base plus binaries from a context folder.
build_node() {
    local suite="$1" context="$2"
    local image="dfship-node:$suite"
    local inputs
    inputs="$( (docker image inspect -f '{{.Id}}' "dfship-base:$suite"; cd "$context" && find . -type f -print0 | sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-16)"
    if [ "$(label_of "$image")" = "$inputs" ]; then
        log "$image is up to date"
        return
    fi
    cat >"$context/Dockerfile" <<DOCKERFILE
FROM dfship-base:$suite
COPY bin/ /usr/local/bin/
COPY lib/ /opt/dfship/lib/
COPY python/ /opt/dfship/python/
RUN for d in /opt/dfship/venv/lib/python3*/site-packages; do echo /opt/dfship/python > "\$d/dfship.pth"; done
LABEL dfship.inputs=$inputs
DOCKERFILE
    local started=$SECONDS
    DOCKER_BUILDKIT=0 docker build --quiet -t "$image" "$context" >/dev/null 2>"$work/build-$suite.log" \
        || { log "docker build of $image failed:"; cat "$work/build-$suite.log" >&2; exit 1; }
    rm -f "$context/Dockerfile"
    log "built $image in $((SECONDS - started)) s"
}

# Stripped copies keep the images small (debug binaries are ~1 GB each).
stage() {
    local from="$1" to="$2"
    mkdir -p "$(dirname "$to")"
    if [ ! -f "$to" ] || [ "$from" -nt "$to" ]; then
        strip --strip-debug -o "$to" "$from"
    fi
}

# The pure-Python dfship package (UDF declarations), for `dfship sql --udfs`.
python_package() {
    rm -rf "$1/python"
    mkdir -p "$1/python"
    cp -r "$root/python/dfship" "$1/python/dfship"
    find "$1/python" -name __pycache__ -prune -exec rm -rf {} +
}

build_base bookworm python3,python3-venv,libpython3.11
build_base trixie python3,python3-venv dfship-python:trixie
[ "${1:-}" = "--base-only" ] && exit 0

# bookworm node: binaries built on the host (a bookworm machine, Python 3.11).
(cd "$root" && cargo build --locked -p dfship-worker -p dfship-cli -p dfship-ffi-example -p dfship-integration-tests --bin dfship-worker --bin dfship --bin dfship-cluster-check --lib 2>&1 | tail -1 >&2)
context="$work/context-bookworm"
stage "$root/target/debug/dfship-worker" "$context/bin/dfship-worker"
stage "$root/target/debug/dfship" "$context/bin/dfship"
stage "$root/target/debug/dfship-cluster-check" "$context/bin/dfship-cluster-check"
stage "$root/target/debug/libdfship_ffi_example.so" "$context/lib/libdfship_ffi_example.so"
python_package "$context"
build_node bookworm "$context"

# trixie node: the image users build (deploy/Dockerfile), on Debian trixie's
# Python 3.13; the abi3 wheel built on this host, nothing compiled in it.
trixie_inputs="$( (docker image inspect -f '{{.Id}}' dfship-python:trixie; cat "$root/deploy/Dockerfile" "$root/deploy/build-image.sh" "$here/requirements-worker.txt"; \
    cd "$root" && git ls-files -z crates python Cargo.lock | xargs -0 cat) | sha256sum | cut -c1-16)"
if [ "$(docker image inspect -f '{{ index .Config.Labels "dfship.inputs" }}' dfship-node:trixie 2>/dev/null || true)" = "$trixie_inputs" ]; then
    log "dfship-node:trixie is up to date"
else
    started=$SECONDS
    BASE=dfship-python:trixie REQUIREMENTS="$here/requirements-worker.txt" TAG=dfship-node:trixie-build \
        DFSHIP_IMAGE_CONTEXT="$work/context-deploy" "$root/deploy/build-image.sh"
    # The inputs' hash as a label, so an unchanged image is not rebuilt.
    echo "FROM dfship-node:trixie-build
LABEL dfship.inputs=$trixie_inputs" | DOCKER_BUILDKIT=0 docker build --quiet -t dfship-node:trixie - >/dev/null
    docker rmi dfship-node:trixie-build >/dev/null
    log "built dfship-node:trixie from deploy/Dockerfile in $((SECONDS - started)) s"
fi
