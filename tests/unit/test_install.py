"""The A/B stick's installer (node/install.py) and its job in the agent (node/updatepart.py),
on real parts: the head's control API in-process with a real release store (releases signed by
throwaway gpg keys, testing/releases.py), the real gpg on the PC's side, and the host's real
systemd-sysupdate 254 with the image's own transfer definitions
(image/mkosi.extra/usr/lib/sysupdate.d) writing into a GPT disk image on a loop device.

The disk is the stick's layout cut small: root A (garage-root_1, an ext4 holding os-release
and the data directory's update/ path), root B (`_empty`), and the boot partition. This
container's kernel has no vfat, so the boot partition is an XBOOTLDR (ext4) rather than the
ESP: the transfer's PathRelativeTo=boot finds either. systemd-sysupdate --image= refuses a
disk one of whose partitions is mounted, so the test's sysupdate command unmounts root A
first and mounts it back after (the installer writes into it, as into the stick's data
partition)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from garage_node.core import modelfiles
from garage_node.core import releasefiles as rf
from garage_node.core.wire import UpdateOutcome
from garage_node.head.api import releases as releases_api
from garage_node.head.releases import ReleaseStore
from garage_node.node import update as up
from garage_node.node.install import InstallError, Installer, root_name, uki_name
from garage_node.node.updatepart import UpdatePart
from garage_node.node.weights import HttpSource
from testing.headapi import EnrolledPc, enrolled_pc
from testing.releases import SigningKey, make_release, write_sums

REPO = Path(__file__).resolve().parents[2]
DEFINITIONS = REPO / "image" / "mkosi.extra" / "usr" / "lib" / "sysupdate.d"
SYSUPDATE = "/usr/lib/systemd/systemd-sysupdate"
DATA = "var/lib/garage-node-data/update"
ROOT_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"  # root-x86-64
XBOOTLDR_TYPE = "BC13C2FF-59E6-4262-A352-B275FD6F7172"
RESERVE = 1024 * 1024  # the loop disk's data path is a 16 MiB file system: 1 MiB kept free, not the stick's 256


@pytest.fixture
def head(tmp_path, keys) -> tuple[EnrolledPc, ReleaseStore]:
    store = ReleaseStore(tmp_path / "head" / "releases")
    store.trust_key(keys[0].public)
    pc = enrolled_pc(tmp_path)
    pc.client.app.include_router(releases_api.router(pc.registry, store))  # type: ignore[attr-defined]
    return pc, store


def source(pc: EnrolledPc) -> HttpSource:
    """The PC's side of the head's API, with its credential (as node/weights.py head_source)."""
    auth = {"Authorization": f"Bearer {pc.enrollment['credential']}", modelfiles.NODE_HEADER: pc.node_id}
    return HttpSource(pc.client, "http://testserver", lambda: auth)


def publish(store: ReleaseStore, tmp_path: Path, version: str, key: SigningKey, **kw) -> Path:
    src = make_release(tmp_path / f"release-{version}-{uuid.uuid4().hex[:6]}", version, key, **kw)
    store.add(src)
    return store.versions_dir / version


def recorder(tmp_path: Path) -> tuple[list[str], Path]:
    """A stand-in for systemd-sysupdate that records its arguments (the tests of what is refused
    never get that far; the real one runs in the loop-disk tests)."""
    log = tmp_path / "sysupdate-calls"
    script = tmp_path / "sysupdate-stand-in"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\nls "$(dirname "$0")/incoming" >> {log}\n')
    os.chmod(script, 0o755)
    return [str(script)], log


def installer(tmp_path: Path, pc: EnrolledPc, key: Path, *, variant: str = "base", src=None,
              sysupdate: list[str] | None = None) -> Installer:
    return Installer(src or source(pc), variant, keyring=key, download_dir=tmp_path / "download",
                     incoming_dir=tmp_path / "incoming", sysupdate=sysupdate or recorder(tmp_path)[0])


def nothing_written(tmp_path: Path) -> bool:
    incoming = tmp_path / "incoming"
    return (not incoming.exists() or not list(incoming.iterdir())) and not (tmp_path / "sysupdate-calls").exists()


# -- what is refused


def test_a_tampered_root_at_the_head_is_refused_and_nothing_written(tmp_path, head, keys):
    pc, store = head
    stored = publish(store, tmp_path, "2.0", keys[0])
    root = stored / root_name("2.0")
    data = bytearray(root.read_bytes())
    data[5000] ^= 0x01  # one bit, same size: the head's disk, or someone on it
    root.write_bytes(bytes(data))
    with pytest.raises(InstallError, match="root.raw from the head does not match its sum.*nothing was installed") as e:
        installer(tmp_path, pc, keys[0].public).fetch("2.0")
    assert e.value.retry is False and nothing_written(tmp_path)
    assert not (tmp_path / "download" / "2.0" / root_name("2.0")).exists()


def test_a_tampered_sha256sums_or_a_strangers_signature_is_refused(tmp_path, head, keys):
    pc, store = head
    stored = publish(store, tmp_path, "2.1", keys[0])
    # SHA256SUMS rewritten to match a changed root; the signature is the operator's old one.
    (stored / root_name("2.1")).write_bytes(b"an attacker's root")
    os.remove(stored / rf.SUMS)
    shutil.copyfile(write_sums(_scratch_copy(stored, tmp_path)), stored / rf.SUMS)
    with pytest.raises(InstallError, match="does not match SHA256SUMS: the release was changed after it was signed"):
        installer(tmp_path, pc, keys[0].public).fetch("2.1")
    assert nothing_written(tmp_path)
    # Signed by a key the stick does not carry (the head trusted it: the stick is the last word).
    store.trust_key(keys[1].public)
    publish(store, tmp_path, "2.2", keys[1])
    with pytest.raises(InstallError, match="signed by a key this stick does not carry"):
        installer(tmp_path, pc, keys[0].public).fetch("2.2")
    # A stick built without a key checks nothing, so installs nothing.
    with pytest.raises(InstallError, match="carries no release key"):
        installer(tmp_path, pc, tmp_path / "no-such-keyring.gpg").fetch("2.2")
    assert nothing_written(tmp_path)


def _scratch_copy(stored: Path, tmp_path: Path) -> Path:
    d = tmp_path / "scratch"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    for p in stored.iterdir():
        if p.name not in (rf.SUMS, rf.SIGNATURE, ".stored.json"):
            shutil.copyfile(p, d / p.name)
    return d


def test_a_release_of_the_other_variant_or_version_is_refused(tmp_path, head, keys):
    pc, store = head
    publish(store, tmp_path, "2.3", keys[0])  # make_release builds "base"
    with pytest.raises(InstallError, match="is for the base stick, and this stick is nvidia.*nothing was installed"):
        installer(tmp_path, pc, keys[0].public, variant="nvidia").fetch("2.3")
    assert nothing_written(tmp_path)


def test_the_head_unreachable_or_without_the_release_is_retried_later(tmp_path, head, keys):
    pc, _ = head
    with pytest.raises(InstallError, match="answered 404 for SHA256SUMS of release 9.9") as e:
        installer(tmp_path, pc, keys[0].public).fetch("9.9")
    assert e.value.retry is True
    down = HttpSource(httpx.Client(transport=httpx.HTTPTransport(uds=str(tmp_path / "no-head.sock"))),
                      "http://head", lambda: {})
    with pytest.raises(InstallError, match="the head is unreachable") as e:
        installer(tmp_path, pc, keys[0].public, src=down).fetch("2.4")
    assert e.value.retry is True and nothing_written(tmp_path)


# -- what is installed


class Cut:
    """The head's connection breaking in the middle of the root, once: the download resumes
    with a range request (a test double at the network, over the real API)."""

    def __init__(self, real: HttpSource, after: int) -> None:
        self.real, self.after, self.ranges = real, after, []  # type: ignore[var-annotated]
        self.cut = False

    @contextlib.contextmanager
    def get(self, path, headers):
        with self.real.get(path, headers) as resp:
            if path.endswith(".root.raw") and "bytes=0-0" != headers.get("Range"):
                self.ranges.append(headers.get("Range"))
                if not self.cut:
                    self.cut = True
                    whole = resp.iter_bytes

                    def broken(chunk_size=None):
                        n = 0
                        for c in whole(4096):
                            if n >= self.after:
                                raise httpx.ReadError("connection reset by the test")
                            n += len(c)
                            yield c
                    resp.iter_bytes = broken  # type: ignore[method-assign]
            yield resp


def test_a_broken_download_resumes_and_the_checked_files_go_to_sysupdate(tmp_path, head, keys):
    pc, store = head
    stored = publish(store, tmp_path, "2.5", keys[0], root_bytes=os.urandom(300_000))
    cut = Cut(source(pc), after=100_000)
    cmd, calls = recorder(tmp_path)
    inst = installer(tmp_path, pc, keys[0].public, src=cut, sysupdate=cmd)
    percents: list[int] = []
    v = inst.fetch("2.5", percents.append)
    assert cut.ranges[0] is None and cut.ranges[1].startswith("bytes=") and int(cut.ranges[1][6:-1]) >= 100_000
    assert v.root.read_bytes() == (stored / root_name("2.5")).read_bytes() and percents[-1] == 100
    assert v.signer == keys[0].fingerprint
    assert nothing_written(tmp_path)  # checked, not yet handed over
    inst.install(v)
    # sysupdate got the version, and saw exactly the two files under the names its transfers match.
    assert calls.read_text().split() == ["update", "2.5", uki_name("2.5"), root_name("2.5")]
    # Then the space is given back to the data partition.
    assert not list((tmp_path / "incoming").iterdir()) and not (tmp_path / "download" / "2.5").exists()


def test_an_install_cut_short_by_a_power_cut_is_reclaimed_not_downloaded_again(tmp_path, head, keys):
    """The power goes while sysupdate writes: the checked files are still in the incoming
    directory. The next try takes them back (hashed again, not downloaded again) and clears
    anything else there, instead of finding the data partition full (seen in QEMU)."""
    pc, store = head
    stored = publish(store, tmp_path, "2.7", keys[0], root_bytes=os.urandom(300_000))
    v = installer(tmp_path, pc, keys[0].public).fetch("2.7")
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for f in (v.root, v.uki):  # as install() leaves them when the power goes during sysupdate
        os.replace(f, incoming / f.name)
    (incoming / "garage-node_2.6.root.raw").write_bytes(b"x" * 1000)  # an older try's leftover
    counted = Cut(source(pc), after=10**9)
    again = installer(tmp_path, pc, keys[0].public, src=counted).fetch("2.7")
    assert counted.ranges == []  # the root was not fetched again
    assert again.root.read_bytes() == (stored / root_name("2.7")).read_bytes()
    assert not list(incoming.iterdir())


def test_a_failed_sysupdate_keeps_the_download_for_the_next_try(tmp_path, head, keys):
    pc, store = head
    publish(store, tmp_path, "2.6", keys[0])
    inst = installer(tmp_path, pc, keys[0].public, sysupdate=["sh", "-c", "echo 'No space left' >&2; exit 1", "sh"])
    v = inst.fetch("2.6")
    with pytest.raises(InstallError, match=r"systemd-sysupdate failed \(No space left\)") as e:
        inst.install(v)
    assert e.value.retry and v.root.is_file() and v.uki.is_file() and not list((tmp_path / "incoming").iterdir())


# -- the real systemd-sysupdate on a loop-device disk


class LoopDisk:
    """root A garage-root_1 / root B _empty / XBOOTLDR, on a loop device; cleaned by name."""

    def __init__(self, tmp_path: Path) -> None:
        self.image = tmp_path / "stick.img"
        self.mnt = tmp_path / "root-a"
        self.boot_mnt = tmp_path / "boot"
        self.dev: str | None = None

    def make(self) -> LoopDisk:
        subprocess.run(["truncate", "-s", "80M", str(self.image)], check=True)
        table = (f"label: gpt\nsize=16MiB, type={ROOT_TYPE}, name=garage-root_1\n"
                 f"size=16MiB, type={ROOT_TYPE}, name=_empty\nsize=24MiB, type={XBOOTLDR_TYPE}, name=xbootldr\n")
        subprocess.run(["sfdisk", "-q", str(self.image)], input=table.encode(), check=True)
        self.dev = subprocess.run(["losetup", "-P", "--show", "-f", str(self.image)], capture_output=True,
                                  check=True, text=True).stdout.strip()
        subprocess.run(["partx", "-a", self.dev], capture_output=True, check=False)  # no udev here
        deadline = time.monotonic() + 10
        while not Path(self.part(3)).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        root = self.image.parent / "root-tree"
        (root / "usr/lib").mkdir(parents=True)
        (root / "etc").mkdir()
        (root / DATA).mkdir(parents=True)
        release = "ID=debian\nVERSION_ID=12\nIMAGE_ID=garage-node\nIMAGE_VERSION=1\n"
        (root / "usr/lib/os-release").write_text(release)
        (root / "etc/os-release").write_text(release)
        boot = self.image.parent / "boot-tree"
        (boot / "EFI/Linux").mkdir(parents=True)
        (boot / "EFI/Linux/garage-node_1.efi").write_bytes(b"MZ version 1")  # v1's UKI, no counter: blessed
        subprocess.run(["mkfs.ext4", "-q", "-d", str(root), self.part(1)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-d", str(boot), self.part(3)], check=True)
        self.mnt.mkdir()
        self.boot_mnt.mkdir()
        subprocess.run(["mount", self.part(1), str(self.mnt)], check=True)
        return self

    def part(self, n: int) -> str:
        assert self.dev is not None
        return f"{self.dev}p{n}"

    def sysupdate(self) -> list[str]:
        """The installer's sysupdate command: the real one on this disk, root A unmounted meanwhile."""
        script = self.image.parent / "sysupdate-on-disk"
        script.write_text(f"#!/bin/sh\numount {self.mnt} || exit 90\n"
                          f"{SYSUPDATE} --no-pager --image={self.dev} --definitions={DEFINITIONS} \"$@\"\n"
                          f"rc=$?\nmount {self.part(1)} {self.mnt} || exit 91\nexit $rc\n")
        os.chmod(script, 0o755)
        return [str(script)]

    def labels(self) -> list[str]:
        out = subprocess.run(["sfdisk", "--json", str(self.image)], capture_output=True, check=True, text=True).stdout
        return [p.get("name", "") for p in json.loads(out)["partitiontable"]["partitions"]]

    def boot_files(self) -> dict[str, bytes]:
        subprocess.run(["mount", "-o", "ro", self.part(3), str(self.boot_mnt)], check=True)
        try:
            return {p.name: p.read_bytes() for p in (self.boot_mnt / "EFI/Linux").iterdir()}
        finally:
            subprocess.run(["umount", str(self.boot_mnt)], check=False)

    def slot_b(self, n: int) -> bytes:
        with open(self.part(2), "rb") as f:
            return f.read(n)

    def close(self) -> None:
        for m in (self.boot_mnt, self.mnt):
            if m.exists() and os.path.ismount(m):
                subprocess.run(["umount", str(m)], check=False)
        if self.dev is not None:
            subprocess.run(["losetup", "-d", self.dev], capture_output=True, check=False)


