"""The agent's Ray step: the worker's unprivileged account, the cluster token in a file only
that account reads, Ray's temp dir, and the worker's arguments, handed each pass to the
`RayWorker` (node/ray.py), which decides on restarts."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from garage_node.core.fsutil import write_private
from garage_node.core.raycmd import RAY_PORTS
from garage_node.core.supervise import RunAs
from garage_node.node.config import NodeConfig
from garage_node.node.gpu import Inventory
from garage_node.node.health import Health, Source
from garage_node.node.identity import Identity
from garage_node.node.ray import RayWorker, ray_worker_command, worker_argv, worker_labels

# Supplementary groups of the Ray worker's account, where they exist: GPU device nodes.
RAY_GROUPS = ("video", "render")


@dataclass(frozen=True)
class WorkerWants:
    """What one pass asks of the Ray step (from the identity, the plan and the GPU part)."""

    ident: Identity
    inventory: Inventory
    model: str | None  # the engine's model, a label other Ray jobs can select on
    offer_gpus: bool  # False while the PC is paused (hours, heat): Ray gets no GPU
    head_reachable: bool
    tunnel_ok: bool = True  # the hub answers pings through the overlay


class RayPart:

    def __init__(self, cfg: NodeConfig, worker: RayWorker, health: Health,
                 lookup_account: Callable[[str, tuple[str, ...]], RunAs], token_path: Path) -> None:
        self.cfg = cfg
        self.worker = worker
        self.health = health
        self.lookup_account = lookup_account
        # Ray authenticates every client with the cluster token; the worker reads it from this
        # file (never from the command line). Its directory is root's (0755): the worker's
        # account can read its own file there but cannot plant anything root would write through.
        self.token_path = token_path
        self._account: RunAs | None = None
        self._token_written: str | None = None  # digest of the token in the worker's file

    def ensure(self, wants: WorkerWants) -> None:
        ident = wants.ident
        account = self._worker_account() if ident.ray_token else None
        if account is None:
            self.worker.stop()
            return
        self.worker.child.run_as = account
        token_digest = self._write_token(ident.ray_token, account)
        r = self.cfg.ray
        _own_dir(r.temp_dir, account)
        labels = worker_labels(ident.node_id, ident.region, wants.inventory, wants.model)
        argv = worker_argv(ray_worker_command(r.command), ident.ray_address, ident.overlay_ip, r.temp_dir, labels,
                           wants.inventory, r.num_cpus, r.memory_mib, r.object_store_mib, ports=RAY_PORTS,
                           offer_gpus=wants.offer_gpus)
        self.worker.run(argv, head_reachable=wants.head_reachable, generation=token_digest, tunnel_ok=wants.tunnel_ok)

    def _worker_account(self) -> RunAs | None:
        """The unprivileged account for Ray (looked up once); None, with a problem, if missing."""
        if self._account is None:
            user = self.cfg.ray.user
            try:
                account = self.lookup_account(user, RAY_GROUPS)
            except KeyError:
                self.health.fail(Source.RAY, f"the Ray worker's account '{user}' does not exist, so Ray is not "
                                 "started (Ray tasks never run as root on this PC)",
                                 f"create it: useradd --system --create-home --home-dir /var/lib/{user} "
                                 f"--shell /usr/sbin/nologin {user}  (or set [ray] user)")
                return None
            if account.uid == 0:
                self.health.fail(Source.RAY, f"[ray] user '{user}' is root: Ray tasks must not run as root on a PC",
                                 "set [ray] user to an unprivileged account")
                return None
            self._account = account
            self.health.clear(Source.RAY)
        return self._account

    def _write_token(self, token_text: str, account: RunAs) -> str:
        digest = hashlib.sha256(token_text.encode()).hexdigest()
        if digest != self._token_written or not self.token_path.exists():
            write_private(self.token_path, token_text.encode())
            if os.geteuid() == 0:
                os.chown(self.token_path, account.uid, account.gid)
            self._token_written = digest
        return digest


def _own_dir(path: Path, account: RunAs) -> None:
    """Ray's temp dir belongs to the Ray worker's account (it writes sessions and sockets there)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0 and path.stat().st_uid != account.uid:
        for root, dirs, files in os.walk(path):
            for name in (root, *(os.path.join(root, n) for n in dirs + files)):
                try:
                    os.lchown(name, account.uid, account.gid)
                except FileNotFoundError:
                    pass
