#!/bin/bash
# Build the garage-node USB image: a raw GPT disk image that a gaming-PC owner flashes
# to a USB stick (dd, balenaEtcher, Raspberry Pi Imager), boots, and the PC joins its
# regional GPU network by itself.
#
#   sudo ./build-image.sh [--variant base|nvidia] [--join-token TOKEN] [--config FILE]
#                         [--output PATH] [--no-compress] [--if-changed] [--clean-cache]
#
#   --variant base|nvidia  base (default): no GPU driver; nvidia: Debian's driver 535
#   --join-token TOKEN     write it as [node] join_token into the stick's garage.toml
#                          (or set GARAGE_JOIN_TOKEN; gn1.… from the region's operator)
#   --config FILE          the garage.toml to bake in (default: image/garage.toml)
#   --output PATH          the raw image; .zst, .sha256 and .manifest.json go beside it
#   --no-compress          no .img.zst (faster; the tests boot the raw image)
#   --if-changed           do nothing when no input changed since PATH was built
#   --clean-cache          rebuild the cached OS tree from scratch (mkosi --force --force)
#
# Output (default): out/garage-node-<version>-<variant>-amd64.img, .img.zst, and
# .img.sha256 / .img.zst.sha256 beside them. The image definition is declarative, in
# image/ (mkosi 24 config: mkosi.conf, mkosi.profiles/, mkosi.repart/, mkosi.extra/).
# This script handles the arguments, host tools, the garage.toml for the stick, the
# agent's wheels, then runs mkosi and compresses and checksums its raw image.
#
# garage.toml (--config FILE, default image/garage.toml) is checked with the agent's own
# validator before anything slow runs, and again after --join-token is written into it.
#
# Caches (repeated builds reuse them): /var/cache/garage-node/ (apt packages, mkosi's
# cached OS tree per variant, Python wheels). Build scratch: out/build/.
# Honours SOURCE_DATE_EPOCH (default: the time of the last git commit).
# The join token is never printed; it only ends up in the image's garage.toml.
set -euo pipefail

REPO=$(cd "$(dirname "$0")" && pwd)
CACHE=${GARAGE_IMAGE_CACHE:-/var/cache/garage-node}
VARIANT=base
JOIN_TOKEN=${GARAGE_JOIN_TOKEN:-}
CONFIG=""
OUTPUT=""
COMPRESS=1
IF_CHANGED=0
CLEAN_CACHE=0

usage() { awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; }
die() { echo "build-image: error: $*" >&2; exit 1; }
say() { echo "build-image: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --variant) VARIANT=${2:?}; shift 2 ;;
        --variant=*) VARIANT=${1#*=}; shift ;;
        --join-token) JOIN_TOKEN=${2?}; shift 2 ;;
        --join-token=*) JOIN_TOKEN=${1#*=}; shift ;;
        --config) CONFIG=${2:?}; shift 2 ;;
        --config=*) CONFIG=${1#*=}; shift ;;
        --output) OUTPUT=${2:?}; shift 2 ;;
        --output=*) OUTPUT=${1#*=}; shift ;;
        --no-compress) COMPRESS=0; shift ;;
        --if-changed) IF_CHANGED=1; shift ;;
        --clean-cache) CLEAN_CACHE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

