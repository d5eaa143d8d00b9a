#!/bin/bash
# Build the garage-node USB image: a raw GPT disk image that a gaming-PC owner flashes
# to a USB stick (dd, balenaEtcher, Raspberry Pi Imager), boots, and the PC joins its
# regional GPU network by itself.
#
#   sudo ./build-image.sh [--variant base|nvidia] [--join-token TOKEN] [--config FILE]
#                         [--output PATH] [--no-compress] [--if-changed] [--clean-cache]
#                         [--image-version V] [--signing-key KEYID|FILE] [--release-dir DIR]
#
#   --variant base|nvidia  base (default): no GPU driver; nvidia: Debian's driver 535
#   --join-token TOKEN     write it as [node] join_token into the stick's garage.toml
#                          (or set GARAGE_JOIN_TOKEN; gn1.… from the region's operator)
#   --config FILE          the garage.toml to bake in (default: image/garage.toml)
#   --output PATH          the raw image; .zst, .sha256 and .manifest.json go beside it
#   --no-compress          no .img.zst (faster; the tests boot the raw image)
#   --if-changed           do nothing when no input changed since PATH was built
#   --clean-cache          rebuild the cached OS tree from scratch (mkosi --force --force)
#   --image-version V      the OS version of this build (default: the agent's version in
#                          pyproject.toml): the root partition's label garage-root_V, the UKI
#                          garage-node_V.efi, IMAGE_VERSION= in os-release. A new release of
#                          the stick needs a higher V (2026.12.1, 0.1.0.2: letters, digits,
#                          '.' and '-'); only V changes, so the cached OS tree is reused
#   --signing-key KEYID|FILE  the operator's OpenPGP release key: a key id of your gpg keyring
#                          or an exported secret key file. Its public half goes into the image
#                          (/usr/share/garage-node/release-keys.gpg: the stick installs only
#                          releases signed by it), and the build writes a signed release
#                          directory for `garage-node head release add`. Without it the stick
#                          boots and serves as usual but can take no update.
#   --release-dir DIR      where the release goes (default: the .img's name with .release)
#   --test-fail-health-gate  TEST ONLY: this version's health gate always fails (the image
#                          tests' rollback proof); never for a stick anybody boots
#
# Output (default): out/garage-node-<version>-<variant>-amd64.img, .img.zst, and
# .img.sha256 / .img.zst.sha256 beside them; with --signing-key the release directory
# (release.json, garage-node_V.root.raw, garage-node_V.efi, SHA256SUMS, SHA256SUMS.gpg:
# garage_node/core/releasefiles.py). The stick is an A/B stick: ESP (systemd-boot, one UKI per
# installed version, boot counting), GARAGE, root A (this version), root B (empty, for the
# next one), GARAGE-DATA (docs/image-updates.md). The image definition is declarative, in
# image/ (mkosi 24 config: mkosi.conf, mkosi.profiles/, repart/, repart-root/, mkosi.extra/).
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
IMAGE_VERSION=""
SIGNING_KEY=""
RELEASE_DIR=""
TEST_FAIL_GATE=0

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
        --image-version) IMAGE_VERSION=${2:?}; shift 2 ;;
        --image-version=*) IMAGE_VERSION=${1#*=}; shift ;;
        --signing-key) SIGNING_KEY=${2:?}; shift 2 ;;
        --signing-key=*) SIGNING_KEY=${1#*=}; shift ;;
        --release-dir) RELEASE_DIR=${2:?}; shift 2 ;;
        --release-dir=*) RELEASE_DIR=${1#*=}; shift ;;
        --test-fail-health-gate) TEST_FAIL_GATE=1; shift ;;
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
# The same rule as garage_node/core/releasefiles.py's VERSION (sysupdate's patterns use '_'
# as separator and systemd-boot's try counter '+'), checked here before anything slow runs.
if [ -n "$IMAGE_VERSION" ] && ! [[ "$IMAGE_VERSION" =~ ^[0-9A-Za-z][0-9A-Za-z.-]{0,63}$ ]]; then
    die "--image-version '$IMAGE_VERSION' is not a release version: use 1-64 letters, digits, '.' and '-', starting with a letter or digit (no '_' or '+'), e.g. 2026.12.1"
