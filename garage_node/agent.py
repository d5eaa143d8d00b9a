"""The node agent (`garage-node run`): a reconcile loop, like a kubelet.

Each pass compares what should be (config, identity, what the head says) with what is
(GPUs, WireGuard interface, Ray worker) and does the next idempotent step. Failures are
retried with backoff and jitter and shown in status; nothing here crashes the loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from . import __version__, enroll, gpu, identity, sdnotify, token
from .backoff import Backoff
from .config import NodeConfig
from .engine import EngineConfigError, EngineManager, EngineSpec, desired_spec
from .identity import Identity, StatePaths
from .process import Supervised
from .raycluster import Versions, local_versions, ray_env, ray_worker_command, worker_argv, worker_labels
from .wireguard import Interface, Peer, WireGuardError

log = logging.getLogger(__name__)

GPU_REFRESH_S = 30.0
# A worker the Ray head listed and then lost for this long is restarted: Ray workers do not
# rejoin a restarted head by themselves, and may linger half-alive.
RAY_ABSENT_RESTART_S = 60.0
# A worker never listed yet gets longer: a first start can be slow (a busy or emulated PC).
RAY_FIRST_JOIN_S = 600.0


@dataclass
class HeadView:
    reachable: bool | None = None  # None: not asked yet
    last_contact: float | None = None
    last_error: str | None = None
    ray_alive: bool = False
    ray_alive_since: float | None = None
    ray_absent_since: float | None = None


@dataclass
class Problem:
    message: str
    hint: str = ""
    at: float = field(default_factory=time.time)
    retry_at: float | None = None  # when the agent tries again, if it will


class Agent:
    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.paths = StatePaths(cfg.node.state_dir)
        self.iface = Interface(cfg.overlay.interface, cfg.overlay.implementation)
        self.ray = Supervised("ray worker", self.paths.logs / "ray-worker.log",
                              Backoff(cfg.agent.backoff_initial_s, cfg.agent.backoff_max_s),
                              env=ray_env(), pid_file=cfg.node.runtime_dir / "ray-worker.pid")
        self.versions = local_versions()
        self.started_at = time.time()
        self.state = "starting"
        self.message = "starting"
        self.problem: Problem | None = None
        self.identity: Identity | None = None
        self.inventory = gpu.Inventory()
        self.head = HeadView()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._gpus_read_at = 0.0
        self._next_head_call = 0.0
        self._head_backoff = Backoff(cfg.agent.backoff_initial_s, cfg.agent.backoff_max_s)
        self._refused_token: str | None = None  # hash of a token the head refused for good
        self._client: httpx.Client | None = None
        self._ray_argv: list[str] | None = None
        self._overlay_ready = False  # interface up with the hub peer set, by this process
        self.engine = EngineManager(cfg.engine, self.paths.drain_flag, self._engine_desired)

    # ------------------------------------------------------------ lifecycle

    def run(self) -> None:
        self.identity = identity.load(self.paths)
        self._refresh_gpus(force=True)
        self.reconcile_once()
        self.engine.start()
        sdnotify.ready(self.message)
        while not self._stop.is_set():
            self._wake.wait(self.cfg.agent.reconcile_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            self.reconcile_once()
        self._shutdown()

    def request_stop(self, *_: Any) -> None:
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def _shutdown(self) -> None:
        self._set("stopping", "stopping: draining the engine, then Ray worker and overlay go down; identity kept")
        sdnotify.stopping()
        self._tell_head_now()
        self.engine.shutdown()
        self.ray.stop()
        self.iface.down()
        if self._client:
            self._client.close()
        log.info("stopped; identity kept in %s", self.paths.state_dir)

    # ------------------------------------------------------------ reconcile

    def reconcile_once(self) -> None:
        try:
            self._refresh_gpus()
            if self.identity is None or self.identity.revoked:
                self._try_enroll()
            if self.identity is not None and not self.identity.revoked:
                self._ensure_overlay()
                self._heartbeat_if_due()
                self._ensure_ray()
            self._summarise()
        except Exception as e:  # the loop must survive anything; the next pass retries
            log.exception("reconcile pass failed")
            self._fail(f"internal error: {e}", "this is a bug; the agent keeps retrying. Report it with `journalctl -u garage-node`.")
        sdnotify.status(self.message)
        sdnotify.watchdog()

    def _refresh_gpus(self, force: bool = False) -> None:
        if force or time.monotonic() - self._gpus_read_at > GPU_REFRESH_S:
            self.inventory = gpu.read_inventory()
            self._gpus_read_at = time.monotonic()

    # -- enrollment

    def _pending_token(self) -> tuple[str, str] | None:
        """(token text, where it came from): the one `garage-node join` stored wins over config."""
        if self.paths.join_token.exists():
            return self.paths.join_token.read_text().strip(), str(self.paths.join_token)
        if self.cfg.node.join_token:
            return self.cfg.node.join_token, "config [node] join_token"
        return None

    def _try_enroll(self) -> None:
        pending = self._pending_token()
        if pending is None:
            if self.identity is None:
                self._set("needs-token", "waiting for a join token")
                self.problem = Problem("this PC has not joined a region yet",
                                       "put the join token in garage.toml ([node] join_token) or run `garage-node join TOKEN`")
            return
        text, source = pending
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest == self._refused_token or time.monotonic() < self._next_head_call:
            return
        if self.identity is not None and digest == self.identity.token_digest:
            return  # revoked, and this is the token it joined with: wait for a new one
        try:
            tok = token.parse(text)
        except token.TokenError as e:
            self._refused_token = digest
            self._fail(f"the join token in {source} is unusable: {e}", "")
            if self.identity is None:
                self._set("error", "the join token is unusable")
            return
        self._set("enrolling", f"enrolling with the head at {tok.api_url}")
        try:
            ident, ca_pem = enroll.enroll(tok, self._node_name(), self._report())
        except enroll.EnrollFailed as e:
            self._enroll_failed(e, digest)
            return
        ident = dataclasses.replace(ident, token_digest=digest)
        identity.save(self.paths, ident, ca_pem)
        self.paths.join_token.unlink(missing_ok=True)
        self._replace_identity(ident)
        self._head_backoff.reset()
        self._next_head_call = 0.0
        self.problem = None
        log.info("enrolled as node %s with overlay address %s", ident.node_id, ident.overlay_ip)

    def _enroll_failed(self, e: enroll.EnrollFailed, digest: str) -> None:
        self.head.reachable = e.code != "unreachable" if e.code else None
        if e.retry:
            delay = self._head_backoff.next_delay()
            self._next_head_call = time.monotonic() + delay
            self._fail(str(e), "check that the head is running and reachable from this PC", retry_in=delay)
        else:
            self._refused_token = digest
            self._fail(str(e), "get a new join token from the operator and run `garage-node join TOKEN`")
        if self.identity is None:
            self._set("enrolling" if e.retry else "error", str(e))

    def _replace_identity(self, ident: Identity) -> None:
        old = self.identity
        if old is not None and old.wg_private_key != ident.wg_private_key:
            self.ray.stop()
            self.iface.down()
        self.identity = ident
        if self._client:
            self._client.close()
            self._client = None

    def _node_name(self) -> str:
        return self.cfg.node.name or socket.gethostname().split(".")[0]

    # -- overlay

    def _ensure_overlay(self) -> None:
        ident = self.identity
        assert ident is not None
        if self.iface.exists() and self._overlay_ready:
            return
        try:
            self.iface.up(ident.wg_private_key, f"{ident.overlay_ip}/{ident.prefix_len}")
            # Hub and spoke: the whole overlay is reached through the head.
            network = f"{ident.hub_ip}/{ident.prefix_len}"
            self.iface.set_peer(Peer(ident.hub_public_key, (network,), ident.hub_endpoint, self.cfg.overlay.keepalive_s))
            self._overlay_ready = True
        except WireGuardError as e:
            self._overlay_ready = False
            self._fail(f"overlay interface {self.iface.name} could not be set up: {e}", "")

    # -- heartbeat

    def _tell_head_now(self) -> None:
        """One last heartbeat on the way down, so the head knows at once (best effort)."""
        if self.identity is not None and not self.identity.revoked and self._overlay_ready:
            self._next_head_call = 0.0
            self._heartbeat_if_due()

    def _heartbeat_if_due(self) -> None:
        if time.monotonic() < self._next_head_call:
            return
        ident = self.identity
        assert ident is not None
        try:
            resp = self._head_client().post(
                f"{ident.api_url}/v1/nodes/{ident.node_id}/heartbeat",
                json={"report": self._report()},
                headers={"Authorization": f"Bearer {ident.credential}"},
            )
        except httpx.HTTPError as e:
            self._head_unreachable(f"head unreachable at {ident.api_url}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}")
            return
        if resp.status_code == 403:
            self._revoked(enroll.error_of(resp)[1])
            return
        if resp.status_code != 200:
            self._head_unreachable(f"the head answered {resp.status_code}: {enroll.error_of(resp)[1]}")
            return
        self._heartbeat_ok(resp.json())

    def _heartbeat_ok(self, body: dict[str, Any]) -> None:
        now = time.time()
        h = self.head
        h.reachable, h.last_contact, h.last_error = True, now, None
        was_alive, h.ray_alive = h.ray_alive, bool(body.get("ray_alive"))
        if h.ray_alive and not was_alive:
            h.ray_alive_since = now
        h.ray_absent_since = None if h.ray_alive else (h.ray_absent_since or now)
        self._head_backoff.reset()
        ident = self.identity
        assert ident is not None
        updated = ident.with_hub(body)
        if updated != ident:
            identity.save(self.paths, updated)
            self.identity = updated
            self._overlay_ready = False  # re-apply the hub peer
        self._next_head_call = time.monotonic() + updated.heartbeat_s
        if self.problem and "head" in self.problem.message:
            self.problem = None

    def _head_unreachable(self, message: str) -> None:
        delay = min(self._head_backoff.next_delay(), self.identity.heartbeat_s if self.identity else 10.0)
        self._next_head_call = time.monotonic() + delay
        self.head.reachable, self.head.last_error = False, message
        self._fail(message, "check that the head is running; the node keeps its place and rejoins by itself", retry_in=delay)

    def _revoked(self, message: str) -> None:
        ident = self.identity
        assert ident is not None
        log.warning("the head revoked this node: %s", message)
        self.engine.stand_down()
        self.ray.stop()
        self.iface.down()
        self._overlay_ready = False
        self.identity = dataclasses.replace(ident, revoked=True)
        identity.save(self.paths, self.identity)
        self.head.reachable, self.head.ray_alive = True, False
        self._fail(f"revoked: {message}", "ask the operator for a new join token and run `garage-node join TOKEN`")

    def _head_client(self) -> httpx.Client:
        if self._client is None:
            self._client = enroll.client(self.paths.head_ca.read_bytes())
        return self._client

    # -- Ray

    def version_mismatch(self) -> str | None:
        ident = self.identity
        if ident is None or not ident.head_ray_version:
            return None
        return self.versions.mismatch(Versions(ident.head_ray_version, ident.head_python_version))

    def _ensure_ray(self) -> None:
        ident = self.identity
        assert ident is not None
        if not self._overlay_ready or self.version_mismatch():
            self.ray.stop()
            return
        argv = self._ray_worker_argv(ident)
        if self._ray_argv is not None and argv != self._ray_argv and self.ray.running:
            log.info("GPU inventory changed; restarting the Ray worker with new resources")
            self.ray.stop()
        if self._ray_stale_at_head():
            log.warning("the Ray head has not listed this worker for %.0f s; restarting it", RAY_ABSENT_RESTART_S)
            self.ray.stop()
            self.head.ray_absent_since = time.time()
        self._ray_argv = argv
        self.ray.ensure(argv)

    def _ray_stale_at_head(self) -> bool:
        h = self.head
        started = self.ray.state.started_at
        if not (self.ray.running and h.reachable is True and not h.ray_alive and h.ray_absent_since and started):
            return False
        was_listed = h.ray_alive_since is not None and h.ray_alive_since > time.time() - (time.monotonic() - started)
        allowance = RAY_ABSENT_RESTART_S if was_listed else RAY_FIRST_JOIN_S
        return time.monotonic() - started > allowance and time.time() - h.ray_absent_since > allowance

    def _ray_worker_argv(self, ident: Identity) -> list[str]:
        r = self.cfg.ray
        labels = worker_labels(ident.node_id, ident.region, self.inventory, self._engine_model())
        return worker_argv(ray_worker_command(r.command), ident.ray_address, ident.overlay_ip, r.temp_dir, labels,
                           self.inventory, r.num_cpus, r.memory_mib, r.object_store_mib)

    # -- engine

    def _engine_desired(self) -> tuple[EngineSpec, str] | None:
        """What the engine should run; None until the node has joined (it binds the overlay address)."""
        ident = self.identity
        if ident is None or ident.revoked or not self._overlay_ready:
            return None
        return desired_spec(self.cfg.engine, self.inventory, ident.overlay_ip)

    def _engine_model(self) -> str | None:
        if not self.cfg.engine.enabled:
            return None
        try:
            wanted = self._engine_desired()
        except EngineConfigError:
            return None
        return wanted[0].model if wanted else None

    # ------------------------------------------------------------ state

    def _set(self, state: str, message: str) -> None:
        with self._lock:
            if (state, message) != (self.state, self.message):
                log.info("state %s: %s", state, message)
            self.state, self.message = state, message

    def _fail(self, message: str, hint: str, retry_in: float | None = None) -> None:
        """Record the problem status shows; log it once, not on every retry."""
        if self.problem is None or self.problem.message != message:
            log.warning("%s", message)
            self.problem = Problem(message, hint)
        self.problem.retry_at = time.time() + retry_in if retry_in is not None else None

    def _summarise(self) -> None:
        """One state and one line a person understands, derived from everything else."""
        ident = self.identity
        if ident is None:
            return  # set by the enrollment steps
        if ident.revoked:
            self._set("revoked", "revoked by the operator: needs a new join token")
        elif mismatch := self.version_mismatch():
            self._set("degraded", f"version mismatch, Ray worker not started: {mismatch}")
        elif not self._overlay_ready:
            self._set("joining", "bringing up the overlay")
        elif self.head.reachable is False:
            self._set("degraded", "head unreachable; retrying")
        elif self.head.ray_alive and self.ray.running:
            gpus = len(self.inventory.healthy_gpus)
            offer = f"{gpus} GPU{'s' if gpus != 1 else ''}" if gpus else "CPU only"
            self._set("joined", f"joined as {ident.overlay_ip}; Ray worker alive at the head ({offer})")
        else:
            self._set("joining", "Ray worker starting" if self.ray.running else "Ray worker waiting to restart")

    def _report(self) -> dict[str, Any]:
        """What the head learns with each heartbeat (never a secret)."""
        snap = self.snapshot()
        report = {k: snap[k] for k in ("state", "message", "gpus", "gpu_note", "driver_version", "cuda_version", "versions", "ray")}
        e = snap["engine"]
        report["engine"] = {k: e.get(k) for k in ("state", "model", "endpoint", "draining", "healthy_since")}
        return report

    def snapshot(self) -> dict[str, Any]:
        """The status document served by the local API; its keys are documented in the README."""
        ident = self.identity
        inv = self.inventory
        now = time.time()
        with self._lock:
            state, message = self.state, self.message
        return {
            "state": state,
            "message": message,
            "node_id": ident.node_id if ident else None,
            "name": ident.name if ident else self._node_name(),
            "region": ident.region if ident else None,
            "gpus": [g.__dict__ for g in inv.gpus],
            "gpu_note": inv.nvml_error,
            "driver_version": inv.driver_version,
            "cuda_version": inv.cuda_version,
            "overlay": self._overlay_status(now),
            "head": {
                "api_url": ident.api_url if ident else None,
                "reachable": self.head.reachable,
                "last_contact_age_s": round(now - self.head.last_contact, 1) if self.head.last_contact else None,
                "error": self.head.last_error,
            },
            "ray": {
                "state": self._ray_state(),
                "address": ident.ray_address if ident else None,
                "alive_at_head": self.head.ray_alive,
                "pid": self.ray.state.pid,
                "restarts": self.ray.state.restarts,
                "last_exit_code": self.ray.state.last_exit_code,
                "resources": {"GPU": len(inv.healthy_gpus), "vram_mib": inv.vram_mib},
            },
            "engine": self.engine.snapshot(),
            "versions": {"agent": __version__, "ray": self.versions.ray, "python": self.versions.python},
            "last_error": self._problem_status(now),
            "agent": {"pid": os.getpid(), "uptime_s": round(now - self.started_at, 1)},
        }

    def _problem_status(self, now: float) -> dict[str, Any] | None:
        p = self.problem
        if p is None:
            return None
        retry = round(max(0.0, p.retry_at - now), 1) if p.retry_at else None
        return {"message": p.message, "hint": p.hint, "age_s": round(now - p.at, 1), "retry_in_s": retry}

    def _ray_state(self) -> str:
        if self.version_mismatch():
            return "version-mismatch"
        if self.ray.running:
            return "alive" if self.head.ray_alive else "starting"
        return "backoff" if self.ray.state.restarts else "stopped"

    def _overlay_status(self, now: float) -> dict[str, Any]:
        ident = self.identity
        up = self.iface.exists()
        age = None
        if up and ident:
            try:
                hub = next((p for p in self.iface.peers() if p.public_key == ident.hub_public_key), None)
                age = hub.handshake_age_s(now) if hub else None
            except WireGuardError:
                pass
        return {
            "interface": self.iface.name,
            "up": up,
            "address": ident.overlay_ip if ident else None,
            "hub_ip": ident.hub_ip if ident else None,
            "hub_endpoint": ident.hub_endpoint if ident else None,
            "handshake_age_s": round(age, 1) if age is not None else None,
        }


def install_signal_handlers(agent: Agent) -> None:
    # SIGTERM (systemd stop) and SIGINT (Ctrl-C) both leave cleanly; the loop notices at once.
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
