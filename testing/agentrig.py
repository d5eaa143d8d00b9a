"""The agent rig: the real Agent and EngineManager in-process, with fakes at every edge (head,
WireGuard interface, firewall, Ray child, Docker, the engine's probe, NVML) and a FakeClock the
test moves. No root, no network, no Ray: the agent's unit tests (tests/unit/test_agent*.py,
test_serving.py, test_heartbeat_jitter.py, test_assign.py) share it, and no test file imports
another. The head's assignment (issue #18) is `rig.head.assignment`; the weights it names come
from `rig.store`, a model store served in-process to the real node/weights.py."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, Mapping

import httpx

from garage_node.core.supervise import RunAs
from garage_node.core.token import new_token
from garage_node.core import modelfiles
from garage_node.core.wire import Assignment, HeartbeatReply, NodeReport, QuarantineStatus, Status, decode, encode
from garage_node.node.agent import Agent
from garage_node.node.assign import HeadWeights
from garage_node.node.config import EngineSection, GpuSection, NodeConfig, NodeRaySection, NodeSection, ScheduleSection
from garage_node.node.engine.manager import EngineManager
from garage_node.node.gpu import GPU, Inventory
from garage_node.node.headclient import BeatTimer
from garage_node.node.identity import Identity
from garage_node.node.weights import Weights
from testing.fakes import (VERSIONS, FakeChild, FakeClock, FakeDocker, FakeFirewall, FakeHead, FakeHeadClient,
                           FakeInterface, FakeNvml, FakeProbe, ray_account)

TOKEN = new_token("https://10.9.0.1:8443", "sha256:" + "0" * 64).encode()


def gpu(i: int, healthy: bool = True, mib: int = 24564) -> GPU:
    return GPU(i, "NVIDIA GeForce RTX 4090", f"GPU-{i}", mib, mib, "8.9", 40, 30.0, 0, healthy,
               None if healthy else "GPU is lost")


@dataclasses.dataclass
class AssigningHead(FakeHead):
    """The fake head, answering every heartbeat with `assignment` (None: an older head) and
    `quarantine` (the audits' verdict on the PC, issue #20; None: it is not quarantined)."""

    assignment: Assignment | None = None
    quarantine: QuarantineStatus | None = None

    def connect(self, ident: Identity, ca_pem: bytes) -> FakeHeadClient:
        return _AssigningClient(self, ident)


@dataclasses.dataclass
class _AssigningClient(FakeHeadClient):
    def heartbeat(self, report: NodeReport) -> HeartbeatReply:
        reply = super().heartbeat(report)
        head = self.head
        assert isinstance(head, AssigningHead)
        return dataclasses.replace(reply, assignment=head.assignment, quarantine=head.quarantine)


class StoreSource:
    """The head's model store (modelfiles.py's routes: a manifest, files with ranges), served
    in-process to the real node/weights.py. `gate` cleared holds every file request (a download
    under way); `up` False fails them as an unreachable head does; `damaged` names models whose
    files arrive other than their manifest says; `slow` names models whose files arrive a
    megabyte every `slow_s` seconds (a long download, as of a 20 GB model)."""

    def __init__(self) -> None:
        self.models: dict[str, dict[str, bytes]] = {}
        self.gate = threading.Event()
        self.gate.set()
        self.up = True
        self.damaged: set[str] = set()
        self.slow: set[str] = set()
        self.slow_s = 0.1

    def add(self, name: str, files: Mapping[str, bytes]) -> str:
        """Stores a model; returns its Assignment.weights_path."""
        self.models[name] = dict(files)
        return modelfiles.weights_path(name)

    @contextlib.contextmanager
    def get(self, path: str, headers: Mapping[str, str]) -> Iterator[httpx.Response]:
        if not self.up:
            raise httpx.ConnectError("connection refused")
        name, _, rest = path.removeprefix(modelfiles.STORE_PREFIX).partition("/")
        files = self.models.get(name)
        if files is None:
            yield httpx.Response(404, json={"message": f"no model {name}"})
        elif rest == modelfiles.MANIFEST:
            entries = [modelfiles.ModelFile(p, len(b), hashlib.sha256(b).hexdigest()) for p, b in files.items()]
            yield httpx.Response(200, content=json.dumps(encode(modelfiles.Manifest.build(name, entries))).encode())
        else:
            self.gate.wait(30)
            if not self.up:
                raise httpx.ConnectError("connection refused")
            body = files[rest.removeprefix(modelfiles.FILES)]
            if name in self.slow:
                yield httpx.Response(200, content=self._trickle(body))
            else:
                yield httpx.Response(200, content=b"x" * len(body) if name in self.damaged else body)

    def _trickle(self, body: bytes) -> Iterator[bytes]:
        mib = 1024 * 1024
        for i in range(0, len(body), mib):
            if i:
                time.sleep(self.slow_s)
            yield body[i:i + mib]


@dataclasses.dataclass
class Rig:
    agent: Agent
    clock: FakeClock
    head: AssigningHead
    iface: FakeInterface
    ray: FakeChild
    docker: FakeDocker
    probe: FakeProbe
    firewall: FakeFirewall
    nvml: FakeNvml
    gpus: list[GPU]  # what NVML reads on its next refresh; a test may change it
    engine_in_step: bool = False  # each agent pass followed by an engine pass
    store: StoreSource = dataclasses.field(default_factory=StoreSource)

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

    def restart(self, seed: int = 1, new_engine: bool = False) -> Agent:
        """A new agent on the same state directory, as after a crash (the fakes and the engine
        live on). new_engine: the engine manager is new too, as after the agent's process
        restarted (the container lives on; the new manager adopts it if its spec matches), so
        the new agent's plan alone says what the engine runs."""
        old = self.agent

        def engine(*args, **kw):
            if not new_engine:
                return old.engine
            return EngineManager(*args, docker=self.docker, probe=self.probe, **kw)
        self.agent = _agent(old.cfg, self, engine, old.ray_part.lookup_account, seed)
        return self.agent


def rig(tmp_path: Path, *, token: str = TOKEN, engine: EngineSection | None = None, region: str = "",
        account: Callable[[str, tuple[str, ...]], RunAs] = ray_account, gpus: list[GPU] | None = None,
        schedule: ScheduleSection | None = None, gpu_cfg: GpuSection | None = None,
        wall: datetime | None = None, images: tuple[str, ...] = (), engine_in_step: bool = False) -> Rig:
    clock = FakeClock()
    if engine is not None and engine.weights_dir == EngineSection().weights_dir:
        engine = dataclasses.replace(engine, weights_dir=tmp_path / "weights")  # never the machine's own
    if wall is not None:
        clock.wall = wall.timestamp()
    cfg = NodeConfig(node=NodeSection(join_token=token, name="pc-1", region=region, state_dir=tmp_path / "state",
                                      runtime_dir=tmp_path / "run"),
                     ray=NodeRaySection(temp_dir=tmp_path / "ray"),
                     engine=engine or EngineSection(enabled=False), schedule=schedule or ScheduleSection(),
                     gpu=gpu_cfg or GpuSection())
    docker = FakeDocker()
    docker.images.update(images)
    r = Rig(None, clock, AssigningHead(clock), FakeInterface(), FakeChild(clock), docker,  # type: ignore[arg-type]
            FakeProbe(), FakeFirewall(), FakeNvml(), list(gpus if gpus is not None else [gpu(0)]), engine_in_step)

    def make_engine(*args, **kw):
        return EngineManager(*args, docker=r.docker, probe=r.probe, **kw)

    r.agent = _agent(cfg, r, make_engine, account, seed=0)
    return r


def _agent(cfg: NodeConfig, r: Rig, engine, account, seed: int) -> Agent:
    return Agent(cfg, clock=r.clock, head_api=r.head, iface=r.iface, ray_child=r.ray, engine=engine,
                 read_inventory=lambda: Inventory(tuple(r.gpus), "550.54.14", "12.4"), firewall=r.firewall,
                 lookup_account=account, probe_hub=lambda ip: r.iface.tunnel_carries, nvml=r.nvml,
                 beats=BeatTimer(random.Random(seed)), versions=lambda: VERSIONS,
                 weights=HeadWeights(Weights(cfg.engine.weights_dir), lambda: r.store))
