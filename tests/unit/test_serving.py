"""Serving hours, power and heat, per-GPU faults: the real Agent and EngineManager in-process,
with fakes at their edges (head, WireGuard, Ray child, Docker, the engine's probe, NVML's power
limits and Xid events) and a FakeClock the test moves. The NVML path itself is proven in
test_gpu_faults.py (the real pynvml over the NVML double) and in the testbed."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from zoneinfo import ZoneInfo

from garage_node.core.wire import EngineState, NodeState, encode
from garage_node.node.config import EngineSection, GpuSection, ScheduleSection
from garage_node.node.engine.metrics import Metrics
from garage_node.node.gpu import GPU
from garage_node.node.status import render
from testing import agentrig
from testing.agentrig import Rig

BERLIN = ZoneInfo("Europe/Berlin")
CPU_ENGINE = EngineSection(enabled=True, device="cpu", image="garage-node/vllm-cpu:test", model="tiny-llama-test",
                           drain_grace_s=60.0)
# The pinned GPU image on the GPUs the planner picks; the toolkit path needs no driver tree.
GPU_ENGINE = EngineSection(enabled=True, device="gpu", gpu_access="nvidia-toolkit", drain_grace_s=60.0)


def card(i: int, temp: int = 45, healthy: bool = True) -> GPU:
    return GPU(i, "NVIDIA GeForce RTX 4090", f"GPU-4090-{i}", 24564, 23900, "8.9", temp, 30.0, 0, healthy,
               None if healthy else f"NVML could not read GPU {i}: GPU is lost (NVML_ERROR_GPU_IS_LOST)")


def rig(tmp_path, *, gpus: list[GPU] | None = None, engine: EngineSection = CPU_ENGINE,
        schedule: ScheduleSection = ScheduleSection(), gpu: GpuSection = GpuSection(refresh_s=1.0),
        wall: datetime | None = None) -> Rig:
    """The agent rig with the engine's image at hand and each agent pass followed by an engine
    pass (the engine's thread, in step)."""
    return agentrig.rig(tmp_path, engine=dataclasses.replace(engine, cache_dir=tmp_path / "models"),
                        gpus=gpus if gpus is not None else [card(0)], schedule=schedule, gpu_cfg=gpu, wall=wall,
                        images=(engine.image,), engine_in_step=True)


NIGHTS = ScheduleSection(windows=("mon-fri 23:00-08:00", "sat-sun"), timezone="Europe/Berlin")


# ------------------------------------------------------------------ serving hours


def test_outside_serving_hours_the_engine_drains_and_the_node_stays_joined(tmp_path):
    # Tuesday 23:50 in Berlin: inside the night window.
    r = rig(tmp_path, schedule=NIGHTS, wall=datetime(2027, 3, 2, 23, 50, tzinfo=BERLIN))
    r.joined()
    r.probe.is_ready = True
    r.passes(2)
    s = r.status()
    assert s.state is NodeState.JOINED and s.engine.state is EngineState.HEALTHY and s.serving.serving
    r.probe.current = Metrics(running=1, waiting=0, generation_tokens_total=5.0)
    r.clock.advance(8 * 3600 + 600)  # Wednesday, just past 08:00
    r.passes(10)
    s = r.status()
    assert s.state is NodeState.PAUSED and s.message == "outside serving hours until Wed 23:00 CET"
    assert s.serving.serving is False and s.serving.paused == s.message
    assert datetime.fromtimestamp(s.serving.until, BERLIN).strftime("%a %H:%M") == "Wed 23:00"
    # Drained, not killed: a request was running, so the drain waited for it (grace period).
    assert s.engine.state is EngineState.DRAINED and s.engine.paused == s.message
    assert r.docker.containers == {} and r.docker.stops == ["garage-engine"]
    assert s.engine.draining is False  # the owner did not drain: the schedule did
    assert r.ray.running and s.ray.alive_at_head  # still part of the region
    # The head hears it: paused, why, and no new work for this engine.
    beat = r.head.heartbeats[-1]
    assert beat.state is NodeState.PAUSED and beat.serving.paused == s.message and beat.engine.draining is True
    text = render(s)
    assert "paused: outside serving hours until Wed 23:00 CET" in text and "PAUSED" in text
    # 23:00 comes: it serves again by itself.
    r.clock.wall = datetime(2027, 3, 3, 23, 0, tzinfo=BERLIN).timestamp()
    r.passes(2)
    assert "garage-engine" in r.docker.containers
    r.passes(6)
    s = r.status()
    assert s.state is NodeState.JOINED and s.engine.state is EngineState.HEALTHY and s.serving.serving


def test_the_owners_drain_wins_over_the_schedule(tmp_path):
    r = rig(tmp_path, schedule=NIGHTS, wall=datetime(2027, 3, 2, 23, 30, tzinfo=BERLIN))
    r.joined()
    r.probe.is_ready = True
    r.passes(2)
    assert r.status().engine.state is EngineState.HEALTHY
    r.agent.drain()
    r.passes(2)
    assert r.docker.containers == {} and r.status().engine.draining is True
    # The serving hours end and begin again: the owner's drain is untouched.
    r.clock.wall = datetime(2027, 3, 3, 12, 0, tzinfo=BERLIN).timestamp()
    r.passes(3)
    assert r.status().state is NodeState.PAUSED
    r.clock.wall = datetime(2027, 3, 3, 23, 30, tzinfo=BERLIN).timestamp()
    r.passes(5)
    s = r.status()
    assert r.docker.containers == {} and s.engine.state is EngineState.DRAINED and s.engine.draining is True
    assert "drained by the owner" in render(s)
    r.agent.resume()
    r.passes(2)
    assert "garage-engine" in r.docker.containers


# ------------------------------------------------------------------ heat


def test_hot_gpu_drains_its_engine_until_it_cools_below_the_hysteresis(tmp_path):
    r = rig(tmp_path, engine=GPU_ENGINE, gpu=GpuSection(max_temp_c=85, refresh_s=1.0))
    r.joined()
    assert "garage-engine" in r.docker.containers
    assert r.docker.bodies["garage-engine"]["HostConfig"]["DeviceRequests"][0]["DeviceIDs"] == ["0"]
    r.set_temp(0, 91)
    r.passes(2)
    s = r.status()
    assert s.state is NodeState.PAUSED
    assert s.message == "GPU 0 reached 91 °C, above max_temp_c 85 °C: engine paused until it cools below 75 °C"
    assert s.gpus[0].hot and s.engine.state is EngineState.DRAINED and r.docker.containers == {}
    assert "TOO HOT" in render(s)
    r.set_temp(0, 80)  # below the limit, above the resume point: stays off
    r.passes(5)
    s = r.status()
    assert s.state is NodeState.PAUSED and s.gpus[0].temperature_c == 80 and r.docker.containers == {}
    assert s.message.startswith("GPU 0 reached 91 °C")  # the same line while it cools: logged once
    r.set_temp(0, 74)
    r.passes(2)
    s = r.status()
    assert s.state is NodeState.JOINED and not s.gpus[0].hot and "garage-engine" in r.docker.containers


def test_hot_gpu_the_engine_does_not_use_leaves_it_serving(tmp_path):
    small = GPU(1, "NVIDIA GeForce RTX 4060", "GPU-4060-1", 8188, 7800, "8.9", 45, 12.0, 0)
    r = rig(tmp_path, gpus=[card(0), small], engine=GPU_ENGINE, gpu=GpuSection(max_temp_c=85, refresh_s=1.0))
    r.joined()
    assert r.docker.bodies["garage-engine"]["HostConfig"]["DeviceRequests"][0]["DeviceIDs"] == ["0"]
    r.set_temp(1, 95)
    r.passes(3)
    s = r.status()
    assert s.state is NodeState.JOINED and "GPU 1 too hot (reached 95 °C)" in s.message
    assert s.gpus[1].hot and "garage-engine" in r.docker.containers and r.docker.stops == []


# ------------------------------------------------------------------ faults


def test_xid_quarantines_a_gpu_and_the_engine_is_replanned_on_the_other(tmp_path):
    r = rig(tmp_path, gpus=[card(0), card(1)], engine=GPU_ENGINE)
    r.joined()
    body = r.docker.bodies["garage-engine"]
    assert body["HostConfig"]["DeviceRequests"][0]["DeviceIDs"] == ["0", "1"]  # TP 2 over both
    assert r.nvml.watched == [0, 1]
    ray_starts = len(r.ray.starts)
    r.nvml.queued.append((1, 79))  # fallen off the bus
    r.passes(3)
    s = r.status()
    assert s.gpus[1].quarantined and not s.gpus[1].healthy and "Xid 79 (GPU has fallen off the bus)" in s.gpus[1].error
    assert s.state is NodeState.JOINED and "(1 GPU; GPU 1 quarantined)" in s.message
    assert r.docker.bodies["garage-engine"]["HostConfig"]["DeviceRequests"][0]["DeviceIDs"] == ["0"]
    assert s.ray.resources.GPU == 1 and len(r.ray.starts) == ray_starts + 1  # Ray no longer offers it
    # NVML reads the card fine again: it stays out until the agent restarts (no flapping).
    r.passes(6)
    assert r.status().gpus[1].quarantined
    assert r.head.heartbeats[-1].gpus[1].quarantined  # the head sees it too


def test_lost_gpu_is_quarantined_and_the_node_keeps_serving(tmp_path):
    r = rig(tmp_path, gpus=[card(0), card(1)], engine=GPU_ENGINE)
    r.joined()
    r.gpus[0] = card(0, healthy=False)
    r.passes(3)
    s = r.status()
    assert s.gpus[0].quarantined and "GPU is lost" in s.gpus[0].error and "restart the agent" in s.gpus[0].error
    assert r.docker.bodies["garage-engine"]["HostConfig"]["DeviceRequests"][0]["DeviceIDs"] == ["1"]
    assert s.state is NodeState.JOINED and r.agent.health.worst() is None
    r.gpus[0] = card(0)
    r.passes(3)
    assert r.status().gpus[0].quarantined


def test_application_xid_does_not_quarantine(tmp_path):
    r = rig(tmp_path, gpus=[card(0)])
    r.joined()
    r.nvml.queued.append((0, 13))
    r.passes(2)
    assert not r.status().gpus[0].quarantined and r.status().gpus[0].healthy


# ------------------------------------------------------------------ power


def test_power_limit_applied_clamped_shown_and_restored_at_exit(tmp_path):
    r = rig(tmp_path, gpus=[card(0), card(1)], gpu=GpuSection(power_limit_w=500, refresh_s=1.0))
    r.joined()
    s = r.status()
    assert r.nvml.set_w == {0: 450, 1: 450}
    assert [g.power_limit_w for g in s.gpus] == [450.0, 450.0]
    assert s.serving.power_limit_w == 500 and "500 W is outside this card's 100-450 W: set 450 W" in s.serving.power_note
    assert "limit 450 W" in render(s)
    r.agent.shutdown()
    assert r.nvml.closed and r.nvml.set_w == {}


# ------------------------------------------------------------------ at the head


def test_head_nodes_shows_the_pause_and_the_quarantined_gpu(tmp_path):
    from garage_node.head.fleet import render_nodes, row_of
    from garage_node.head.registry import NodeRow

    r = rig(tmp_path, gpus=[card(0), card(1)], schedule=NIGHTS, wall=datetime(2027, 3, 3, 12, 0, tzinfo=BERLIN))
    r.joined()
    r.nvml.queued.append((1, 48))
    r.passes(6)
    # The heartbeat as the head stores it (JSON), read back into the operator's row.
    report = encode(r.head.heartbeats[-1])
    row = row_of(NodeRow("n0001", "pc-1", "testland", "k", "100.96.0.2", 1.0, r.clock.time(), None, report, True, None),
                 r.clock.time(), 30.0)
    assert row.node_state == "paused" and row.paused == "outside serving hours until Wed 23:00 CET"
    assert report["message"] == "outside serving hours until Wed 23:00 CET; GPU 1 quarantined"
    assert [g.quarantined for g in row.gpus] == [False, True] and "Xid 48" in row.gpus[1].error
    table = render_nodes([row])
    assert "(quarantined)" in table and "paused: outside serving hours until Wed 23:00 CET" in table


def test_pause_with_docker_down_is_a_pause_not_an_error(tmp_path):
    r = rig(tmp_path, schedule=NIGHTS, wall=datetime(2027, 3, 3, 12, 0, tzinfo=BERLIN))
    r.docker.down = True
    r.joined()
    e = r.status().engine
    assert e.state is EngineState.DRAINED and e.message.startswith("paused: outside serving hours until Wed 23:00 CET")
    assert "Docker is not answering" in e.message
    # Docker back: the pause is checked against it and settles.
    r.docker.down = False
    r.passes(2)
    e = r.status().engine
    assert e.state is EngineState.DRAINED and e.message == "paused: outside serving hours until Wed 23:00 CET"


def _offered_gpus(argv: list[str]) -> tuple[str, bool]:
    return argv[argv.index("--num-gpus") + 1], "--resources" in argv


def test_a_paused_pc_offers_ray_no_gpu_until_it_serves_again(tmp_path):
    r = rig(tmp_path, schedule=NIGHTS, wall=datetime(2027, 3, 2, 23, 50, tzinfo=BERLIN))
    r.joined()
    assert _offered_gpus(r.ray.starts[-1]) == ("1", True)
    r.clock.advance(8 * 3600 + 600)  # Wednesday, just past 08:00: outside the hours
    r.passes(3)
    assert r.status().state is NodeState.PAUSED
    # The worker was restarted without GPUs or VRAM (Ray cannot change a running node's
    # resources): no Ray task lands on the GPU the owner took back, and the PC stays in Ray.
    assert len(r.ray.starts) == 2 and _offered_gpus(r.ray.starts[-1]) == ("0", False) and r.ray.running
    r.passes(5)
    assert len(r.ray.starts) == 2  # once, not on every pass
    r.clock.wall = datetime(2027, 3, 3, 23, 0, tzinfo=BERLIN).timestamp()
    r.passes(3)
    assert len(r.ray.starts) == 3 and _offered_gpus(r.ray.starts[-1]) == ("1", True)
