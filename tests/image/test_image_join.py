"""The USB image joins a head by itself, twice: boot, enroll, WireGuard, Ray worker; power
off, boot again, and rejoin with the same node id although the single-use token is spent.

The head runs in a network namespace of the testbed, and QEMU runs inside that same namespace
with user-mode networking, so the guest reaches the head at 10.0.2.2 (the namespace's
loopback) and nothing else: the namespace has no route out of this machine.
The image is the one test_image.py boots (built by tests/image/conftest.py); the join token
is written into its FAT partition with mtools, as a person would edit garage.toml after flashing.
"""

from __future__ import annotations

import time

import pytest

from testing.image import JOIN_TIMEOUT, VM, handshake_age, wait_joined, write_garage_toml
from testing.region import Testbed, missing_prerequisite, sh, wait_for

pytestmark = [pytest.mark.image,
              pytest.mark.skipif(bool(missing_prerequisite()), reason=str(missing_prerequisite()))]


@pytest.fixture(scope="module")
def joined_region(image, tmp_path_factory):  # `image`: tests/image/conftest.py
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
