"""The USB image joins a head by itself, twice: boot, enroll, WireGuard, Ray worker; power
off, boot again, and rejoin with the same node id although the single-use token is spent.

The head runs in a network namespace of the testbed, and QEMU runs inside that same namespace
with user-mode networking, so the guest reaches the head at 10.0.2.2 (the namespace's
loopback) and nothing else: the namespace has no route out of this machine.
The image is the one test_image.py builds; the join token is written into its FAT partition
with mtools, as a person would edit garage.toml after flashing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from testing.region import Testbed, missing_prerequisite, sh, wait_for

from test_image import image  # noqa: F401  (the built image, reused)

REPO = Path(__file__).resolve().parents[2]
JOIN_TIMEOUT = int(os.environ.get("GARAGE_IMAGE_JOIN_TIMEOUT", "1200"))

pytestmark = [pytest.mark.image,
              pytest.mark.skipif(bool(missing_prerequisite()), reason=str(missing_prerequisite()))]


def fat_offset(disk: Path) -> int:
    table = json.loads(sh(["sfdisk", "-J", str(disk)]).stdout)["partitiontable"]
    part = next(p for p in table["partitions"] if p.get("name") == "GARAGE")
    return part["start"] * table.get("sectorsize", 512)


def write_garage_toml(disk: Path, text: str, workdir: Path) -> None:
    src = workdir / "garage.toml"
    src.write_text(text)
    sh(["mcopy", "-o", "-i", f"{disk}@@{fat_offset(disk)}", str(src), "::garage.toml"])
    src.unlink()


class VM:
    def __init__(self, disk: Path, netns: str, workdir: Path) -> None:
        self.disk, self.netns, self.workdir = disk, netns, workdir
        self.runner: subprocess.Popen | None = None
        self.boots = 0

    def boot(self) -> Path:
        self.boots += 1
        log = self.workdir / f"serial-{self.boots}.log"
        self.pidfile = self.workdir / "qemu.pid"
        self.pidfile.unlink(missing_ok=True)
        self.runner = subprocess.Popen(
            [str(REPO / "image/qemu-run.sh"), str(self.disk), "--netns", self.netns, "--serial-log", str(log),
             "--pidfile", str(self.pidfile), "--mem", "4096", "--timeout", str(JOIN_TIMEOUT + 300)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        return log

    def power_off(self) -> None:
        """Pull the plug: QEMU quits at once, as a PC whose owner switches it off."""
        if self.runner is None:
            return
        try:
            qpid = int(self.pidfile.read_text().strip())
            if Path(f"/proc/{qpid}/comm").read_text().startswith("qemu-system"):
                os.kill(qpid, signal.SIGTERM)
        except (OSError, ValueError):
            pass
        try:
            self.runner.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.runner.pid, signal.SIGKILL)
            self.runner.wait(timeout=10)
        self.runner = None


@pytest.fixture(scope="module")
def joined_region(image, tmp_path_factory):  # noqa: F811
    work = tmp_path_factory.mktemp("image-join")
    tb = Testbed()
    tb.setup()
    vm = None
    try:
        head = tb.start_head(advertise_host="10.0.2.2")  # the head as the guest sees it
        token = head.token("--uses", "1")
        disk = work / "stick.img"
        sh(["cp", "--sparse=always", str(image), str(disk)])
        write_garage_toml(disk, f'[node]\njoin_token = "{token}"\nname = "vm-pc"\n', work)
        vm = VM(disk, head.ns, work)
        yield head, vm, token
    finally:
        if vm:
            vm.power_off()
        tb.cleanup()


def wait_joined(head, timeout: float) -> dict:
    """The VM enrolled, its heartbeats arrive over HTTPS, and the head's Ray lists its Ray
    worker alive (the head probes Ray's GCS for the node's own labels)."""
    found: dict = {}

    def joined() -> bool:
        rows = [r for r in head.nodes() if r["name"] == "vm-pc"]
        if rows and rows[0]["status"] == "online" and rows[0]["ray_alive"]:
            found.update(rows[0])
            return True
        return False
    wait_for(joined, timeout, "the VM enrolled, heartbeating and its Ray worker alive at the head", interval=5)
    return found


def handshake_age(head) -> float:
    out = sh(["nsenter", "-t", str(head.proc.pid), "-m", "-n", "wg", "show", "gn-hub", "latest-handshakes"]).stdout
    stamps = [int(line.split()[1]) for line in out.splitlines() if line.strip()]
    return time.time() - max(stamps) if stamps and max(stamps) else float("inf")


def test_image_boots_enrolls_and_joins_the_overlay(joined_region):
    head, vm, token = joined_region
    t0 = time.monotonic()
    log = vm.boot()
    row = wait_joined(head, JOIN_TIMEOUT)
    print(f"boot to joined (enrolled, heartbeating, Ray worker alive): {time.monotonic() - t0:.0f} s")
    assert row["status"] == "online" and row["overlay_ip"] == "100.96.0.2" and row["ray_alive"]
    assert handshake_age(head) < 180
    text = log.read_text(errors="replace")
    assert "Type=notify" in text  # the marker's `systemctl show` of garage-node.service
    assert "WatchdogUSec=1min" in text and "garage-node.service: Watchdog timeout" not in text
    assert token not in text  # never on the console or in the journal copy
    joined_region_state["node_id"] = row["node_id"]


joined_region_state: dict = {}


def test_image_rejoins_after_power_off_with_spent_token(joined_region):
    head, vm, token = joined_region
    node_id = joined_region_state.get("node_id")
    if node_id is None:
        pytest.skip("the first boot did not join")
    vm.power_off()
    wait_for(lambda: head.nodes()[0]["status"] == "offline", 120, "the head to notice the VM is gone", interval=5)
    t0 = time.monotonic()
    vm.boot()
    row = wait_joined(head, JOIN_TIMEOUT)
    print(f"reboot to joined again (Ray worker alive): {time.monotonic() - t0:.0f} s")
    assert row["node_id"] == node_id and row["overlay_ip"] == "100.96.0.2" and row["ray_alive"]
    assert len(head.nodes()) == 1  # the same node, not a second enrollment
    assert handshake_age(head) < 180
