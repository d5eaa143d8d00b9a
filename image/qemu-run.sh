#!/bin/bash
# Boot a garage-node image in QEMU (UEFI via OVMF, TCG: no KVM needed).
#
#   image/qemu-run.sh IMAGE [options] [-- extra qemu args...]
#
# Options:
#   --snapshot           never write to IMAGE (QEMU keeps changes in a temporary overlay)
#   --grow SIZE          boot a qcow2 overlay on top of IMAGE, SIZE bigger than it
#                        (e.g. 2G): exercises the first-boot growth of GARAGE-DATA;
#                        IMAGE is never written
#   --serial-log PATH    serial console to PATH (default: stdio, interactive)
#   --timeout SECS       kill QEMU after SECS (default 900; 0 = no limit)
#   --pidfile PATH       QEMU writes its pid there (for cleanup by callers)
#   --hostfwd SPEC       user-mode net port forward, e.g. tcp:127.0.0.1:2222-:22 (repeatable)
#   --guestfwd SPEC      user-mode net guest forward, e.g. tcp:10.0.2.100:8443-tcp:127.0.0.1:8443
#   --netns NAME         run QEMU inside network namespace NAME (ip netns exec); the
#                        guest reaches that namespace's loopback as 10.0.2.2 (and only
#                        what that namespace can reach: give it loopback only)
#   --allow-outside      without --netns the guest is isolated (user-mode net with
#                        restrict=on: DHCP and the forwards above work, nothing else);
#                        this lets it reach the host and beyond through QEMU's NAT
#   --mem MIB            guest memory (default 3072)
#   --smp N              guest CPUs (default 2)
#   --usb                attach IMAGE as a USB stick (xhci + usb-storage) instead of virtio
#   --accel ACCEL        default tcg (KVM hangs on these build machines); kvm where it works
#   --vars PATH          OVMF variable store to use/keep (default: a fresh temporary copy)
#   --qmp PATH           QMP control socket at PATH (e.g. for `screendump` of the screen)
#   --no-serial-journal  do not ask the guest to copy its journal to the serial console
#   --reboot             a reboot of the guest boots it again (default: QEMU exits, so
#                        that a boot test ends with the guest); for the A/B update tests,
#                        where the stick reboots into the new version or back to the old one
#   --share DIR          DIR read-only in the guest as 9p tag "garage-share"
#                        (mount -t 9p -o trans=virtio,ro garage-share /mnt)
#
# The guest prints "GARAGE-NODE-BOOTED <hostname>" and "GARAGE-NODE-INFO ..." lines on
# its serial console after multi-user (garage-boot-marker.service), and (unless
# --no-serial-journal) its whole journal, agent included, as it is written.
set -euo pipefail

die() { echo "qemu-run: error: $*" >&2; exit 1; }

IMAGE=""
SNAPSHOT=0
GROW=""
SERIAL_LOG=""
TIMEOUT=900
PIDFILE=""
NETNS=""
MEM=3072
SMP=2
USB=0
ACCEL=tcg
VARS=""
QMP=""
SERIAL_JOURNAL=1
ALLOW_OUTSIDE=0
NETOPTS=""
EXTRA=()
REBOOT=0
SHARE=""

while [ $# -gt 0 ]; do
    case "$1" in
        --snapshot) SNAPSHOT=1; shift ;;
        --grow) GROW=${2:?}; shift 2 ;;
        --serial-log) SERIAL_LOG=${2:?}; shift 2 ;;
        --timeout) TIMEOUT=${2:?}; shift 2 ;;
        --pidfile) PIDFILE=${2:?}; shift 2 ;;
        --hostfwd) NETOPTS+=",hostfwd=${2:?}"; shift 2 ;;
        --guestfwd) NETOPTS+=",guestfwd=${2:?}"; shift 2 ;;
        --netns) NETNS=${2:?}; shift 2 ;;
        --allow-outside) ALLOW_OUTSIDE=1; shift ;;
        --mem) MEM=${2:?}; shift 2 ;;
        --smp) SMP=${2:?}; shift 2 ;;
        --usb) USB=1; shift ;;
        --accel) ACCEL=${2:?}; shift 2 ;;
        --vars) VARS=${2:?}; shift 2 ;;
        --qmp) QMP=${2:?}; shift 2 ;;
        --no-serial-journal) SERIAL_JOURNAL=0; shift ;;
        --reboot) REBOOT=1; shift ;;
        --share) SHARE=${2:?}; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [ -z "$IMAGE" ] || die "one image only"; IMAGE=$1; shift ;;
    esac
