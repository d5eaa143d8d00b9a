"""The node's Ray worker: its command line, and the decisions about running it.

`ray start --block` runs as a supervised child (the agent never imports ray). Ray workers do
not rejoin a restarted head by themselves and may linger half-alive, so a worker the Ray head
stopped listing is restarted; `RayWorker` makes that call from what the heartbeats tell. A
head whose Ray came back as a new Ray cluster (no GCS fault tolerance, or its store lost) says
so with the cluster's id, and a worker of the old cluster is restarted at once.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Protocol

from garage_node.core.clock import SYSTEM, Clock
from garage_node.core.raycmd import RayPorts, label_value, sizing_args
from garage_node.core.supervise import ChildState, RunAs
from garage_node.core.wire import RayState
from garage_node.node.gpu import Inventory

log = logging.getLogger(__name__)

# A worker the Ray head listed and then lost for this long is restarted.
ABSENT_RESTART_S = 60.0
# A worker never listed yet gets longer: a first start can be slow (a busy or emulated PC).
FIRST_JOIN_S = 600.0


def ray_worker_command(configured: str) -> list[str]:
    """`ray` for a node: our own venv's Ray through garage_node.node.raystart, which keeps the
    raylet from giving up on agents that start slowly (see that module); a configured
    command is used as it is."""
    if configured:
        return [configured]
    return [sys.executable, "-m", "garage_node.node.raystart"]


def worker_labels(node_id: str, region: str, inventory: Inventory, model: str | None = None) -> dict[str, str]:
    healthy = inventory.healthy_gpus
    labels = {
        "garage.node_id": label_value(node_id),
        "garage.region": label_value(region),
        "garage.gpu": label_value(healthy[0].name) if healthy else "none",
        "garage.gpu_count": str(len(healthy)),
    }
    if model:
        labels["garage.model"] = label_value(model)
    return labels


def worker_argv(ray_cmd: list[str], head_address: str, ip: str, temp_dir: Path, labels: dict[str, str],
                inventory: Inventory, num_cpus: int = 0, memory_mib: int = 0,
                object_store_mib: int = 0, ports: RayPorts | None = None, offer_gpus: bool = True) -> list[str]:
    """`offer_gpus` False (the PC is paused: outside its serving hours, or hot): the worker
    stays in the cluster but offers Ray no GPU and no VRAM, so no Ray task lands on a GPU
    the owner took back. Ray cannot change a running node's resources, so the changed
    arguments restart the worker (RayWorker.run)."""
    gpus = len(inventory.healthy_gpus) if offer_gpus else 0
    argv = [
        *ray_cmd, "start", "--block",
        "--address", head_address,
        "--node-ip-address", ip,
        "--temp-dir", str(temp_dir),
        "--disable-usage-stats",
        # Count only the GPUs NVML calls healthy; a bad GPU is quarantined, not scheduled.
        "--num-gpus", str(gpus),
        "--labels", ",".join(f"{k}={v}" for k, v in sorted(labels.items())),
        *sizing_args(num_cpus, memory_mib, object_store_mib),
        # Pinned, so the firewall can name them (see core/firewall.py).
        *(ports.node_args() if ports else []),
    ]
    if inventory.vram_mib and gpus:
        argv += ["--resources", json.dumps({"vram_mib": inventory.vram_mib})]
    return argv


class Child(Protocol):
    """What RayWorker needs of a supervised process (core.supervise.Supervised)."""

    state: ChildState
    run_as: RunAs | None  # the account it runs as (never root on a PC)

    @property
    def running(self) -> bool: ...

    def ensure(self, argv: list[str]) -> bool: ...

    def stop(self, timeout_s: float = 15.0) -> None: ...

    def retry_now(self) -> None: ...


class RayWorker:
    def __init__(self, child: Child, clock: Clock = SYSTEM) -> None:
        self.child = child
        self.clock = clock
        self.alive_at_head = False
        self._alive_since: float | None = None  # monotonic, when the head last started listing it
        self._absent_since: float | None = None  # monotonic, since when the head has not listed it
        self._argv: list[str] | None = None
        self._generation: str = ""
        self._cluster_at_head = ""  # the Ray cluster id the head last reported ("": not known)
        # (the worker's started_at, the cluster the head listed it alive in): which cluster this
        # worker process joined, known only once the head has listed it.
        self._joined: tuple[float, str] | None = None
        self._dead_at_head = False  # the Ray head declared this PC's Ray node dead
        self._link_was_ok = True  # the head reachable and the tunnel carrying, at the last run
        # Why the worker is not alive at the head while it should be, for status; None: no word.
        self.note: str | None = None

    @property
    def running(self) -> bool:
        return self.child.running

    def head_says(self, alive: bool, cluster_id: str = "", dead: bool = False) -> None:
        """What the last heartbeat answer said: is this worker alive at the Ray head, which
        Ray cluster the Ray head runs ("": not known, e.g. an older head, or its Ray starting),
        and whether the Ray head declared this PC's Ray node dead."""
        now = self.clock.monotonic()
        if alive and not self.alive_at_head:
            self._alive_since = now
        if alive:
            self.note = None
        self.alive_at_head = alive
        self._dead_at_head = dead and not alive
        self._absent_since = None if alive else (self._absent_since or now)
        self._cluster_at_head = cluster_id
        started = self.child.state.started_at
        if alive and cluster_id and self.child.running and started is not None:
            self._joined = (started, cluster_id)  # listed alive there: this worker is in that cluster

    def joined_cluster(self) -> str:
        """The Ray cluster this worker process joined, as the head told; "" if not known."""
        if self._joined is None or not self.child.running or self._joined[0] != self.child.state.started_at:
            return ""
        return self._joined[1]

    def in_another_cluster(self) -> bool:
        """The head runs a Ray cluster other than the one this worker joined: Ray workers do
        not move to a new cluster, so waiting for this one to be listed again is waiting in vain.
        An unknown id on either side never counts."""
        joined = self.joined_cluster()
        return bool(joined and self._cluster_at_head and self._cluster_at_head != joined)

    def run(self, argv: list[str], head_reachable: bool, generation: str = "", tunnel_ok: bool = True) -> None:
        """Keep the worker running with `argv`: restart it on new arguments or a new
        `generation` (the cluster token changed), when the Ray head declared it dead or has not
        listed it for too long. `tunnel_ok`: the hub answers through the overlay (Ray's path)."""
        if self._argv is not None and argv != self._argv and self.child.running:
            log.info("GPU inventory or model changed; restarting the Ray worker with new resources")
            self.child.stop()
        if self._generation and generation != self._generation and self.child.running:
            log.info("the Ray cluster token changed; restarting the Ray worker")
            self.child.stop()
        self._generation = generation
        if self.in_another_cluster():
            log.warning("the Ray head is a new Ray cluster (id %s, this worker joined %s): "
                        "restarting the Ray worker now", self._cluster_at_head[:12], self.joined_cluster()[:12])
            self.child.stop()
            self._joined = None
            self._absent_since = self.clock.monotonic()
        link_ok = head_reachable and tunnel_ok
        if link_ok and not self._link_was_ok and not self.child.running:
            # Back from a cut: the restart delay grew while Ray could not reach its head.
            log.info("the head answers through the overlay again; starting the Ray worker now")
            self.child.retry_now()
        self._link_was_ok = link_ok
        if link_ok and self._dead_at_head and self._listed_since_start():
            # Ray never takes a node it declared dead back, and its raylet can take half a
            # minute to learn it (#24): a new worker rejoins as a new Ray node in seconds.
            log.warning("the Ray head declared this PC's Ray node dead (cut off longer than Ray's health "
                        "checks allow); restarting the Ray worker now")
            self.child.stop()
            self.child.retry_now()
            self._joined = None
            self.note = "rejoining as a new Ray node: Ray declared the last one dead during a network cut"
        if head_reachable and self.stale_at_head():
            log.warning("the Ray head has not listed this worker for %.0f s; restarting it", self._allowance())
            self.child.stop()
            self._absent_since = self.clock.monotonic()
        self._argv = argv
        self.child.ensure(argv)

    def stop(self) -> None:
        self.child.stop()
        self.alive_at_head = False
        self._joined = None

    def _listed_since_start(self) -> bool:
        """The Ray head has listed this very worker process alive at least once."""
        started = self.child.state.started_at
        return self.child.running and self._alive_since is not None and started is not None \
            and self._alive_since >= started

    def stale_at_head(self) -> bool:
        started = self.child.state.started_at
        if not (self.child.running and not self.alive_at_head and self._absent_since is not None and started is not None):
            return False
        now = self.clock.monotonic()
        allowance = self._allowance()
        return now - started > allowance and now - self._absent_since > allowance

    def _allowance(self) -> float:
        return ABSENT_RESTART_S if self._listed_since_start() else FIRST_JOIN_S

    def state(self, version_mismatch: bool) -> RayState:
        if version_mismatch:
            return RayState.VERSION_MISMATCH
        if self.child.running:
            return RayState.ALIVE if self.alive_at_head else RayState.STARTING
        return RayState.BACKOFF if self.child.state.restarts else RayState.STOPPED