@pytest.fixture
def disk(tmp_path) -> Iterator[LoopDisk]:
    if os.geteuid() != 0 or not os.access(SYSUPDATE, os.X_OK) or shutil.which("losetup") is None:
        pytest.skip("needs root, losetup and systemd-sysupdate 254 (bookworm-backports)")
    if not list(DEFINITIONS.glob("*.conf")):
        pytest.skip(f"no transfer definitions in {DEFINITIONS} yet")
    d = LoopDisk(tmp_path)
    try:
        yield d.make()
    finally:
        d.close()


def test_the_agent_installs_a_release_with_the_real_sysupdate_and_reboots(tmp_path, head, keys, disk):
    """The whole PC side: the update part, allowed and idle, downloads from the head, checks,
    hands the files to systemd-sysupdate, which writes slot B and the UKI with 3 tries; the
    record says `installing`, then the reboot. After it, a blessed boot of 2.7 settles to OK."""
    pc, store = head
    payload = os.urandom(2 * 1024 * 1024)
    stored = publish(store, tmp_path, "2.7", keys[0], root_bytes=payload)
    rebooted = threading.Event()
    boot, boot_id = [up.BootFacts("1", True, None, True)], ["boot-1"]
    state = tmp_path / "state"
    part = UpdatePart(state, up.Policy("idle"), time.time, read_boot=lambda: boot[0], variant="base",
                      installer=lambda: None, reboot=rebooted.set, other_version=lambda v: None,
                      boot_id=lambda: boot_id[0],
                      make_installer=lambda: Installer(source(pc), "base", keyring=keys[0].public,
                                                       download_dir=disk.mnt / DATA / "download",
                                                       incoming_dir=disk.mnt / DATA / "incoming",
                                                       sysupdate=disk.sysupdate(), reserve=RESERVE))
    assert part.step("2.7", serving=False, idle=True).action == up.Action.INSTALL
    deadline = time.monotonic() + 60
    while not rebooted.is_set() and time.monotonic() < deadline:
        part.step("2.7", serving=False, idle=True)  # the agent's passes: INSTALL once checked
        job = part.job
        assert job is not None and job.error is None, job.error if job else None
        time.sleep(0.2)
    assert rebooted.is_set()
    record = up.load_record(state / "update.json")
    assert (record.last_version, record.last_outcome) == ("2.7", UpdateOutcome.INSTALLING)
    assert disk.labels() == ["garage-root_1", "garage-root_2.7", "xbootldr"]
    assert disk.slot_b(len(payload)) == payload
    assert disk.boot_files() == {"garage-node_1.efi": b"MZ version 1",
                                 "garage-node_2.7+3-0.efi": (stored / uki_name("2.7")).read_bytes()}
    assert not list((disk.mnt / DATA / "incoming").iterdir())  # the space is the data's again
    # The next boot runs 2.7 and its gate passed: OK.
    boot[0], boot_id[0] = up.BootFacts("2.7", True, None, True), "boot-2"
    part.step("2.7", serving=False, idle=True)
    assert up.load_record(state / "update.json").last_outcome == UpdateOutcome.OK