fi
[ -z "$RELEASE_DIR" ] || [ -n "$SIGNING_KEY" ] || die "--release-dir needs --signing-key (a release is signed with it)"

# ------------------------------------------------------------------ the release key
# --signing-key: a key id of the caller's gpg keyring, or a file with an exported secret key
# (imported into a throwaway keyring that this script removes). SIGN_FPR is the full
# fingerprint: what signs SHA256SUMS and what the image trusts.
SIGN_HOME=""
SIGN_FPR=""
GNUPG_TMP=""
cleanup_gnupg() { [ -z "$GNUPG_TMP" ] || rm -rf "$GNUPG_TMP"; }
trap cleanup_gnupg EXIT
if [ -n "$SIGNING_KEY" ]; then
    command -v gpg >/dev/null || die "--signing-key needs gpg (apt-get install gpg)"
    if [ -f "$SIGNING_KEY" ]; then
        GNUPG_TMP=$(mktemp -d /tmp/garage-build-gnupg.XXXXXX)
        SIGN_HOME=$GNUPG_TMP
        GNUPGHOME=$SIGN_HOME gpg --batch --quiet --import "$SIGNING_KEY" 2>/dev/null \
            || die "--signing-key $SIGNING_KEY: gpg cannot import this file (export the key with: gpg --export-secret-keys --armor KEYID > FILE)"
        SIGN_FPR=$(GNUPGHOME=$SIGN_HOME gpg --batch --with-colons --list-secret-keys 2>/dev/null | awk -F: '/^fpr:/ {print $10; exit}' || true)
        [ -n "$SIGN_FPR" ] || die "--signing-key $SIGNING_KEY holds no secret key (a public key cannot sign: export the secret key)"
    else
        SIGN_HOME=${GNUPGHOME:-$HOME/.gnupg}
        [ -d "$SIGN_HOME" ] || die "--signing-key $SIGNING_KEY: no such file, and no gpg keyring at $SIGN_HOME (give a key file, or set GNUPGHOME)"
        SIGN_FPR=$(GNUPGHOME=$SIGN_HOME gpg --batch --with-colons --list-secret-keys -- "$SIGNING_KEY" 2>/dev/null | awk -F: '/^fpr:/ {print $10; exit}' || true)
        [ -n "$SIGN_FPR" ] || die "--signing-key $SIGNING_KEY: no such file, and no secret key with this id in $SIGN_HOME (gpg --list-secret-keys)"
    fi
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
    command -v reprepro >/dev/null || need+=(reprepro)
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

# ------------------------------------------------------------------ systemd 254 for the image
# The A/B stick needs systemd-sysupdate, which Debian ships from systemd 254 on (bookworm-
# backports); bookworm's 252 has none. The binary packages of the systemd source package depend
# on each other's exact version, so they move together. They reach mkosi as a local package
# directory (PackageDirectories=, a local repository at the same priority as bookworm, where the
# higher version wins) rather than as a backports apt source: that source would also show mkosi's
# default initrd dracut's "Recommends: systemd-cryptsetup", a name without a package that its
# package list asks for (apt: "has no installation candidate"). Downloaded once, then cached.
SYSTEMD_BPO_VERSION=254.26-1~bpo12+1
SYSTEMD_BPO_PACKAGES=(systemd systemd-sysv systemd-boot systemd-boot-efi systemd-resolved systemd-timesyncd
                      systemd-container udev libsystemd0 libsystemd-shared libudev1 libpam-systemd libnss-systemd
                      libnss-resolve libnss-myhostname systemd-dev)
