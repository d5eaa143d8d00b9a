"""The agent rig: the real Agent and EngineManager in-process, with fakes at every edge (head,
WireGuard interface, firewall, Ray child, Docker, the engine's probe, NVML) and a FakeClock the
test moves. No root, no network, no Ray: the agent's unit tests (tests/unit/test_agent*.py,
test_serving.py, test_heartbeat_jitter.py) share it, and no test file imports another."""

from __future__ import annotations

import dataclasses
import random
from datetime import datetime
from pathlib import Path
from typing import Callable

from garage_node.core.supervise import RunAs
from garage_node.core.token import new_token
from garage_node.core.wire import Status, decode, encode
from garage_node.node.agent import Agent
from garage_node.node.config import EngineSection, GpuSection, NodeConfig, NodeRaySection, NodeSection, ScheduleSection
from garage_node.node.engine.manager import EngineManager
from garage_node.node.gpu import GPU, Inventory
from garage_node.node.headclient import BeatTimer
from testing.fakes import (VERSIONS, FakeChild, FakeClock, FakeDocker, FakeFirewall, FakeHead, FakeInterface, FakeNvml,
                           FakeProbe, ray_account)

TOKEN = new_token("https://10.9.0.1:8443", "sha256:" + "0" * 64).encode()


def gpu(i: int, healthy: bool = True, mib: int = 24564) -> GPU:
    return GPU(i, "NVIDIA GeForce RTX 4090", f"GPU-{i}", mib, mib, "8.9", 40, 30.0, 0, healthy,
               None if healthy else "GPU is lost")


@dataclasses.dataclass
class Rig:
    agent: Agent
    clock: FakeClock
    head: FakeHead
    iface: FakeInterface
    ray: FakeChild
    docker: FakeDocker
    probe: FakeProbe
    firewall: FakeFirewall
    nvml: FakeNvml
    gpus: list[GPU]  # what NVML reads on its next refresh; a test may change it
    engine_in_step: bool = False  # each agent pass followed by an engine pass

    def passes(self, n: int = 1, every_s: float = 2.0) -> None:
        for _ in range(n):
            self.agent.reconcile_once()
            if self.engine_in_step:
                self.agent.engine.reconcile_safely()
            self.clock.advance(every_s)

    def status(self) -> Status:
        # Through JSON and back, as `garage-node status` reads it from the local API.
        return decode(encode(self.agent.snapshot()), Status)

    def set_temp(self, i: int, temp: int) -> None:
        self.gpus[i] = dataclasses.replace(self.gpus[i], temperature_c=temp)

    def joined(self) -> None:
        """Passes until the head lists the PC's Ray worker alive."""
        self.head.ray_alive = True
        self.passes(6)

    def restart(self, seed: int = 1) -> Agent:
        """A new agent on the same state directory, as after a crash (the fakes and the engine
        live on)."""
        old = self.agent
        self.agent = _agent(old.cfg, self, lambda *a, **kw: old.engine, old.ray_part.lookup_account, seed)
        return self.agent


def rig(tmp_path: Path, *, token: str = TOKEN, engine: EngineSection | None = None, region: str = "",
        account: Callable[[str, tuple[str, ...]], RunAs] = ray_account, gpus: list[GPU] | None = None,
        schedule: ScheduleSection | None = None, gpu_cfg: GpuSection | None = None,
        wall: datetime | None = None, images: tuple[str, ...] = (), engine_in_step: bool = False) -> Rig:
    clock = FakeClock()
    if wall is not None:
        clock.wall = wall.timestamp()
    cfg = NodeConfig(node=NodeSection(join_token=token, name="pc-1", region=region, state_dir=tmp_path / "state",
                                      runtime_dir=tmp_path / "run"),
                     ray=NodeRaySection(temp_dir=tmp_path / "ray"),
                     engine=engine or EngineSection(enabled=False), schedule=schedule or ScheduleSection(),
                     gpu=gpu_cfg or GpuSection())
    docker = FakeDocker()
    docker.images.update(images)
    r = Rig(None, clock, FakeHead(clock), FakeInterface(), FakeChild(clock), docker,  # type: ignore[arg-type]
            FakeProbe(), FakeFirewall(), FakeNvml(), list(gpus if gpus is not None else [gpu(0)]), engine_in_step)

    def make_engine(*args, **kw):
        return EngineManager(*args, docker=r.docker, probe=r.probe, **kw)

    r.agent = _agent(cfg, r, make_engine, account, seed=0)
    return r


def _agent(cfg: NodeConfig, r: Rig, engine, account, seed: int) -> Agent:
    return Agent(cfg, clock=r.clock, head_api=r.head, iface=r.iface, ray_child=r.ray, engine=engine,
                 read_inventory=lambda: Inventory(tuple(r.gpus), "550.54.14", "12.4"), firewall=r.firewall,
                 lookup_account=account, probe_hub=lambda ip: r.iface.tunnel_carries, nvml=r.nvml,
                 beats=BeatTimer(random.Random(seed)), versions=lambda: VERSIONS)