def test_a_tampered_release_leaves_the_disk_untouched(tmp_path, head, keys, disk):
    pc, store = head
    stored = publish(store, tmp_path, "2.8", keys[0])
    (stored / uki_name("2.8")).write_bytes(b"MZ not what was signed")
    inst = Installer(source(pc), "base", keyring=keys[0].public, download_dir=disk.mnt / DATA / "download",
                     incoming_dir=disk.mnt / DATA / "incoming", sysupdate=disk.sysupdate(), reserve=RESERVE)
    with pytest.raises(InstallError, match="efi from the head does not match its sum"):
        inst.fetch("2.8")
    assert disk.labels() == ["garage-root_1", "_empty", "xbootldr"]
    assert disk.boot_files() == {"garage-node_1.efi": b"MZ version 1"}
    assert not (disk.mnt / DATA / "incoming").exists() or not list((disk.mnt / DATA / "incoming").iterdir())


# -- the job in the agent: refused once, not again


def test_a_refused_release_is_reported_and_never_retried(tmp_path, head, keys):
    pc, store = head
    stored = publish(store, tmp_path, "3.0", keys[0])
    (stored / root_name("3.0")).write_bytes(b"tampered")
    made: list[Installer] = []

    def make() -> Installer:
        made.append(installer(tmp_path, pc, keys[0].public))
        return made[-1]

    part = UpdatePart(tmp_path / "state", up.Policy("idle"), time.time,
                      read_boot=lambda: up.BootFacts("1", True, None, True), variant="base", installer=lambda: None,
                      make_installer=make, reboot=lambda: pytest.fail("rebooted"), other_version=lambda v: None)
    part.step("3.0", serving=False, idle=True)
    job = part.job
    assert job is not None
    job.thread.join(30)
    d = part.step("3.0", serving=False, idle=True)
    assert d.action == up.Action.WAIT and "3.0 is not installed: " in d.why and "does not match its sum" in d.why
    s = part.status()
    assert s is not None and s.last_outcome == UpdateOutcome.FAILED and s.last_version == "3.0"
    assert "does not match" in (s.last_why or "")
    for _ in range(3):  # later passes, and a restarted agent, do not fetch it again
        assert part.step("3.0", serving=False, idle=True).action == up.Action.WAIT
    again = UpdatePart(tmp_path / "state", up.Policy("idle"), time.time,
                       read_boot=lambda: up.BootFacts("1", True, None, True), variant="base", installer=lambda: None,
                       make_installer=make, other_version=lambda v: None)
    d = again.step("3.0", serving=False, idle=True)
    assert d.action == up.Action.WAIT and "the operator must publish a new build" in d.why
    assert len(made) == 1 and nothing_written(tmp_path)


