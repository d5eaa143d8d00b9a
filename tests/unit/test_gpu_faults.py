"""Power limits, changing temperatures and per-GPU faults through the real pynvml bindings and
the NVML test double (testing/fake_nvml.c), with garage_node.node.gpu's NvmlSession and the
GpuGuard's decisions on top.

pynvml loads its library once per process, so each scenario runs in a child process. The child
changes the fake's file while it runs (as a test would on a running agent): the fake reads it
again, so temperatures change, GPUs fall off the bus and Xid events arrive mid-run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from testing.nvml_double import RTX_4060, RTX_4090, build_fake_nvml, env_for, power_limits_set, write_config  # noqa: E402

# The child gets the scenario's steps as Python source with these names bound.
PRELUDE = """
import dataclasses, json, os, pathlib, sys
from garage_node.node.gpu import NvmlSession, read_inventory
from garage_node.node.gpuguard import GpuGuard
from testing.nvml_double import FakeGPU, RTX_4060, RTX_4090, write_config
CONFIG = pathlib.Path(os.environ["GARAGE_FAKE_NVML_CONFIG"])
out = {}
def gpus(inv):
    return [dataclasses.asdict(g) for g in inv.gpus]
"""

LIMITED_4090 = dataclasses.replace(RTX_4090, power_limits=(150, 450, 450))
LIMITED_4060 = dataclasses.replace(RTX_4060, power_limits=(100, 115, 115))


@pytest.fixture(scope="module")
def fake_lib(tmp_path_factory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: cannot build the fake libnvidia-ml.so.1")
    return build_fake_nvml(tmp_path_factory.mktemp("fake-nvml"))


def run_child(fake_lib: Path, config: Path, body: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), **env_for(fake_lib, config)}
    proc = subprocess.run([sys.executable, "-c", PRELUDE + body + "\nprint(json.dumps(out))"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.skipif(os.geteuid() != 0, reason="NVML (and its double) sets power limits for root only")
def test_power_limit_set_clamped_and_restored_at_exit(fake_lib, tmp_path):
    config = write_config(tmp_path / "gpus.conf", [LIMITED_4090, LIMITED_4060])
    out = run_child(fake_lib, config, """
s = NvmlSession()
out["set"] = [dataclasses.asdict(s.set_power_limit(i, 300)) for i in (0, 1)]
out["read"] = [g["power_limit_w"] for g in gpus(read_inventory())]
out["again"] = dataclasses.asdict(s.set_power_limit(0, 300))  # already set: nothing to change
s.close()
out["after_close"] = [g["power_limit_w"] for g in gpus(read_inventory())]
""")
    a, b = out["set"]
    assert a == {"index": 0, "applied_w": 300.0, "note": ""}
    # 300 W is above what the 4060 allows: clamped to its maximum, and said.
    assert b["applied_w"] == 115.0 and "outside this card's 100-115 W" in b["note"]
    assert out["read"] == [300.0, 115.0]
    assert out["again"]["applied_w"] == 300.0
    # Closing the session put the 4090's default back; the 4060 already ran at its maximum
    # (its default), so nothing was set on it and nothing had to be undone.
    assert out["after_close"] == [450.0, 115.0]
    assert power_limits_set(config) == {0: 450.0}


def test_power_limit_on_a_card_without_limits_is_a_note(fake_lib, tmp_path):
    config = write_config(tmp_path / "gpus.conf", [RTX_4090])  # no plimit: NOT_SUPPORTED
    out = run_child(fake_lib, config, """
s = NvmlSession()
out["set"] = dataclasses.asdict(s.set_power_limit(0, 300))
s.close()
""")
    assert out["set"]["applied_w"] is None
    assert "power limit not applied on GPU 0" in out["set"]["note"]
    assert "does not allow" in out["set"]["note"] or "needs root" in out["set"]["note"]
    assert power_limits_set(config) == {}


def test_temperature_changes_while_running_and_heat_has_hysteresis(fake_lib, tmp_path):
    config = write_config(tmp_path / "gpus.conf", [RTX_4090])
    out = run_child(fake_lib, config, """
guard = GpuGuard(max_temp_c=85, resume_below_c=75)
seen = []
for temp in (41, 90, 80, 74):
    write_config(CONFIG, [dataclasses.replace(RTX_4090, temp=temp)])
    g = guard.observe(read_inventory()).gpus[0]
    seen.append([g.temperature_c, g.hot, guard.heat_reason((0,))])
out["seen"] = seen
""")
    cool, hot, cooling, cooled = out["seen"]
    assert cool == [41, False, None]
    assert hot[:2] == [90, True] and "GPU 0 reached 90 °C, above max_temp_c 85 °C" in hot[2]
    assert "below 75 °C" in hot[2]
    # 80 °C is under the limit but not under the resume point: still paused.
    assert cooling[:2] == [80, True] and cooling[2] == hot[2]
    assert cooled == [74, False, None]


def test_lost_gpu_mid_run_is_quarantined_and_stays_out(fake_lib, tmp_path):
    config = write_config(tmp_path / "gpus.conf", [RTX_4090, RTX_4060])
    out = run_child(fake_lib, config, """