SYSTEMD_DEBS="$CACHE/systemd-$SYSTEMD_BPO_VERSION"
ensure_systemd_debs() {
    local missing=() p
    for p in "${SYSTEMD_BPO_PACKAGES[@]}"; do
        compgen -G "$SYSTEMD_DEBS/${p}_*.deb" >/dev/null || missing+=("$p=$SYSTEMD_BPO_VERSION")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    ensure_backports_source
    [ -n "$(find /var/lib/apt/lists -name '*bookworm-backports*Packages*' 2>/dev/null | head -1)" ] \
        || apt-get "${APT_Q[@]}" update >/dev/null
    say "downloading systemd $SYSTEMD_BPO_VERSION for the image into $SYSTEMD_DEBS"
    mkdir -p "$SYSTEMD_DEBS.tmp"
    (cd "$SYSTEMD_DEBS.tmp" && apt-get "${APT_Q[@]}" -o APT::Sandbox::User=root download "${missing[@]}" >/dev/null) \
        || die "apt-get download ${missing[*]} failed (needs deb.debian.org incl. bookworm-backports)"
    mkdir -p "$SYSTEMD_DEBS"
    mv "$SYSTEMD_DEBS.tmp"/*.deb "$SYSTEMD_DEBS/"
    rmdir "$SYSTEMD_DEBS.tmp"
}
# One build at a time on this machine (shared caches, output and CPU).
mkdir -p "$CACHE"
exec 9>"$CACHE/.build-image.lock"
if ! flock -n 9; then
    say "another build-image.sh is running; waiting for it"
    flock 9
fi
ensure_systemd_debs
step_done "host tools"

# ------------------------------------------------------------------ version, epoch, paths
VERSION=$($PY -c 'import sys,tomllib; print(tomllib.load(open(sys.argv[1],"rb"))["project"]["version"])' "$REPO/pyproject.toml")
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH  # mkosi takes it from the environment (clamped file times, repart)
IMAGE_VERSION=${IMAGE_VERSION:-$VERSION}
NAME="garage-node-$IMAGE_VERSION-$VARIANT-amd64"
OUTPUT=${OUTPUT:-$REPO/out/$NAME.img}
case "$OUTPUT" in /*) ;; *) OUTPUT="$PWD/$OUTPUT" ;; esac
mkdir -p "$(dirname "$OUTPUT")"
BUILD="$REPO/out/build/$VARIANT"
STAGE="$BUILD/stage"
mkdir -p "$CACHE" "$BUILD"
if [ -n "$SIGNING_KEY" ]; then
    RELEASE_DIR=${RELEASE_DIR:-${OUTPUT%.img}.release}
    case "$RELEASE_DIR" in /*) ;; *) RELEASE_DIR="$PWD/$RELEASE_DIR" ;; esac
fi
say "variant=$VARIANT version=$IMAGE_VERSION (agent $VERSION) SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH output=$OUTPUT"

# ------------------------------------------------------------------ garage.toml: staged
# $STAGE/extra is this build's extra tree for mkosi (besides image/mkosi.extra/ and the
# repository files that image/mkosi.conf names). bootfs/ becomes the GARAGE partition
# (repart/10-garage.conf), next to mkosi.extra's README.txt.
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
GARAGE_NODE_IMAGE_VERSION=$IMAGE_VERSION
EOF
# A/B: each version's UKI finds its own root by the partition label that systemd-sysupdate gives
# the slot it writes (garage-root_V; /usr/lib/sysupdate.d/). mkosi adds the rest of the command
# line (image/mkosi.conf); this file stays in the image as a record of it.
mkdir -p "$STAGE/extra/etc/kernel"
echo "root=PARTLABEL=garage-root_$IMAGE_VERSION" > "$STAGE/extra/etc/kernel/cmdline"
if [ -n "$SIGN_FPR" ]; then
    # The keys the stick's installer verifies a release's SHA256SUMS.gpg against.
    mkdir -p "$STAGE/extra/usr/share/garage-node"
    GNUPGHOME=$SIGN_HOME gpg --batch --export "$SIGN_FPR" > "$STAGE/extra/usr/share/garage-node/release-keys.gpg"
    [ -s "$STAGE/extra/usr/share/garage-node/release-keys.gpg" ] || die "gpg exported nothing for key $SIGN_FPR"
fi
if [ "$TEST_FAIL_GATE" = 1 ]; then
    # TEST ONLY (tests/image/test_image_update.py): garage-boot-check fails on this version.
    say "TEST ONLY: this image's health gate always fails (--test-fail-health-gate)"
    mkdir -p "$STAGE/extra/usr/lib/garage-node"
    echo "test build: the health gate fails on purpose (build-image.sh --test-fail-health-gate)" \
        > "$STAGE/extra/usr/lib/garage-node/test-fail-health-gate"
fi
# The partition table: image/repart/ (common) and image/repart-root/<variant>/, with this
# version in the root's label (systemd-repart's own %A would read the build host's os-release).
mkdir -p "$STAGE/repart"
for f in "$REPO"/image/repart/*.conf "$REPO/image/repart-root/$VARIANT"/*.conf; do
    sed "s/@IMAGE_VERSION@/$IMAGE_VERSION/g" "$f" > "$STAGE/repart/$(basename "$f")"
done
step_done "garage.toml + staging"

# ------------------------------------------------------------------ up to date?
# --if-changed: skip the build when the inputs hash equals the one stored beside the
# output (tests and CI reuse out/ this way). The token enters only as a hash.
inputs_hash() {
    {
        echo "variant=$VARIANT version=$VERSION epoch=$SOURCE_DATE_EPOCH compress=$COMPRESS"
        echo "image_version=$IMAGE_VERSION key=$SIGN_FPR release_dir=$RELEASE_DIR test_fail_gate=$TEST_FAIL_GATE"
        echo "mkosi=$(mkosi --version)"
        (cd "$REPO" && find build-image.sh image systemd garage_node pyproject.toml README.md docs/node.md \
            -path image/engine -prune -o -path '*/__pycache__' -prune -o -type f -print0 \
            | sort -z | xargs -0 sha256sum)
        (cd "$STAGE/extra" && find . -type f -print0 | sort -z | xargs -0 sha256sum)
    } | sha256sum | cut -d' ' -f1
}
HASH=$(inputs_hash)
if [ "$IF_CHANGED" = 1 ] && [ -f "$OUTPUT" ] && [ "$(cat "$OUTPUT.inputs" 2>/dev/null)" = "$HASH" ] \
   && { [ "$COMPRESS" = 0 ] || [ -f "$OUTPUT.zst" ]; } \
   && { [ -z "$RELEASE_DIR" ] || [ -f "$RELEASE_DIR/SHA256SUMS.gpg" ]; }; then
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
# A/B stick (systemd 254 from bookworm-backports): its own cached tree, so that a build of
# an older checkout (systemd 252, one root) and this one do not rebuild each other's.
MKOSI_CACHE="$CACHE/mkosi/$VARIANT-ab"
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
        --image-version "$IMAGE_VERSION" \
        --unified-kernel-image-format "garage-node_$IMAGE_VERSION+&c" \
        --repart-dir "$STAGE/repart" \
        --package-directory "$SYSTEMD_DEBS" \
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