def test_a_failure_that_may_pass_is_retried_after_a_pause(tmp_path, head, keys):
    pc, _ = head
    now = [1000.0]
    made: list[Installer] = []

    def make() -> Installer:
        made.append(installer(tmp_path, pc, keys[0].public))
        return made[-1]

    part = UpdatePart(tmp_path / "state", up.Policy("idle"), lambda: now[0],
                      read_boot=lambda: up.BootFacts("1", True, None, True), variant="base", installer=lambda: None,
                      make_installer=make, other_version=lambda v: None)
    part.step("4.0", serving=False, idle=True)  # the head holds no 4.0 (yet)
    assert part.job is not None
    part.job.thread.join(30)
    d = part.step("4.0", serving=False, idle=True)
    assert d.action == up.Action.WAIT and "answered 404" in d.why and "trying again in 300 s" in d.why
    now[0] += 100
    assert "trying 4.0 again in 200 s" in part.step("4.0", serving=False, idle=True).why and len(made) == 1
    now[0] += 200
    part.step("4.0", serving=False, idle=True)
    assert len(made) == 2  # tried again after the pause


def test_a_reboot_that_fails_is_not_taken_for_a_rollback(tmp_path, head, keys):
    """sysupdate wrote the slot but `systemctl reboot` failed: the record is not left saying
    `installing` (the next pass would read the old version as a rollback); the failure is
    reported and retried after a pause."""
    pc, store = head
    publish(store, tmp_path, "5.0", keys[0])

    def reboot() -> None:
        raise InstallError("the new version is installed but `systemctl reboot` failed (test)", retry=True)

    boot = up.BootFacts("1", True, None, True)
    part = UpdatePart(tmp_path / "state", up.Policy("idle"), time.time, read_boot=lambda: boot, variant="base",
                      installer=lambda: None, make_installer=lambda: installer(tmp_path, pc, keys[0].public),
                      reboot=reboot, other_version=lambda v: None)
    part.step("5.0", serving=False, idle=True)
    deadline = time.monotonic() + 30
    while (job := part.job) is not None and not job.done and time.monotonic() < deadline:
        part.step("5.0", serving=False, idle=True)
        time.sleep(0.1)
    d = part.step("5.0", serving=False, idle=True)
    assert d.action == up.Action.WAIT and "systemctl reboot` failed" in d.why and "trying again in" in d.why
    record = up.load_record(tmp_path / "state" / "update.json")
    assert record.last_outcome == UpdateOutcome.FAILED and record.refused == () and record.rejected == ()


