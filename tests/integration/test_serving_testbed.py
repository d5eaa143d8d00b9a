"""Power, heat and per-GPU faults on the real parts: a head and one PC in network namespaces
(real wireguard-go, Ray, head and agent), the PC's GPUs from the NVML double, which the test
changes while the agent runs (NodeHost.set_gpus rewrites the double's file; the real pynvml
reads it through the double).

The PC's engine is on and set to run on its GPUs, but no Docker answers it here (its socket
path leads nowhere): what is checked is the agent's decision, the engine held off for heat, in
status and at the head, and that it stops holding it off once the GPU cools. The engine
serving and draining for real is test_engine.py's job; the drain itself is the same code.
"""

from __future__ import annotations

import dataclasses
import signal

import pytest

from testing.nvml_double import RTX_4060, RTX_4090, power_limits_set
from testing.region import Testbed, missing_prerequisite, wait_for

pytestmark = [pytest.mark.testbed, pytest.mark.skipif(bool(missing_prerequisite()), reason=str(missing_prerequisite()))]

CARD0 = dataclasses.replace(RTX_4090, power_limits=(150, 450, 450), temp=45)
CARD1 = dataclasses.replace(RTX_4060, power_limits=(100, 115, 115), temp=40)


@pytest.fixture(scope="module")
def region(testbed: Testbed) -> Testbed:
    tb = testbed
    head = tb.start_head()
    pc = tb.add_node("pc", [CARD0, CARD1])
    engine = (f'enabled = true\ndevice = "gpu"\ngpu_access = "nvidia-toolkit"\n'
              f'docker_socket = "{pc.dir / "no-docker.sock"}"\ncache_dir = "{pc.dir / "models"}"\n')
    pc.configure(head.token("--uses", "1"), engine=engine,
                 extra="[gpu]\npower_limit_w = 300\nmax_temp_c = 85\nrefresh_s = 1\n")
    pc.start()
    return tb


def head_row(tb, name="pc"):
    return next(n for n in tb.head.nodes() if n["name"] == name)


def test_power_limit_is_applied_clamped_and_shown(region):
    pc = region.hosts[1]
    s = pc.wait_state("joined", 120)
    assert [g["power_limit_w"] for g in s["gpus"]] == [300.0, 115.0]
    assert s["serving"]["power_limit_w"] == 300
    assert "300 W is outside this card's 100-115 W: set 115 W" in s["serving"]["power_note"]
    # The driver (the double's file) holds the 4090's new limit; the 4060 was already at 115 W.
    assert power_limits_set(pc.dir / "gpus.conf") == {0: 300.0}
    assert "limit 300 W" in pc.run(pc.cmd("status")).stdout


def test_hot_gpu_pauses_the_engine_until_it_cools(region):
    pc = region.hosts[1]
    node_id = pc.wait_state("joined", 120)["node_id"]
    wait_for(lambda: ray_gpus(region, node_id) == 2, 120, "the Ray head to list the worker with 2 GPUs")
    pc.set_gpus([dataclasses.replace(CARD0, temp=95), CARD1])
    s = pc.wait_state("paused", 60)
    assert s["message"] == "GPU 0 reached 95 °C, above max_temp_c 85 °C: engine paused until it cools below 75 °C"
    assert s["gpus"][0]["hot"] and s["gpus"][0]["temperature_c"] == 95
    assert s["engine"]["state"] == "drained" and s["engine"]["message"].startswith("paused: GPU 0 reached 95 °C")
    # Still in the region, in Ray too, but offering Ray no GPU while the owner's card cools.
    wait_for(lambda: ray_gpus(region, node_id) == 0, 120, "the Ray head to list the paused worker with no GPU")
    text = pc.run(pc.cmd("status")).stdout
    assert "paused: GPU 0 reached 95 °C" in text and "TOO HOT" in text

    wait_for(lambda: head_row(region)["node_state"] == "paused", 60, "the head to see the pause")
    row = head_row(region)
    assert row["paused"].startswith("GPU 0 reached 95 °C") and row["gpus"][0]["hot"]
    table = region.head.cli("head", "nodes", "--config", str(region.head.config)).stdout
    assert "paused: GPU 0 reached 95 °C" in table and "(hot 95°C)" in table

    pc.set_gpus([dataclasses.replace(CARD0, temp=80), CARD1])  # under the limit, not under 75
    s = pc.wait_state("paused", 60, lambda s: s["gpus"][0]["temperature_c"] == 80)
    assert s["engine"]["state"] == "drained" and s["message"].startswith("GPU 0 reached 95 °C")

    pc.set_gpus([dataclasses.replace(CARD0, temp=60), CARD1])
    s = pc.wait_state("joined", 60)
    assert not s["gpus"][0]["hot"]
    # No longer held: the engine goes back to starting it (here Docker does not answer).
    wait_for(lambda: pc.status()["engine"]["state"] != "drained", 30, "the engine to be started again")
    wait_for(lambda: ray_gpus(region, node_id) == 2, 120, "the Ray head to list the worker's 2 GPUs again")