case "$VARIANT" in base|nvidia) ;; *) die "--variant must be base or nvidia, not '$VARIANT'" ;; esac
[ "$(id -u)" = 0 ] || die "run as root (sudo ./build-image.sh ...): mkosi needs it to build a disk image"
[ -z "$CONFIG" ] || [ -r "$CONFIG" ] || die "--config $CONFIG: no such readable file"
if [ -n "$JOIN_TOKEN" ]; then
    case "$JOIN_TOKEN" in gn1.*) ;; *) die "--join-token must start with 'gn1.' (value not shown)" ;; esac
    case "$JOIN_TOKEN" in *[[:space:]\"\\]*) die "--join-token contains spaces, quotes or backslashes (value not shown)" ;; esac
fi

# ------------------------------------------------------------------ garage.toml: the source
# One schema, the agent's: garage_node.node.config needs only the standard library (3.11,
# tomllib), so it runs from the checkout before anything is installed. It never prints
# values (the file may hold a token or a Wi-Fi key). -P: a garage_node/ in the current
# directory must not shadow this checkout's; -B: no __pycache__ written into the checkout.
PY=/usr/bin/python3
GARAGE_TOML_SRC=${CONFIG:-$REPO/image/garage.toml}
check_garage_toml() {  # check_garage_toml FILE DESCRIPTION
    local rc=0
    PYTHONPATH="$REPO" $PY -B -P -m garage_node.node.config "$1" || rc=$?
    case $rc in
        0) ;;
        78) die "$2 is not a valid garage.toml (the line above says what is wrong); fix that and run again" ;;
        *) die "could not check $2: '$PY -m garage_node.node.config' exited $rc (needs Python >= 3.11 and $REPO/garage_node)" ;;
    esac
}
check_garage_toml "$GARAGE_TOML_SRC" "${CONFIG:+--config }$GARAGE_TOML_SRC"

T_START=$(date +%s.%N)
T_LAST=$T_START
declare -a TIMINGS=()
step_done() {  # step_done NAME: record how long the step since the last call took
    local now; now=$(date +%s.%N)
    TIMINGS+=("$(printf '%-28s %7.1f s' "$1" "$(echo "$now - $T_LAST" | bc)")")
    say "$(printf '%s done in %.1f s' "$1" "$(echo "$now - $T_LAST" | bc)")"
    T_LAST=$now
}