done
[ -n "$IMAGE" ] || die "usage: qemu-run.sh IMAGE [options] (see --help)"
[ -r "$IMAGE" ] || die "$IMAGE: no such image"
IMAGE=$(realpath "$IMAGE")

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-img >/dev/null || need+=(qemu-utils)
OVMF_CODE=/usr/share/OVMF/OVMF_CODE_4M.fd
OVMF_VARS=/usr/share/OVMF/OVMF_VARS_4M.fd
[ -r "$OVMF_CODE" ] || need+=(ovmf)
if [ ${#need[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing: ${need[*]} (apt-get install ${need[*]})"
    echo "qemu-run: installing ${need[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get -q install -y --no-install-recommends "${need[@]}" >/dev/null \
        || die "apt-get install ${need[*]} failed"
fi

TMP=$(mktemp -d /tmp/garage-qemu.XXXXXX)
cleanup() { rm -rf "$TMP"; }
trap cleanup EXIT

if [ -z "$VARS" ]; then
    VARS="$TMP/OVMF_VARS.fd"
    cp "$OVMF_VARS" "$VARS"
elif [ ! -e "$VARS" ]; then
    cp "$OVMF_VARS" "$VARS"
fi

DRIVE_FILE=$IMAGE
DRIVE_FMT=raw
DRIVE_OPTS=""
if [ -n "$GROW" ]; then
    size=$(stat -c %s "$IMAGE")
    add=$(numfmt --from=iec "${GROW%B}")
    DRIVE_FILE="$TMP/disk.qcow2"
    DRIVE_FMT=qcow2
    qemu-img create -q -f qcow2 -F raw -b "$IMAGE" "$DRIVE_FILE" "$((size + add))"
elif [ "$SNAPSHOT" = 1 ]; then
    DRIVE_OPTS=",snapshot=on"
fi

if [ "$USB" = 1 ]; then
    DISK=(-device qemu-xhci,id=xhci
          -drive "if=none,id=stick,file=$DRIVE_FILE,format=$DRIVE_FMT$DRIVE_OPTS"
          -device usb-storage,bus=xhci.0,drive=stick,removable=on,bootindex=0)
else
    DISK=(-drive "if=none,id=disk0,file=$DRIVE_FILE,format=$DRIVE_FMT,cache=unsafe$DRIVE_OPTS"
          -device virtio-blk-pci,drive=disk0,bootindex=0)
fi

if [ -n "$SERIAL_LOG" ]; then
    mkdir -p "$(dirname "$SERIAL_LOG")"
    CONSOLE=(-display none -monitor none -serial "file:$SERIAL_LOG")
else
    CONSOLE=(-nographic)
fi

# The guest must not send traffic off this machine by accident (NTP, DNS, a head address
# in a token): isolated unless a namespace decides what it reaches, or asked otherwise.
if [ -z "$NETNS" ] && [ "$ALLOW_OUTSIDE" = 0 ]; then
    NETOPTS=",restrict=on$NETOPTS"
fi

CMD=(qemu-system-x86_64
     -machine "q35,accel=$ACCEL" -cpu max -smp "$SMP" -m "$MEM"
     -drive "if=pflash,format=raw,unit=0,readonly=on,file=$OVMF_CODE"
     -drive "if=pflash,format=raw,unit=1,file=$VARS"
     "${DISK[@]}"
     -netdev "user,id=net0$NETOPTS" -device virtio-net-pci,netdev=net0
     -device virtio-rng-pci
     -smbios type=1,serial=garage-qemu
     "${CONSOLE[@]}")
[ "$REBOOT" = 1 ] || CMD+=(-no-reboot)
if [ -n "$SHARE" ]; then
    [ -d "$SHARE" ] || die "--share $SHARE: no such directory"
    CMD+=(-virtfs "local,path=$(realpath "$SHARE"),mount_tag=garage-share,security_model=none,readonly=on")
fi
[ -n "$PIDFILE" ] && CMD+=(-pidfile "$PIDFILE")
# The image's garage-serial-journal generator looks for this OEM string.
[ "$SERIAL_JOURNAL" = 1 ] && CMD+=(-smbios "type=11,value=io.garage.serial-journal=1")
[ -n "$QMP" ] && CMD+=(-qmp "unix:$QMP,server=on,wait=off")
CMD+=("${EXTRA[@]}")

PREFIX=()
[ "$TIMEOUT" != 0 ] && PREFIX+=(timeout --kill-after=15 "$TIMEOUT")
[ -n "$NETNS" ] && PREFIX+=(ip netns exec "$NETNS")

echo "qemu-run: ${PREFIX[*]} ${CMD[*]}" >&2
# Not exec: the EXIT trap removes the temporary overlay and variable store afterwards.
rc=0
"${PREFIX[@]}" "${CMD[@]}" || rc=$?
[ "$rc" = 124 ] && echo "qemu-run: timeout after ${TIMEOUT}s" >&2
exit "$rc"