# -- from a release directory on the PC (`garage-node update install VERSION --from DIR`)


def test_a_release_directory_installs_through_the_same_checks(tmp_path, keys, disk):
    """build-image.sh's release directory, served to the installer as the head serves it
    (ranges included), into the real sysupdate; a tampered one is refused the same way."""
    src = make_release(tmp_path / "release", "6.0", keys[0], root_bytes=os.urandom(1024 * 1024))
    inst = Installer(dir_source_of(src), "base", keyring=keys[0].public, download_dir=disk.mnt / DATA / "download",
                     incoming_dir=disk.mnt / DATA / "incoming", sysupdate=disk.sysupdate(), reserve=RESERVE)
    inst.install(inst.fetch("6.0"))
    assert disk.labels() == ["garage-root_1", "garage-root_6.0", "xbootldr"]
    assert disk.slot_b(1024 * 1024) == (src / root_name("6.0")).read_bytes()
    bad = make_release(tmp_path / "bad", "6.1", keys[0])
    (bad / rf.MANIFEST).write_text((bad / rf.MANIFEST).read_text().replace('"base"', '"nvidia"'))
    with pytest.raises(InstallError, match="release.json does not match its sum in the signed SHA256SUMS"):
        Installer(dir_source_of(bad), "base", keyring=keys[0].public, download_dir=disk.mnt / DATA / "download",
                  incoming_dir=disk.mnt / DATA / "incoming", sysupdate=disk.sysupdate(), reserve=RESERVE).fetch("6.1")
    assert disk.labels() == ["garage-root_1", "garage-root_6.0", "xbootldr"]


