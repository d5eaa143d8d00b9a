"""The PC's side of OS updates (issue #19): may it update now, what its A/B stick says about
the current boot, and what it tells the head about its last update.

Three pieces, each pure or with its files handed in:

- `decide(...)`: the head named a target version; given the owner's [update] policy, the boot
  and the serving state, the answer is NONE (nothing to do), WAIT (and why, for `status` and the
  head), DRAIN (allowed now, but the engine still has work: drain first) or INSTALL. An update is
  never started on a boot that is not blessed: writing the other slot then could overwrite the
  only version known to boot (systemd/systemd#34827).
- `boot_facts(...)`: the booted version (os-release IMAGE_VERSION) and systemd-boot's counter for
  this boot (the LoaderBootCountPath EFI variable: the entry's "+LEFT-DONE" suffix; blessed once
  systemd-bless-boot renamed the file without it).
- `UpdateRecord` and `settle(...)`: what the agent wrote down before rebooting into a new version,
  and, after the reboot, what became of it: OK (running it, blessed), ROLLED_BACK (back on the old
  version: its tries ran out; that version is never tried again), or still unknown.

The installer itself is node/install.py (fetch, check, `systemd-sysupdate update VERSION`),
driven by node/updatepart.py; `installer_missing()` says why a PC cannot run it (today's
one-root stick with systemd 252, or a stick built without a release key).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, replace
from datetime import tzinfo
from enum import StrEnum
from pathlib import Path
from zoneinfo import ZoneInfo

from garage_node.core.fsutil import write_private
from garage_node.core.wire import UpdateOutcome, UpdateStatus
from garage_node.node.config import UpdateSection
from garage_node.node.schedule import Schedule, system_timezone

# systemd-boot's vendor GUID: LoaderBootCountPath-<guid> in efivarfs.
LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
BOOT_COUNT_VAR = f"LoaderBootCountPath-{LOADER_GUID}"
_COUNTER = re.compile(r"\+(\d+)(?:-(\d+))?(?:\.[^./\\]+)?\Z")
SYSUPDATE = ("/usr/lib/systemd/systemd-sysupdate", "/lib/systemd/systemd-sysupdate")
# Where sysupdate reads transfer definitions: the image ships them in /usr/lib (the owner's
# /etc would override them).
SYSUPDATE_D = (Path("/etc/sysupdate.d"), Path("/usr/lib/sysupdate.d"))
RELEASE_KEYS = Path("/usr/share/garage-node/release-keys.gpg")  # build-image.sh --signing-key puts it there
ROOT_LABEL = "garage-root_"  # the root partitions' GPT labels: garage-root_<version>; a free one is "_empty"


class Action(StrEnum):
    NONE = "none"
    WAIT = "wait"
    DRAIN = "drain"
    INSTALL = "install"


@dataclass(frozen=True)
class Decision:
    action: Action
    why: str = ""  # for WAIT and DRAIN: a sentence for the owner and the head


@dataclass(frozen=True)
class Policy:
    """[update] of garage.toml (node/config.py UpdateSection), as decide() reads it."""

    when: str = "window"
    windows: tuple[str, ...] = ("daily 03:00-06:00",)
    tz: tzinfo | None = None


@dataclass(frozen=True)
class BootFacts:
    os_version: str | None  # IMAGE_VERSION of the booted OS; None: not an image with versions
    blessed: bool | None  # None: not known (no EFI, no boot counting)
    tries_left: int | None  # for an unblessed counted boot
    ab: bool  # an A/B stick: systemd-sysupdate and its transfer definitions are there


def decide(target: str | None, boot: BootFacts, policy: Policy, now: float, *, serving: bool, idle: bool,
           refused: frozenset[str] = frozenset(), approved: str | None = None) -> Decision:
    """May this PC update to `target` now? `serving`: the PC serves now (its hours, not
    drained); `idle`: its engine has no request running (drained or nothing to serve)."""
    if target is None or target == boot.os_version:
        return Decision(Action.NONE)
    if target in refused:
        return Decision(Action.WAIT, f"{target} was tried and came back on {boot.os_version or 'the old version'} "
                                     "after its tries ran out: it is not tried again")
    if not boot.ab:
        return Decision(Action.WAIT, "this stick cannot update itself (one root, no systemd-sysupdate): flash an A/B "
                                     "stick to take updates")
    if boot.blessed is not True:
        left = f" ({boot.tries_left} tries left)" if boot.tries_left is not None else ""
        return Decision(Action.WAIT, f"the current boot is not confirmed good yet{left}: an update now could "
                                     "overwrite the only version known to boot")
    if policy.when == "never":
        return Decision(Action.WAIT, 'the owner allows no updates ([update] when = "never")')
    if policy.when == "ask" and approved != target:
        return Decision(Action.WAIT, f"waiting for the owner to approve {target} (`garage-node update approve {target}`)")
    if policy.when == "window":
        s = Schedule(policy.windows, policy.tz).at(now)
        if not s.serving:  # "serving" is the schedule's word for "inside a window"
            until = f" (next from {s.until_text()})" if s.until is not None else ""
            return Decision(Action.WAIT, f"outside the update window {', '.join(policy.windows)}{until}")
    if policy.when == "idle" and serving:
        return Decision(Action.WAIT, 'serving now: this PC updates only when it is not serving ([update] when = "idle")')
    if not idle:
        return Decision(Action.DRAIN, f"draining before the update to {target}")
    return Decision(Action.INSTALL)


# -- the boot


def parse_counter(entry_path: str) -> tuple[int, int] | None:
    """(tries left, tries done) from a boot entry's name with systemd-boot's counter, e.g.
    "\\EFI\\Linux\\garage_2026.12.1+2-1.efi" -> (2, 1); None without a counter."""
    name = entry_path.replace("\\", "/").rsplit("/", 1)[-1]
    m = _COUNTER.search(name)
    if m is None:
        return None
    return int(m[1]), int(m[2] or 0)


def read_efi_string(path: Path) -> str | None:
    """An efivarfs variable holding a UTF-16LE string (4 bytes of attributes first)."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    return raw[4:].decode("utf-16-le", "replace").rstrip("\0") or None


