"""GPU inventory through NVML, against a fake libnvidia-ml.so.1 loaded by the real pynvml.

pynvml loads its library once per process, so every scenario runs read_inventory() in a child
process with its own LD_LIBRARY_PATH and config, and the child prints the result as JSON.
"""

from __future__ import annotations

import ctypes.util
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The package need not be installed to run these tests (children get PYTHONPATH too).
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from testing.nvml_double import (  # noqa: E402
    RTX_3060_12GB,
    RTX_4060,
    RTX_4060_TI_16GB,
    RTX_4090,
    build_fake_nvml,
    env_for,
    write_config,
)

# Prints the inventory and pynvml's init refcount, which is 0 again only if nvmlShutdown ran.
CHILD = """
import dataclasses, json, os, pathlib, pynvml
from garage_node.node import gpu
from garage_node.node.gpu import read_inventory
if "TEST_SYS_PCI_DEVICES" in os.environ:  # a fake /sys/bus/pci/devices
    gpu.SYS_PCI_DEVICES = pathlib.Path(os.environ["TEST_SYS_PCI_DEVICES"])
inv = read_inventory()
print(json.dumps({"inventory": dataclasses.asdict(inv), "healthy": len(inv.healthy_gpus),
                  "vram_mib": inv.vram_mib, "refcount": pynvml._nvmlLib_refcount}))
"""


def real_nvml_present() -> bool:
    return shutil.which("nvidia-smi") is not None or ctypes.util.find_library("nvidia-ml") is not None