def dir_source_of(d: Path) -> HttpSource:
    from garage_node.node.install import dir_source

    return dir_source(d)


def test_the_release_directory_answers_ranges_as_the_head_does(tmp_path, keys):
    src = make_release(tmp_path / "release", "6.2", keys[0])
    s = dir_source_of(src)
    root = (src / root_name("6.2")).read_bytes()
    with s.get("/v1/releases/6.2/" + root_name("6.2"), {"Range": "bytes=1000-"}) as r:
        r.read()
        assert r.status_code == 206 and r.content == root[1000:]
        assert r.headers["content-range"] == f"bytes 1000-{len(root) - 1}/{len(root)}"
    for path in ("/v1/releases/6.2/../keys", "/v1/releases/6.2/missing.efi", "/v1/other/6.2/SHA256SUMS"):
        with s.get(path, {}) as r:
            r.read()
            assert r.status_code == 404, path


def test_the_update_install_command(tmp_path, keys, monkeypatch, capsys):
    import functools

    from garage_node.cli import main
    from garage_node.node import install as inst

    cmd, calls = recorder(tmp_path)
    monkeypatch.setattr(inst, "Installer", functools.partial(
        Installer, keyring=keys[0].public, download_dir=tmp_path / "download", incoming_dir=tmp_path / "incoming",
        sysupdate=cmd))
    rebooted: list[bool] = []
    monkeypatch.setattr(inst, "reboot", lambda: rebooted.append(True))
    # This PC as an A/B stick of the base variant, on a blessed boot.
    monkeypatch.setattr(up, "installer_missing", lambda: None)
    monkeypatch.setattr(up, "boot_facts", lambda: up.BootFacts("1", True, None, True))
    monkeypatch.setattr(up, "os_release_value", lambda key: "base")
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\nstate_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"\n')
    base = ["update", "install", "--config", str(cfg), "--override", str(tmp_path / "none.toml")]

    bad = make_release(tmp_path / "bad", "7.1", keys[1])  # the stranger's signature
    assert main([*base, "7.1", "--from", str(bad)]) == 1
    assert "refused: SHA256SUMS is signed by a key this stick does not carry" in capsys.readouterr().err
    record = up.load_record(tmp_path / "state" / "update.json")
    assert record.last_outcome == UpdateOutcome.FAILED and record.rejected == ("7.1",) and nothing_written(tmp_path)

    good = make_release(tmp_path / "good", "7.0", keys[0])
    assert main([*base, "7.0", "--from", str(good)]) == 0
    assert "7.0 is installed in the other slot with 3 tries; rebooting into it" in capsys.readouterr().out
    assert rebooted == [True] and calls.read_text().split()[:2] == ["update", "7.0"]
    record = up.load_record(tmp_path / "state" / "update.json")
    assert (record.last_version, record.last_outcome) == ("7.0", UpdateOutcome.INSTALLING)
    assert record.rejected == ("7.1",)
    # The owner installs a good copy of the refused version by hand: it is refused no longer.
    good_again = make_release(tmp_path / "good-again", "7.1", keys[0])
    assert main([*base, "7.1", "--from", str(good_again), "--no-reboot"]) == 0
    assert "it starts at the next reboot" in capsys.readouterr().out
    record = up.load_record(tmp_path / "state" / "update.json")
    assert (record.last_version, record.last_outcome, record.rejected) == ("7.1", UpdateOutcome.INSTALLING, ())
    # Not joined, and no directory given: nothing to fetch from.
    assert main([*base, "7.2"]) == 2 and "has not joined a region" in capsys.readouterr().err