OS_RELEASE = Path("/etc/os-release")


def os_release_value(name: str, os_release: Path = OS_RELEASE) -> str | None:
    """One key of os-release: IMAGE_VERSION (the stick's version, mkosi's ImageVersion=),
    VARIANT_ID (its variant, which a release must match). None where it is not set."""
    try:
        text = os_release.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == name:
            return value.strip().strip('"').strip("'") or None
    return None


def boot_facts(os_release: Path = Path("/etc/os-release"), efivars: Path = Path("/sys/firmware/efi/efivars"),
               esp: Path | tuple[Path, ...] = (Path("/efi"), Path("/boot")), sysupdate_d: Path | tuple[Path, ...] = SYSUPDATE_D,
               sysupdate: tuple[str, ...] = SYSUPDATE) -> BootFacts:
    """The booted version and its boot counter. A counted boot is blessed once systemd-bless-boot
    renamed its entry (the counted file is gone from the ESP); a boot without a counter is
    blessed (or never counted). Without EFI variables, nothing is known."""
    version = os_release_value("IMAGE_VERSION", os_release)
    ab = any(os.access(p, os.X_OK) for p in sysupdate) and _has_transfers(sysupdate_d)
    if not efivars.is_dir():
        return BootFacts(version, None, None, ab)
    entry = read_efi_string(efivars / BOOT_COUNT_VAR)
    if entry is None:
        return BootFacts(version, True, None, ab)
    counter = parse_counter(entry)
    if counter is None:
        return BootFacts(version, True, None, ab)
    # The ESP is where systemd's gpt-auto generator mounted it: /efi when /boot is taken.
    rel = entry.replace("\\", "/").lstrip("/")
    still_counted = any((d / rel).exists() for d in ((esp,) if isinstance(esp, Path) else esp))
    return BootFacts(version, not still_counted, counter[0] if still_counted else None, ab)


def _has_transfers(dirs: Path | tuple[Path, ...]) -> bool:
    return any(d.is_dir() and any(d.glob("*.conf")) for d in ((dirs,) if isinstance(dirs, Path) else dirs))


def installer_missing(sysupdate: tuple[str, ...] = SYSUPDATE, sysupdate_d: tuple[Path, ...] = SYSUPDATE_D,
                      keys: Path = RELEASE_KEYS) -> str | None:
    """Why this PC cannot install an update (None: it can): an A/B stick has systemd-sysupdate,
    the image's transfer definitions and the operator's release key."""
    if not any(shutil.which(p) or os.access(p, os.X_OK) for p in sysupdate):
        return ("systemd-sysupdate is not on this stick (Debian 12's systemd 252 has none; the A/B stick brings 254 "
                "from bookworm-backports)")
    if not _has_transfers(sysupdate_d):
        return "this stick has one root and no sysupdate.d transfers: flash an A/B stick to take updates"
    if not keys.is_file():
        return (f"this stick carries no release key ({keys}): it cannot check a release; flash a stick built with "
                "`build-image.sh --signing-key`")
    return None


def other_slot_version(booted: str | None, sys_block: Path = Path("/sys/class/block")) -> str | None:
    """The version in the other root slot of the booted stick, from the GPT labels the kernel
    read (sysfs uevent PARTNAME): garage-root_<version> beside the booted one on the same disk.
    None: the slot is empty ("_empty"), or this is no A/B stick."""
    if booted is None or not sys_block.is_dir():
        return None
    by_disk: dict[str, list[str]] = {}
    booted_disk = None
    for part in sorted(sys_block.iterdir()):
        name = _partname(part / "uevent")
        if name is None or not name.startswith(ROOT_LABEL):
            continue
        disk = part.resolve().parent.name  # /sys/devices/.../block/sdb/sdb3 -> sdb
        version = name[len(ROOT_LABEL):]
        by_disk.setdefault(disk, []).append(version)
        if version == booted:
            booted_disk = disk
    others = sorted(v for v in by_disk.get(booted_disk or "", []) if v != booted)
    return others[-1] if others else None


