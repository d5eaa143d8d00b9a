"""The nvidia variant of the USB image on a PC without an NVIDIA GPU (QEMU): it builds beside
the base variant (the apt package cache is shared; its OS tree, with the DKMS-built 535
module, is cached per variant), boots without a failed unit, says the driver is installed but
no GPU was found, and joins a head as a CPU node, Ray worker included.

One boot, beside a head, as tests/image/test_image_join.py does it (QEMU inside the head's
network namespace; the join token written into the GARAGE partition with mtools).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from testing.image import JOIN_TIMEOUT, VM, build_image, handshake_age, parse_boot_log, wait_joined, write_garage_toml
from testing.region import Testbed, missing_prerequisite, sh, wait_for
NO_GPU = "NVIDIA driver installed, no NVIDIA GPU found"

pytestmark = [pytest.mark.image,
              pytest.mark.skipif(bool(missing_prerequisite()), reason=str(missing_prerequisite()))]


@pytest.fixture(scope="module")
def nvidia_image() -> Path:
    img, _ = build_image("nvidia", '[node]\nname = "vm-pc"\n', "garage-nvidia.toml")
    return img


@pytest.fixture(scope="module")
def booted_nvidia(nvidia_image, tmp_path_factory):
    work = tmp_path_factory.mktemp("image-nvidia")
    tb = Testbed()
    tb.setup()
    vm = None
    try:
        head = tb.start_head(advertise_host="10.0.2.2")
        token = head.token("--uses", "1")
        disk = work / "stick.img"
        sh(["cp", "--sparse=always", str(nvidia_image), str(disk)])
        write_garage_toml(disk, f'[node]\njoin_token = "{token}"\nname = "vm-pc"\n', work)
        vm = VM(disk, head.ns, work)
        t0 = time.monotonic()
        log = vm.boot()
        row = wait_joined(head, JOIN_TIMEOUT)
        joined_s = time.monotonic() - t0
        # The boot marker's summary (failed units, `garage-node status`) follows multi-user.
        wait_for(lambda: "GARAGE-NODE-END" in log.read_text(errors="replace"), 600,
                 "the boot marker's summary on the serial console", interval=5)
        text = log.read_text(errors="replace")
        print(f"nvidia variant, no GPU: QEMU start -> joined {joined_s:.0f} s")
        for line in text.splitlines():
            if "GARAGE-NODE-" in line and "garage-boot-marker[" not in line or "garage-nvidia" in line:
                print(line.strip())
        yield {"row": row, "log": text, "info": parse_boot_log(text), "head": head, "token": token}
    finally:
        if vm:
            vm.power_off()
        tb.cleanup()


def test_nvidia_variant_joins_as_a_cpu_node(booted_nvidia):
    row = booted_nvidia["row"]
    assert row["status"] == "online" and row["ray_alive"]
    assert row["gpus"] == []
    assert handshake_age(booted_nvidia["head"]) < 180
    assert booted_nvidia["token"] not in booted_nvidia["log"]


def test_agent_says_driver_installed_but_no_gpu(booted_nvidia):
    status = "\n".join(booted_nvidia["info"]["status"])
    assert NO_GPU in status, status


def test_nvidia_unit_says_no_gpu_and_no_unit_failed(booted_nvidia):
    log = booted_nvidia["log"]
    # garage-nvidia.service ran (its line reaches the serial log through the journal copy).
    assert re.search(r"garage-nvidia[^\n]*" + re.escape(NO_GPU), log), "garage-nvidia.service said nothing"
    # Debian's /etc/modules-load.d/nvidia.conf is gone: systemd-modules-load no longer fails.
    assert booted_nvidia["info"]["failed_units"] == "none", booted_nvidia["info"]["failed_units"]