# ------------------------------------------------------------------ the release
# With --signing-key: the root partition and the UKI of this build, release.json, SHA256SUMS
# (image/make-release.py) and SHA256SUMS.gpg, signed here with the operator's key.
if [ -n "$SIGN_FPR" ]; then
    rm -rf "$RELEASE_DIR"
    mkdir -p "$(dirname "$RELEASE_DIR")"
    MANIFEST_JSON="${OUTPUT%.img}.manifest.json"
    $PY -B "$REPO/image/make-release.py" "$OUTPUT" "$IMAGE_VERSION" "$VARIANT" "$VERSION" "$MANIFEST_JSON" \
        "$STAGE/wheels" "$SOURCE_DATE_EPOCH" "$RELEASE_DIR" || die "writing the release into $RELEASE_DIR failed"
    GNUPGHOME=$SIGN_HOME gpg --batch --yes --quiet --local-user "$SIGN_FPR!" --detach-sign \
        --output "$RELEASE_DIR/SHA256SUMS.gpg" "$RELEASE_DIR/SHA256SUMS" \
        || die "gpg could not sign $RELEASE_DIR/SHA256SUMS with key $SIGN_FPR (a key with a passphrase needs a gpg-agent that can ask for it)"
    step_done "release (signed)"
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
if [ -n "$SIGN_FPR" ]; then
    say "release:    $RELEASE_DIR (signed by $SIGN_FPR); add it at the head: garage-node head release add $RELEASE_DIR"
else
    say "note: built without --signing-key: this stick trusts no release key and can take no update"
fi
exit 0