def _partname(uevent: Path) -> str | None:
    try:
        text = uevent.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("PARTNAME="):
            return line[len("PARTNAME="):]
    return None


# -- the outcome


@dataclass(frozen=True)
class UpdateRecord:
    """Kept in the state directory across the reboot into a new version (update.json)."""

    last_version: str | None = None
    last_outcome: UpdateOutcome | None = None
    last_why: str | None = None
    last_at: float | None = None
    refused: tuple[str, ...] = field(default=())  # versions that rolled back: never tried again
    rejected: tuple[str, ...] = field(default=())  # versions whose release was refused (signature, sums, variant)
    boot_id: str | None = None  # the boot that installed `last_version` (the kernel's random boot id)

    def started(self, version: str, now: float, boot_id: str | None = None) -> UpdateRecord:
        """Written (and synced) before the reboot into `version`. A version refused earlier (its
        files then, or a rollback) is forgiven: only the owner's `update install` gets this far
        with one, and a copy that passed every check now is judged by this boot, not the last."""
        return replace(self, last_version=version, last_outcome=UpdateOutcome.INSTALLING, last_why=None, last_at=now,
                       boot_id=boot_id, refused=tuple(v for v in self.refused if v != version),
                       rejected=tuple(v for v in self.rejected if v != version))

    def failed(self, version: str, why: str, now: float, *, final: bool = False) -> UpdateRecord:
        """Not installed; `final`: the release itself was refused, and that version is not
        tried again (a new build gets a new version)."""
        rejected = tuple(sorted({*self.rejected, version})) if final else self.rejected
        return replace(self, last_version=version, last_outcome=UpdateOutcome.FAILED, last_why=why[:512], last_at=now,
                       rejected=rejected)


def settle(record: UpdateRecord, boot: BootFacts, now: float, boot_id: str | None = None) -> UpdateRecord:
    """After a boot: what became of an update that was `installing`. Running the new version and
    blessed: OK. Running another version (systemd-boot fell back after the new one's tries ran
    out): ROLLED_BACK, and the version is refused for good. Running it but not yet blessed: still
    installing (its health gate has not passed yet). Still the boot that installed it (the agent
    restarted before the reboot): nothing is known yet."""
    v = record.last_version
    if record.last_outcome != UpdateOutcome.INSTALLING or v is None or boot.os_version is None:
        return record
    if record.boot_id is not None and record.boot_id == boot_id:
        return record
    if boot.os_version == v:
        if boot.blessed:
            return replace(record, last_outcome=UpdateOutcome.OK, last_why=None, last_at=now)
        return record
    why = f"{v} did not pass its health check within its tries: back on {boot.os_version}"
    return replace(record, last_outcome=UpdateOutcome.ROLLED_BACK, last_why=why, last_at=now,
                   refused=tuple(sorted({*record.refused, v})))


def load_record(path: Path) -> UpdateRecord:
    try:
        d = json.loads(path.read_text())
        outcome = d.get("last_outcome")
        return UpdateRecord(d.get("last_version"), UpdateOutcome(outcome) if outcome else None, d.get("last_why"),
                            d.get("last_at"), tuple(d.get("refused", ())), tuple(d.get("rejected", ())),
                            d.get("boot_id"))
    except (OSError, ValueError, TypeError, AttributeError):
        return UpdateRecord()


def save_record(path: Path, record: UpdateRecord) -> None:
    d = asdict(record)
    d["refused"] = list(record.refused)
    d["rejected"] = list(record.rejected)
    write_private(path, (json.dumps(d) + "\n").encode(), mode=0o644)


BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def current_boot_id(path: Path = BOOT_ID) -> str | None:
    """The kernel's id of this boot: a new one after every reboot."""
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


APPROVAL = "update-approved"


def approve(state_dir: Path, version: str) -> None:
    """The owner's yes to `version` ([update] when = "ask"); one version at a time."""
    state_dir.mkdir(parents=True, exist_ok=True)
    write_private(state_dir / APPROVAL, (version + "\n").encode(), mode=0o644)


def approved(state_dir: Path) -> str | None:
    try:
        return (state_dir / APPROVAL).read_text().strip() or None
    except OSError:
        return None


def status(boot: BootFacts, record: UpdateRecord, policy: Policy, target: str | None, decision: Decision,
           variant: str | None, other_version: str | None) -> UpdateStatus:
    """The `update` part of the status document and of the heartbeat's report."""
    return UpdateStatus(os_version=boot.os_version, variant=variant, other_version=other_version, blessed=boot.blessed,
                        tries_left=boot.tries_left, policy=policy.when, target=target,
                        pending_why=(decision.why or None) if decision.action in (Action.WAIT, Action.DRAIN) else None,
                        last_version=record.last_version, last_outcome=record.last_outcome,
                        last_why=record.last_why, last_at=record.last_at)


def policy_of(section: UpdateSection, serving_tz: str = "") -> Policy:
    """The Policy of garage.toml's [update]; its zone: [update] timezone, else the serving hours'
    ([schedule] timezone), else the PC's own."""
    name = section.timezone or serving_tz
    return Policy(section.when, section.windows, ZoneInfo(name) if name else system_timezone())