guard = GpuGuard()
out["before"] = [g["healthy"] for g in gpus(guard.observe(read_inventory()))]
write_config(CONFIG, [RTX_4090, dataclasses.replace(RTX_4060, fail=True)])
out["lost"] = gpus(guard.observe(read_inventory()))
write_config(CONFIG, [RTX_4090, RTX_4060])  # answers again: still out until the agent restarts
out["back"] = gpus(guard.observe(read_inventory()))
""")
    assert out["before"] == [True, True]
    good, lost = out["lost"]
    assert good["healthy"] and not good["quarantined"]
    assert not lost["healthy"] and lost["quarantined"]
    assert "GPU is lost" in lost["error"] and "NVML_ERROR_GPU_IS_LOST" in lost["error"]
    assert "restart the agent" in lost["error"]
    good, back = out["back"]
    assert good["healthy"] and back["quarantined"] and not back["healthy"]


def test_nvml_error_on_one_device_quarantines_only_that_gpu(fake_lib, tmp_path):
    config = write_config(tmp_path / "gpus.conf", [RTX_4090, dataclasses.replace(RTX_4060, fail=999)])
    out = run_child(fake_lib, config, """
inv = GpuGuard().observe(read_inventory())
out["gpus"] = gpus(inv)
out["healthy"] = len(inv.healthy_gpus)
""")
    good, bad = out["gpus"]
    assert good["healthy"] and good["memory_total_mib"] == RTX_4090.total_mib
    assert bad["quarantined"] and "Unknown Error" in bad["error"] and "NVML_ERROR_UNKNOWN" in bad["error"]
    assert out["healthy"] == 1


def test_xid_event_quarantines_its_gpu(fake_lib, tmp_path):
    config = write_config(tmp_path / "gpus.conf", [RTX_4090, RTX_4060])
    out = run_child(fake_lib, config, """
s = NvmlSession()
guard = GpuGuard()
s.watch([0, 1])
out["quiet"] = s.xids()
write_config(CONFIG, [RTX_4090, dataclasses.replace(RTX_4060, xid=13)])  # an application's fault
out["app"] = s.xids()
out["after_app"] = [g["quarantined"] for g in gpus(guard.observe(read_inventory(), out["app"]))]
write_config(CONFIG, [RTX_4090, dataclasses.replace(RTX_4060, xid=79)])  # fallen off the bus
out["bus"] = s.xids()
out["again"] = s.xids()  # delivered once
out["after_bus"] = gpus(guard.observe(read_inventory(), out["bus"]))
s.close()
""")
    assert out["quiet"] == []
    assert out["app"] == [[1, 13]]
    assert out["after_app"] == [False, False]  # Xid 13 is the program's bug, not the card's
    assert out["bus"] == [[1, 79]] and out["again"] == []
    good, bad = out["after_bus"]
    assert not good["quarantined"] and good["healthy"]
    assert bad["quarantined"] and not bad["healthy"] and "Xid 79 (GPU has fallen off the bus)" in bad["error"]


def real_nvml_present() -> bool:
    import ctypes.util

    return shutil.which("nvidia-smi") is not None or ctypes.util.find_library("nvidia-ml") is not None


@pytest.mark.gpu
@pytest.mark.skipif(not real_nvml_present(), reason="no NVIDIA driver (nvidia-smi / libnvidia-ml)")
def test_real_gpu_power_limits_and_xid_events():
    """On a real driver: the limit NVML enforces is read, "setting" it to itself changes nothing
    (so the card is left as it was), and Xid events can be registered and polled."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("GARAGE_FAKE_NVML_CONFIG", None)
    body = """
s = NvmlSession()
inv = read_inventory()
out["limits"] = [g.power_limit_w for g in inv.gpus]
out["same"] = [dataclasses.asdict(s.set_power_limit(g.index, int(g.power_limit_w))) for g in inv.gpus
               if g.power_limit_w is not None and g.power_limit_w == int(g.power_limit_w)]
s.watch([g.index for g in inv.gpus])
out["xids"] = s.xids()
out["note"] = s.note
s.close()
"""
    proc = subprocess.run([sys.executable, "-c", PRELUDE.replace(
        'CONFIG = pathlib.Path(os.environ["GARAGE_FAKE_NVML_CONFIG"])', "") + body + "\nprint(json.dumps(out))"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["limits"] and all(w is None or w > 0 for w in out["limits"])
    for result in out["same"]:
        # Within the card's range by definition: no clamp note; no set was needed.
        assert result["note"] == "" or "not applied" in result["note"], result
    assert out["xids"] == []  # registered just now, on healthy cards: nothing queued
    assert out["note"] is None or "Xid events unavailable" in out["note"]