def test_a_release_that_does_not_fit_the_data_partition_is_not_downloaded(tmp_path, head, keys, disk):
    """The loop disk's data path is on a 16 MiB file system: a 20 MiB root cannot come."""
    pc, store = head
    publish(store, tmp_path, "8.0", keys[0], root_bytes=os.urandom(20 * 1024 * 1024))
    inst = Installer(source(pc), "base", keyring=keys[0].public, download_dir=disk.mnt / DATA / "download",
                     incoming_dir=disk.mnt / DATA / "incoming", sysupdate=disk.sysupdate(), reserve=RESERVE)
    with pytest.raises(InstallError, match=r"needs \d+ MiB on the data partition but \d+ MiB are free") as e:
        inst.fetch("8.0")
    assert e.value.retry and not list((disk.mnt / DATA / "download" / "8.0").glob("*.root.raw*"))


def test_a_version_that_is_no_release_version_is_refused(tmp_path, head, keys):
    pc, _ = head
    with pytest.raises(InstallError, match=r"the head named '2026_1' is not a release version") as e:
        installer(tmp_path, pc, keys[0].public).fetch("2026_1")
    assert not e.value.retry and not (tmp_path / "download").exists()


def test_the_sticks_binary_keyring_and_an_armored_key_both_verify(tmp_path, keys):
    """The stick carries `gpg --export` output (binary); gpgv reads it as it is. An armored key
    is dearmored first. Neither needs a gpg-agent (the stick's image had none at first)."""
    from garage_node.node.install import verify_signature

    src = make_release(tmp_path / "r", "9.0", keys[0])
    binary = tmp_path / "release-keys.gpg"
    env = {**os.environ, "GNUPGHOME": str(keys[0].home)}
    binary.write_bytes(subprocess.run(["gpg", "--batch", "--export", keys[0].fingerprint], env=env,
                                      capture_output=True, check=True).stdout)
    assert not binary.read_bytes().startswith(b"-----")
    for keyring in (binary, keys[0].public):
        assert verify_signature(keyring, src / rf.SUMS, src / rf.SIGNATURE) == keys[0].fingerprint
    with pytest.raises(InstallError, match="holds no usable OpenPGP public key"):
        bad = tmp_path / "junk.asc"
        bad.write_text("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nnot a key\n-----END PGP PUBLIC KEY BLOCK-----\n")
        verify_signature(bad, src / rf.SUMS, src / rf.SIGNATURE)