# ------------------------------------------------------------------ host tools
APT_Q=(-o Dpkg::Use-Pty=0 -o APT::Color=0 -q)
ensure_backports_source() {
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        say "adding bookworm-backports (deb.debian.org) to apt sources for mkosi 24"
        cat > /etc/apt/sources.list.d/garage-node-backports.sources <<'EOF'
# Added by garage-node build-image.sh: mkosi 24 lives in bookworm-backports.
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        apt-get "${APT_Q[@]}" update >/dev/null
    fi
}
ensure_host_tools() {
    local need=() have_mkosi=""
    if command -v mkosi >/dev/null; then
        have_mkosi=$(mkosi --version 2>/dev/null | awk '{print $2}')
    fi
    if [ -z "$have_mkosi" ] || [ "${have_mkosi%%.*}" -lt 24 ]; then
        need+=(mkosi systemd-container systemd-boot systemd-boot-efi)
    fi
    command -v bootctl >/dev/null || need+=(systemd-boot)
    [ -e /usr/lib/systemd/boot/efi/systemd-bootx64.efi ] || need+=(systemd-boot-efi)
    command -v bwrap >/dev/null || need+=(bubblewrap)
    command -v mcopy >/dev/null || need+=(mtools)
    command -v mkfs.vfat >/dev/null || need+=(dosfstools)
    command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
    command -v sfdisk >/dev/null || need+=(fdisk)
    command -v zstd >/dev/null || need+=(zstd)
    command -v bc >/dev/null || need+=(bc)
    /usr/bin/python3 -c 'import pefile' 2>/dev/null || need+=(python3-pefile)
    [ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
    if [ ${#need[@]} -gt 0 ]; then
        command -v apt-get >/dev/null || die "missing host tools (${need[*]}) and no apt-get: install mkosi >= 24 and these by hand"
        ensure_backports_source
        say "installing host tools: ${need[*]}"
        [ -n "$(find /var/lib/apt/lists -name '*bookworm-backports*Packages*' 2>/dev/null | head -1)" ] \
            || apt-get "${APT_Q[@]}" update >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get "${APT_Q[@]}" install -y --no-install-recommends \
            -t bookworm-backports "${need[@]}" >/dev/null \
            || die "apt-get install ${need[*]} failed (needs deb.debian.org incl. bookworm-backports)"
    fi
    have_mkosi=$(mkosi --version | awk '{print $2}')
    [ "${have_mkosi%%.*}" -ge 24 ] || die "mkosi $have_mkosi is too old: need 24 (apt-get install -t bookworm-backports mkosi)"
    local repart_v
    repart_v=$(systemd-repart --version | awk 'NR==1{print $2}')
    [ "${repart_v:-0}" -ge 254 ] || die "systemd-repart $repart_v is too old: need 254 (apt-get install -t bookworm-backports systemd)"
}
ensure_host_tools
# One build at a time on this machine (shared caches, output and CPU).
mkdir -p "$CACHE"
exec 9>"$CACHE/.build-image.lock"
if ! flock -n 9; then
    say "another build-image.sh is running; waiting for it"
    flock 9
fi
step_done "host tools"

# ------------------------------------------------------------------ version, epoch, paths
VERSION=$($PY -c 'import sys,tomllib; print(tomllib.load(open(sys.argv[1],"rb"))["project"]["version"])' "$REPO/pyproject.toml")
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH  # mkosi takes it from the environment (clamped file times, repart)
NAME="garage-node-$VERSION-$VARIANT-amd64"
OUTPUT=${OUTPUT:-$REPO/out/$NAME.img}
case "$OUTPUT" in /*) ;; *) OUTPUT="$PWD/$OUTPUT" ;; esac
mkdir -p "$(dirname "$OUTPUT")"
BUILD="$REPO/out/build/$VARIANT"
STAGE="$BUILD/stage"
mkdir -p "$CACHE" "$BUILD"
say "variant=$VARIANT version=$VERSION SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH output=$OUTPUT"

# ------------------------------------------------------------------ garage.toml: staged
# $STAGE/extra is this build's extra tree for mkosi (besides image/mkosi.extra/ and the
# repository files that image/mkosi.conf names). bootfs/ becomes the GARAGE partition
# (mkosi.repart/10-garage.conf), next to mkosi.extra's README.txt.
rm -rf "$STAGE"
mkdir -p "$STAGE/wheels" "$STAGE/extra/usr/lib/garage-node/bootfs" "$STAGE/extra/etc/garage-node"
BOOTFS="$STAGE/extra/usr/lib/garage-node/bootfs"
# The join token reaches the script through the environment (argv is visible in ps). The
# script only edits text (comments and layout stay the owner's); the validator then checks
# the file exactly as it will be on the stick.
GARAGE_JOIN_TOKEN="$JOIN_TOKEN" $PY -B "$REPO/image/stage-garage-toml.py" "$GARAGE_TOML_SRC" "$BOOTFS/garage.toml"
check_garage_toml "$BOOTFS/garage.toml" "the staged garage.toml for the stick ($BOOTFS/garage.toml)"
GIT_REV=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
GIT_DIRTY=$(git -C "$REPO" status --porcelain 2>/dev/null | grep -q . && echo "+dirty" || true)
cat > "$STAGE/extra/etc/garage-node/image-release" <<EOF
GARAGE_NODE_VERSION=$VERSION
GARAGE_NODE_VARIANT=$VARIANT
GARAGE_NODE_GIT=$GIT_REV$GIT_DIRTY
GARAGE_NODE_BUILD_EPOCH=$SOURCE_DATE_EPOCH
EOF
step_done "garage.toml + staging"

# ------------------------------------------------------------------ up to date?
# --if-changed: skip the build when the inputs hash equals the one stored beside the
# output (tests and CI reuse out/ this way). The token enters only as a hash.
inputs_hash() {
    {
        echo "variant=$VARIANT version=$VERSION epoch=$SOURCE_DATE_EPOCH compress=$COMPRESS"
        echo "mkosi=$(mkosi --version)"
        (cd "$REPO" && find build-image.sh image systemd garage_node pyproject.toml README.md docs/node.md \
            -path image/engine -prune -o -path '*/__pycache__' -prune -o -type f -print0 \
            | sort -z | xargs -0 sha256sum)
        (cd "$STAGE/extra" && find . -type f -print0 | sort -z | xargs -0 sha256sum)
    } | sha256sum | cut -d' ' -f1
}
HASH=$(inputs_hash)
if [ "$IF_CHANGED" = 1 ] && [ -f "$OUTPUT" ] && [ "$(cat "$OUTPUT.inputs" 2>/dev/null)" = "$HASH" ] \
   && { [ "$COMPRESS" = 0 ] || [ -f "$OUTPUT.zst" ]; }; then
    say "up to date ($OUTPUT, inputs $HASH): nothing to do"
    exit 0
fi

# ------------------------------------------------------------------ agent wheel + deps
# Wheels are resolved on this host (CPython 3.11 like the image's Debian python3) and
# cached in $CACHE/image-wheels; the image installs them offline (mkosi.postinst.chroot).
SRC="$BUILD/src"
rm -rf "$SRC"; mkdir -p "$SRC"
(cd "$REPO" && cp -a pyproject.toml garage_node configs "$SRC/" && for f in README.md LICENSE setup.cfg setup.py MANIFEST.in; do
    [ -e "$f" ] && cp -a "$f" "$SRC/"; done; true)
find "$SRC" -name __pycache__ -prune -exec rm -rf {} +
[ -f "$SRC/README.md" ] || echo "garage-node" > "$SRC/README.md"
HOSTPY=python3
$HOSTPY -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null \
    || HOSTPY=/usr/bin/python3
$HOSTPY -m pip --version >/dev/null 2>&1 || die "no pip for $HOSTPY (apt-get install python3-pip)"
PIP=($HOSTPY -m pip --disable-pip-version-check)
"${PIP[@]}" wheel --quiet --no-deps -w "$BUILD/self" "$SRC" >/dev/null 2>"$BUILD/pip-self.log" \
    || { cat "$BUILD/pip-self.log" >&2; die "building the garage-node wheel failed"; }
SELF_WHL=$(ls -t "$BUILD"/self/garage_node-"$VERSION"-*.whl | head -1)
mkdir -p "$CACHE/image-wheels"
# pip wheel copies the requested wheel into -w too: a stale garage_node wheel of the
# same version in the cache would shadow the fresh one. Keep it out of the cache.
rm -f "$CACHE"/image-wheels/garage_node-*.whl
# Offline first (warm cache), online (PyPI) only when something is missing.
if ! "${PIP[@]}" wheel --quiet --no-index --find-links "$CACHE/image-wheels" -w "$CACHE/image-wheels" "$SELF_WHL" \
        >"$BUILD/pip-deps.log" 2>&1; then
    say "fetching Python wheels from PyPI into $CACHE/image-wheels"
    "${PIP[@]}" wheel --quiet --only-binary=:all: --find-links "$CACHE/image-wheels" -w "$CACHE/image-wheels" "$SELF_WHL" \
        >"$BUILD/pip-deps.log" 2>&1 || { cat "$BUILD/pip-deps.log" >&2; die "resolving the agent's dependencies failed"; }
fi
rm -f "$CACHE"/image-wheels/garage_node-*.whl
# Exactly the resolved set goes into the image (the cache may hold other versions).
"${PIP[@]}" install --quiet --dry-run --ignore-installed --no-index --find-links "$CACHE/image-wheels" \
    --report "$BUILD/pip-report.json" "$SELF_WHL" >/dev/null 2>"$BUILD/pip-report.log" \
    || { cat "$BUILD/pip-report.log" >&2; die "pip could not resolve the wheel set"; }
$HOSTPY - "$BUILD/pip-report.json" "$STAGE/wheels" <<'EOF'
import json, os, shutil, sys, urllib.parse, urllib.request
report, dest = json.load(open(sys.argv[1])), sys.argv[2]
for item in report["install"]:
    path = urllib.request.url2pathname(urllib.parse.urlparse(item["download_info"]["url"]).path)
    target = os.path.join(dest, os.path.basename(path))
    try:
        os.link(path, target)
    except OSError:
        shutil.copy2(path, target)
print(f"build-image: {len(report['install'])} wheels for the agent venv")
EOF
step_done "agent wheels"

# ------------------------------------------------------------------ mkosi
MKOSI_CACHE="$CACHE/mkosi/$VARIANT"
FORCE=(--force)  # replace what a previous build left in mkosi-out
if [ "$CLEAN_CACHE" = 1 ]; then
    say "--clean-cache: mkosi removes its cached OS tree in $MKOSI_CACHE first"
    FORCE=(--force --force)  # twice: mkosi removes its incremental cache too
fi
mkdir -p "$MKOSI_CACHE" "$CACHE/mkosi-packages" "$CACHE/workspace" "$BUILD/mkosi-out"
rm -rf "${BUILD:?}/mkosi-out/"*
say "running mkosi (log: $BUILD/mkosi.log)"
set +e
(
    cd "$REPO/image" && mkosi \
        --profile "$VARIANT" \
        --image-version "$VERSION" \
        --output "$NAME" \
        --output-dir "$BUILD/mkosi-out" \
        --cache-dir "$MKOSI_CACHE" \
        --package-cache-dir "$CACHE/mkosi-packages" \
        --workspace-dir "$CACHE/workspace" \
        --build-sources "$STAGE" \
        --extra-tree "$STAGE/extra:/" \
        "${FORCE[@]}" \
        build 2>&1
) | $PY -u -c '
import sys, time
t0 = time.monotonic()
for line in sys.stdin:
    sys.stdout.write(f"[{time.monotonic() - t0:6.1f}] {line}")
' > "$BUILD/mkosi.log"
rc=${PIPESTATUS[0]}
set -e
if [ $rc != 0 ]; then
    tail -n 60 "$BUILD/mkosi.log" >&2
    die "mkosi failed (exit $rc); full log: $BUILD/mkosi.log"
fi
grep -E "^\[ *[0-9.]+\] ‣" "$BUILD/mkosi.log" | sed 's/^/    /' | tail -n 40
step_done "mkosi build"

# Renaming, compressing and checksumming stay here (see image/mkosi.conf): mkosi 24's
# CompressOutput= replaces the raw image by the compressed one, and its Checksum= writes a
# SHA256SUMS under mkosi's .raw names; we ship the .img, a .img.zst copy and one .sha256
# per file that `sha256sum -c` checks where both lie.
RAW=$(ls "$BUILD/mkosi-out/$NAME"*.raw 2>/dev/null | head -1)
[ -n "$RAW" ] || die "mkosi produced no .raw image in $BUILD/mkosi-out"
rm -f "$OUTPUT" "$OUTPUT.zst" "$OUTPUT.sha256" "$OUTPUT.zst.sha256" "$OUTPUT.inputs"
mv "$RAW" "$OUTPUT"
for f in "$BUILD/mkosi-out/$NAME"*.manifest; do [ -e "$f" ] && mv "$f" "${OUTPUT%.img}.manifest.json"; done
(cd "$(dirname "$OUTPUT")" && sha256sum "$(basename "$OUTPUT")" > "$(basename "$OUTPUT").sha256")
if [ "$COMPRESS" = 1 ]; then
    zstd -q -T0 -3 --sparse -f "$OUTPUT" -o "$OUTPUT.zst"
    (cd "$(dirname "$OUTPUT")" && sha256sum "$(basename "$OUTPUT").zst" > "$(basename "$OUTPUT").zst.sha256")
    step_done "compress (zstd -3)"
fi
echo "$HASH" > "$OUTPUT.inputs"

# ------------------------------------------------------------------ summary
T_END=$(date +%s.%N)
echo
say "timings:"
for t in "${TIMINGS[@]}"; do echo "    $t"; done
printf '    %-28s %7.1f s\n' "total" "$(echo "$T_END - $T_START" | bc)"
say "image:      $OUTPUT ($(du -h --apparent-size "$OUTPUT" | cut -f1) raw, $(du -h "$OUTPUT" | cut -f1) allocated)"
[ "$COMPRESS" = 1 ] && say "compressed: $OUTPUT.zst ($(du -h "$OUTPUT.zst" | cut -f1))"
sfdisk -l "$OUTPUT" 2>/dev/null | sed -n '/^Device/,$p' | sed 's/^/    /'
if [ "$VARIANT" = nvidia ]; then
    say "note: the nvidia variant carries Debian's driver 535 and no NVIDIA container toolkit; the"
    say "note: agent passes the GPU device nodes and driver libraries to the engine itself. It serves"
    say "note: GPUs up to Ada/Hopper with CUDA <= 12.x images; RTX 50-series needs a newer driver."
fi
[ -n "$JOIN_TOKEN" ] && say "garage.toml carries a join token (not shown)"
exit 0