@pytest.fixture(scope="module")
def fake_lib(tmp_path_factory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: cannot build the fake libnvidia-ml.so.1")
    return build_fake_nvml(tmp_path_factory.mktemp("fake-nvml"))


def inventory_in_child(extra_env: dict[str, str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra_env}
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["refcount"] == 0, "nvmlShutdown was not called after reading"
    return result


def scenario(fake_lib: Path, tmp_path: Path, gpus) -> dict:
    config = write_config(tmp_path / "gpus.conf", gpus)
    return inventory_in_child(env_for(fake_lib, config))


def test_4090_and_4060_node(fake_lib, tmp_path):
    result = scenario(fake_lib, tmp_path, [RTX_4090, RTX_4060])
    inv = result["inventory"]
    assert inv["nvml_error"] is None
    assert inv["driver_version"] == "550.54.14"
    assert inv["cuda_version"] == "12.4"
    big, small = inv["gpus"]
    assert big == {
        "index": 0, "name": "NVIDIA GeForce RTX 4090", "uuid": RTX_4090.uuid,
        "memory_total_mib": 24564, "memory_free_mib": 23900, "compute_capability": "8.9",
        "temperature_c": 41, "power_w": 28.5, "utilization_pct": 0, "healthy": True, "error": None,
        # No power limits in this fake card's line: NOT_SUPPORTED, read as unknown.
        "power_limit_w": None, "quarantined": False, "hot": False,
    }
    assert (small["name"], small["memory_total_mib"], small["memory_free_mib"]) == (
        "NVIDIA GeForce RTX 4060", 8188, 7800)
    assert (small["power_w"], small["utilization_pct"], small["healthy"]) == (12.0, 3, True)
    assert result["vram_mib"] == 24564 + 8188


def test_lost_gpu_is_unhealthy_and_others_still_report(fake_lib, tmp_path):
    lost = dataclasses.replace(RTX_4060, fail=True)
    result = scenario(fake_lib, tmp_path, [RTX_4090, lost])
    inv = result["inventory"]
    assert inv["nvml_error"] is None
    big, bad = inv["gpus"]
    assert big["healthy"] is True and big["memory_total_mib"] == 24564 and big["error"] is None
    assert bad["index"] == 1 and bad["healthy"] is False
    assert "GPU 1" in bad["error"] and "GPU is lost" in bad["error"]
    assert "NVML_ERROR_GPU_IS_LOST" in bad["error"]
    # An unhealthy GPU's memory must not be offered to the scheduler.
    assert result["healthy"] == 1 and result["vram_mib"] == 24564


def test_unsupported_readings_are_none_not_unhealthy(fake_lib, tmp_path):
    quiet = dataclasses.replace(RTX_3060_12GB, temp=None, power_w=None, util=None)
    (gpu,) = scenario(fake_lib, tmp_path, [quiet])["inventory"]["gpus"]
    assert gpu["healthy"] is True and gpu["error"] is None
    assert (gpu["temperature_c"], gpu["power_w"], gpu["utilization_pct"]) == (None, None, None)
    assert (gpu["compute_capability"], gpu["memory_total_mib"]) == ("8.6", 12288)


def test_16gb_card(fake_lib, tmp_path):
    result = scenario(fake_lib, tmp_path, [RTX_4060_TI_16GB])
    (gpu,) = result["inventory"]["gpus"]
    assert (gpu["name"], gpu["compute_capability"]) == ("NVIDIA GeForce RTX 4060 Ti", "8.9")
    assert result["vram_mib"] == 16380


def fake_pci(root: Path, devices: dict[str, tuple[str, str]]) -> Path:
    """A /sys/bus/pci/devices with {address: (vendor, class)}."""
    for addr, (vendor, klass) in devices.items():
        (root / addr).mkdir(parents=True)
        (root / addr / "vendor").write_text(vendor + "\n")
        (root / addr / "class").write_text(klass + "\n")
    return root


def test_driver_not_loaded(fake_lib, tmp_path):
    # An NVIDIA GPU on the bus, but the driver does not run: say so.
    pci = fake_pci(tmp_path / "pci", {"0000:01:00.0": ("0x10de", "0x030000"), "0000:00:1f.3": ("0x8086", "0x040300")})
    result = inventory_in_child({**env_for(fake_lib, tmp_path / "missing.conf"), "TEST_SYS_PCI_DEVICES": str(pci)})
    inv = result["inventory"]
    assert inv["gpus"] == [] and result["vram_mib"] == 0
    assert "not running" in inv["nvml_error"] and "CPU node" in inv["nvml_error"]


def test_driver_installed_but_no_nvidia_gpu(fake_lib, tmp_path):
    # The nvidia stick on a PC (or in QEMU) without an NVIDIA card: nothing is wrong.
    pci = fake_pci(tmp_path / "pci", {"0000:00:02.0": ("0x1234", "0x030000"), "0000:01:00.0": ("0x10de", "0x040300")})
    result = inventory_in_child({**env_for(fake_lib, tmp_path / "missing.conf"), "TEST_SYS_PCI_DEVICES": str(pci)})
    assert result["inventory"]["nvml_error"] == "NVIDIA driver installed, no NVIDIA GPU found: this node joins as a CPU node"


def test_pci_bus_ids_and_driver_versions(fake_lib, tmp_path):
    gpus = [dataclasses.replace(RTX_4090, bus_id="00000000:0A:00.0"), RTX_4060]
    config = write_config(tmp_path / "gpus.conf", gpus, driver=("535.261.03", "12.2"))
    inv = inventory_in_child(env_for(fake_lib, config))["inventory"]
    assert (inv["driver_version"], inv["cuda_version"]) == ("535.261.03", "12.2")
    # As /proc/driver/nvidia/gpus names them; the second GPU sits on the fake's default bus 2.
    assert [list(x) for x in inv["pci_bus_ids"]] == [[0, "0000:0a:00.0"], [1, "0000:02:00.0"]]


def test_zero_gpus(fake_lib, tmp_path):
    inv = scenario(fake_lib, tmp_path, [])["inventory"]
    assert inv["gpus"] == []
    assert inv["driver_version"] == "550.54.14"
    assert "no GPU" in inv["nvml_error"] and "CPU node" in inv["nvml_error"]


@pytest.mark.skipif(real_nvml_present(), reason="the real libnvidia-ml.so.1 would be found")
def test_no_library_at_all(tmp_path):
    inv = inventory_in_child({"LD_LIBRARY_PATH": str(tmp_path)})["inventory"]
    assert inv["gpus"] == []
    assert inv["nvml_error"] == ("NVIDIA driver not found (libnvidia-ml.so.1 could not be loaded): "
                                 "this node joins as a CPU node")


@pytest.mark.gpu
@pytest.mark.skipif(not real_nvml_present(), reason="no NVIDIA driver (nvidia-smi / libnvidia-ml)")
def test_real_gpu():
    inv = inventory_in_child({})["inventory"]
    assert inv["nvml_error"] is None, inv["nvml_error"]
    assert inv["gpus"], "NVML started but listed no GPU"
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", inv["driver_version"])
    assert re.fullmatch(r"\d+\.\d+", inv["cuda_version"])
    for gpu in inv["gpus"]:
        assert gpu["healthy"], gpu["error"]
        assert gpu["uuid"].startswith(("GPU-", "MIG-"))
        assert 0 <= gpu["memory_free_mib"] <= gpu["memory_total_mib"] and gpu["memory_total_mib"] > 0
        assert re.fullmatch(r"\d+\.\d+", gpu["compute_capability"])
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True)
        assert [g["uuid"] for g in inv["gpus"]] == smi.stdout.split()