def ray_gpus(tb, node_id) -> float | None:
    """GPUs the Ray head lists for this node's live worker (None: no live worker listed)."""
    alive = [n for n in tb.head.ray_nodes() if n["alive"] and n["labels"].get("garage.node_id") == node_id]
    return alive[0]["resources"].get("GPU", 0) if alive else None


def test_lost_gpu_and_xid_are_quarantined_and_the_node_stays_up(region):
    pc = region.hosts[1]
    node_id = pc.wait_state("joined", 120)["node_id"]
    pc.set_gpus([CARD0, dataclasses.replace(CARD1, fail=True)])  # fallen off the bus
    # The state line is the last pass's; the GPU list is read as status asks: wait for both.
    s = pc.wait_state("joined", 90, lambda s: "GPU 1 quarantined" in s["message"])
    assert s["gpus"][1]["quarantined"] and "GPU is lost" in s["gpus"][1]["error"]
    assert "(1 GPU; GPU 1 quarantined)" in s["message"]
    # Ray's own view: the worker came back offering the one good GPU.
    wait_for(lambda: ray_gpus(region, node_id) == 1, 120, "the Ray head to list the worker with 1 GPU")
    # It answers again: still quarantined (until the agent restarts), no flapping.
    pc.set_gpus([CARD0, CARD1])
    s = pc.wait_state("joined", 30, lambda s: s["gpus"][1]["temperature_c"] == CARD1.temp)  # read again
    assert s["gpus"][1]["quarantined"] and not s["gpus"][1]["healthy"]

    pc.set_gpus([dataclasses.replace(CARD0, xid=79), CARD1])  # the driver reports Xid 79 on GPU 0
    s = pc.wait_state("joined", 90, lambda s: "GPU 0 quarantined" in s["message"])
    assert s["gpus"][0]["quarantined"] and "Xid 79 (GPU has fallen off the bus)" in s["gpus"][0]["error"]
    assert "(CPU only; GPU 0 quarantined; GPU 1 quarantined)" in s["message"]
    wait_for(lambda: ray_gpus(region, node_id) == 0, 120, "the Ray head to list the worker with no GPU")
    assert pc.proc is not None and pc.proc.poll() is None  # the agent never left
    wait_for(lambda: [g["quarantined"] for g in head_row(region)["gpus"]] == [True, True], 60,
             "the head to see both GPUs quarantined")


def test_power_limit_is_restored_when_the_agent_stops(region):
    pc = region.hosts[1]
    assert power_limits_set(pc.dir / "gpus.conf") == {0: 300.0}
    assert pc.stop(signal.SIGTERM) == 0
    assert power_limits_set(pc.dir / "gpus.conf") == {0: 450.0}  # the 4090's default again
