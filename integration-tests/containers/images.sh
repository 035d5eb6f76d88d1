#!/usr/bin/env bash
# Builds the images of the container cluster tests on a machine that can pull
# no image: Debian root filesystems made with debootstrap, imported with
# `docker import`, then the project's binaries layered on with `docker build`
# (whose FROM is the local base image, so nothing is pulled).
#
#   dfship-base:<suite>   Debian <suite> + /opt/dfship/venv (requirements-worker.txt)
#   dfship-node:bookworm  base + dfship-worker, dfship, dfship-cluster-check and the
#                         FFI example library, all built on the host (bookworm, Python 3.11)
#   dfship-node:trixie    base + dfship-worker built inside the trixie image
#                         (Python 3.13), for the version-skew tests
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

label_of() { docker image inspect -f '{{ index .Config.Labels "dfship.inputs" }}' "$1" 2>/dev/null || true; }

# Base image: rootfs by debootstrap, Python packages by pip inside a chroot.
build_base() {
    local suite="$1" packages="$2"
    local image="dfship-base:$suite"
    local inputs
    inputs="$( (cat "$here/requirements-worker.txt"; echo "$suite $packages"; declare -f build_base) | sha256sum | cut -c1-16)"
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
    # A clean environment: the host's PIP_* settings name host paths.
    local in_root=(env -i PATH=/usr/bin:/bin HOME=/root PIP_CERT=/etc/ssl/certs/ca-certificates.crt "$(command -v chroot)" "$rootfs")
    "${in_root[@]}" /usr/bin/python3 -m venv /opt/dfship/venv
    "${in_root[@]}" /opt/dfship/venv/bin/pip install --quiet --disable-pip-version-check \
        -r /tmp/requirements.txt
    rm -rf "$rootfs/tmp/requirements.txt" "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/root/.cache"
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
build_base trixie python3,python3-venv,libpython3-dev,gcc,libc6-dev
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

# trixie node: the worker built inside the trixie base image against its Python 3.13,
# with the host's Rust toolchain and crate sources mounted (no download).
log "building dfship-worker for trixie (Python 3.13) inside dfship-base:trixie"
rustup_home="${RUSTUP_HOME:-$HOME/.rustup}"
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
docker run --rm --network none \
    -v "$root:/src:ro" -v "$work/trixie-target:/target" \
    -v "$rustup_home:/rustup:ro" -v "$cargo_home:/cargo" \
    -e RUSTUP_HOME=/rustup -e CARGO_HOME=/cargo -e CARGO_TARGET_DIR=/target \
    -e PYO3_PYTHON=/usr/bin/python3 -e CARGO_NET_OFFLINE=true \
    -w /src dfship-base:trixie \
    /cargo/bin/cargo build --locked --offline -p dfship-worker --bin dfship-worker 2>&1 | tail -3 >&2
context="$work/context-trixie"
mkdir -p "$context/lib"
python_package "$context"
stage "$work/trixie-target/debug/dfship-worker" "$context/bin/dfship-worker"
build_node trixie "$context"
