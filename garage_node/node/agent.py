"""The node agent (`garage-node run`): a reconcile loop, like a kubelet, coordinating parts.

Each pass compares what should be (config, identity, what the head says) with what is and lets
each part take its next idempotent step, in order:

  GPUs (serving.GpuWatch) -> head session: enroll (session.HeadSession) -> overlay: interface,
  firewall, tunnel probe (overlay.Overlay) -> the pass's plan (plan.make_plan, or the head's
  assignment carried out by assign.AssignPart) and the serving decision -> heartbeat and
  credential renewal (session) -> Ray worker (raystep.RayPart)

The engine reconciles in its own thread and reads the last plan. The agent owns the two things
that tie the parts together: the identity (one place adopts a new one and derives what must be
redone, `adopt`) and the plan. Each part reports its problems to `health` under its own source.
Failures are retried with backoff and jitter; nothing here crashes the loop. The lifecycle has
uvicorn's shape: `serve()` = `startup()`, `main_loop()`, `shutdown()`.

Every edge is handed in (head API, WireGuard interface, firewall, Ray child process, engine
manager, GPU reader, versions, clock), so unit tests run the agent's decisions in-process; the
namespace, Docker and QEMU suites run the same code on real parts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

from garage_node import __version__
from garage_node.core import sdnotify
from garage_node.core.backoff import Backoff
from garage_node.core.clock import SYSTEM, Clock
from garage_node.core.firewall import Firewall, Nftables
from garage_node.core.raycmd import local_versions, ray_env
from garage_node.core.supervise import RunAs, Supervised
from garage_node.core.wire import (MAX_GPUS, AgentInfo, AgentVersions, EngineState, HeadStatus, NodeReport,
                                   NodeState, RayResources, RayStatus, Status, Versions, clip)
from garage_node.core.wireguard import Interface
from garage_node.node import gpu, identity
from garage_node.node import update as os_update
from garage_node.node.assign import AssignPart, HeadWeights, WeightStore
from garage_node.node.config import NodeConfig
from garage_node.node.engine.manager import EngineManager
from garage_node.node.headclient import BeatTimer, HeadApi
from garage_node.node.health import Health, Source
from garage_node.node.identity import Identity
from garage_node.node.install import Installer
from garage_node.node.overlay import Overlay
from garage_node.node.paths import StatePaths
from garage_node.node.plan import Plan, make_plan
from garage_node.node.ray import Child, RayWorker
from garage_node.node.raystep import RayPart, WorkerWants
from garage_node.node.serving import GpuWatch
from garage_node.node.session import HeadSession
from garage_node.node.state import Facts, derive
from garage_node.node.updatepart import UpdatePart
from garage_node.node.weights import Weights, head_source

log = logging.getLogger(__name__)

# An engine in these states runs no request: an OS update may install.
ENGINE_OFF = frozenset({EngineState.DRAINED, EngineState.STOPPED, EngineState.DISABLED, EngineState.REFUSED,
                        EngineState.ERROR})


@dataclass(frozen=True)
class Change:
    """What an identity change asks of the PC, derived from the old and the new identity."""

    revoked: bool  # the operator revoked this node: stand everything down
    rejoined: bool  # a new node (a new token after a revocation): a new address, a new key
    reapply_overlay: bool  # same node, new WireGuard key (renewal) or the hub moved

    @classmethod
    def between(cls, old: Identity | None, new: Identity) -> Change:
        if old is None:
            return cls(revoked=False, rejoined=False, reapply_overlay=False)
        hub = ("hub_ip", "hub_public_key", "hub_endpoint", "prefix_len")
        hub_moved = any(getattr(old, f) != getattr(new, f) for f in hub)
        return cls(revoked=new.revoked and not old.revoked,
                   rejoined=new.node_id != old.node_id,
                   reapply_overlay=old.wg_private_key != new.wg_private_key or hub_moved)


class Agent:
    def __init__(self, cfg: NodeConfig, *, clock: Clock = SYSTEM, head_api: HeadApi | None = None,
                 iface: Interface | None = None, ray_child: Child | None = None,
                 engine: Callable[..., EngineManager] | None = None,
                 read_inventory: Callable[[], gpu.Inventory] = gpu.read_inventory,
                 firewall: Firewall | None = None,
                 lookup_account: Callable[[str, tuple[str, ...]], RunAs] = RunAs.lookup,
                 probe_hub: Callable[[str], bool] | None = None,
                 nvml: gpu.NvmlSession | None = None, beats: BeatTimer | None = None,
                 versions: Callable[[], Versions] = local_versions, weights: WeightStore | None = None,
                 updates: UpdatePart | None = None) -> None:
        self.cfg = cfg
        self.clock = clock
        self.paths = StatePaths(cfg.node.state_dir)
        self.health = Health(clock)
        self.session = HeadSession(cfg, self.paths, clock, self.health, head_api or HeadApi(), beats or BeatTimer(),
                                   self._backoff)
        self.overlay = Overlay(cfg, clock, self.health, iface or Interface(cfg.overlay.interface,
                                                                           cfg.overlay.implementation),
                               firewall or Nftables(), probe_hub)
        self.gpus = GpuWatch(cfg, clock, read_inventory, nvml or gpu.NvmlSession())
        token_path = cfg.node.runtime_dir / "ray-token"
        ray_auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
        self.ray = RayWorker(ray_child or Supervised(
            "ray worker", self.paths.logs / "ray-worker.log", self._backoff(), env={**ray_env(), **ray_auth},
            pid_file=cfg.node.runtime_dir / "ray-worker.pid", clock=clock), clock)
        self.ray_part = RayPart(cfg, self.ray, self.health, lookup_account, token_path)
        self.plan = Plan()
        # What the head assigns this PC to serve, carried out (weights, then the switch).
        self.assign = AssignPart(cfg.engine, clock, self.health, weights or HeadWeights(
            Weights(cfg.engine.weights_dir, cfg.engine.weights_max_mib or None), self._weight_source),
            kept=self.paths.carried_assignment)
        # The engine's thread asks what it should run; it gets the last plan's answer.
        # `engine` builds it (tests hand in one with a fake Docker).
        self.engine = (engine or EngineManager)(cfg.engine, self.paths.drain_flag, lambda: self.plan.engine_wanted(),
                                                clock=clock)
        # The stick's OS updates (issue #19): the head's target against the owner's [update]
        # policy; on an A/B stick the install (node/install.py) fetches from the head with this
        # PC's credential. Where it cannot install it says so in status, and never drains the
        # engine for it.
        variant = os_update.os_release_value("VARIANT_ID")
        self.updates = updates or UpdatePart(self.paths.state_dir,
                                             os_update.policy_of(cfg.update, cfg.schedule.timezone), clock.time,
                                             variant=variant, make_installer=lambda: Installer(
                                                 head_source(self._identity, self.paths.head_ca.read_bytes()),
                                                 variant))
        self.versions = versions()
        self.started_at = clock.monotonic()
        self.identity: Identity | None = None
        self.state, self.message = NodeState.STARTING, "starting"
        self._stopping = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()

    def _backoff(self) -> Backoff:
        return Backoff(self.cfg.agent.backoff_initial_s, self.cfg.agent.backoff_max_s)

    # ------------------------------------------------------------ lifecycle

    def serve(self) -> None:
        self.startup()
        try:
            self.main_loop()
        finally:
            self.shutdown()

    def startup(self) -> None:
        self.identity = identity.load(self.paths)
        self.reconcile_once()
        self.engine.start()
        sdnotify.ready(self.message)

    def main_loop(self) -> None:
        while not self._stop.is_set():
            self.clock.wait(self._wake, self.cfg.agent.reconcile_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            self.reconcile_once()

    def shutdown(self) -> None:
        self._stopping = True
        self._update_state()
        sdnotify.stopping()
        if self._member() and self.overlay.interface_ready:
            assert self.identity is not None
            self.session.tell_now(self.identity, self._report)
        self.engine.shutdown()
        self.gpus.close()
        self.ray.stop()
        self.overlay.down()
        self.session.close()
        log.info("stopped; identity kept in %s", self.paths.state_dir)

    def request_stop(self, *_: Any) -> None:
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def drain(self) -> None:
        self.engine.drain()

    def resume(self) -> None:
        self.engine.resume()

    # ------------------------------------------------------------ one pass

    def reconcile_once(self) -> None:
        try:
            self._pass()
        except Exception as e:  # the loop must survive anything; the next pass retries
            log.exception("reconcile pass failed")
            self.health.fail(Source.INTERNAL, f"internal error: {e}",
                             "this is a bug; the agent keeps retrying. Report it with `journalctl -u garage-node`.")
        else:
            self.health.clear(Source.INTERNAL)
        self._update_state()
        sdnotify.status(self.message)
        sdnotify.watchdog()

    def _pass(self) -> None:
        self.gpus.refresh()
        if not self._member():
            joined = self.session.enroll(self.identity, self._report)
            if joined is not None:
                self.adopt(joined)
        if self._member():
            assert self.identity is not None
            self.overlay.ensure(self.identity)
        self._replan()
        if not self._member():
            # No head, so no version to install; but the stick's version and what became of
            # its last update (a rollback, by hand or not) are shown all the same.
            self.updates.step(None, serving=False, idle=True)
            return
        assert self.identity is not None
        assigned = self.session.assignment
        answer = self.session.heartbeat_if_due(self.identity, self._report)
        self.assign.told(answer is not None and answer.reply is not None)
        if answer is not None:
            self.adopt(answer.identity)
            if answer.reply is not None:
                reply = answer.reply
                self.ray.head_says(reply.ray_alive, reply.ray_cluster_id, reply.ray_dead)
            if self.session.assignment != assigned:
                self._replan()  # the head's new word takes effect now, not a pass later
        paused = self.gpus.serving.paused is not None or self.engine.draining or not self.cfg.engine.enabled
        # Idle: no engine runs a request, including one this update's own hold has drained.
        idle = paused or self.engine.snapshot().state in ENGINE_OFF
        self.updates.step(self.session.update_target, serving=not paused, idle=idle)
        if self._member():
            assert self.identity is not None
            renewed = self.session.renew_if_due(self.identity)
            if renewed is not None:
                self.adopt(renewed)
        self._ensure_ray()

    def _member(self) -> bool:
        return self.identity is not None and not self.identity.revoked

    def adopt(self, new: Identity) -> None:
        """The one place a new identity takes effect (enrollment, heartbeat, renewal,
        revocation): what must be redone follows from the old and the new."""
        old, self.identity = self.identity, new
        change = Change.between(old, new)
        if change.revoked:
            self.engine.stand_down()
            self.ray.stop()
            self.overlay.down()
            self.health.clear(Source.RAY)  # moot until it joins again
        elif change.rejoined:
            self.ray.stop()
            self.overlay.down()
        elif change.reapply_overlay:
            # The hub knows the new key or address already: the interface follows now.
            self.overlay.reapply()
            self.overlay.ensure(new)
        if new != old:
            self._replan()

    def _replan(self) -> None:
        """The plan, and with it whether the PC serves now: once per pass, and again when the
        identity changes."""
        ident = self.identity if self._member() else None
        plan = make_plan(self.cfg.engine, self.gpus.inventory, ident, self.overlay.ready)
        if self.cfg.engine.enabled:
            directive = self.assign.step(self.session.assignment, self.gpus.inventory, ident, self.engine.snapshot(),
                                         self.engine.spec)
            plan = plan.with_assignment(directive)
            if self.assign.wants_beat:
                self.session.beat_now()  # the head hears of the switch before the engine drains
        if plan.engine != self.plan.engine or plan.idle != self.plan.idle:
            self.engine.wake()
        self.plan = plan
        # Paused for the owner's hours or heat: the engine drains and comes back by itself;
        # the owner's own drain stays the owner's. The head assigning nothing holds it off too.
        self.engine.hold(self.gpus.decide(self.plan.engine_gpus) or plan.idle or self._update_drains())

    def _weight_source(self) -> Any:
        """Where weights come from: the head's control API, with this node's credential."""
        return head_source(lambda: self._identity(), self.paths.head_ca.read_bytes())

    def _identity(self) -> Identity:
        assert self.identity is not None
        return self.identity

    def _ensure_ray(self) -> None:
        ident = self.identity
        if ident is None or not self.plan.may_run or self.version_mismatch():
            self.ray.stop()
            return
        self.ray_part.ensure(WorkerWants(ident, self.gpus.inventory, self.plan.model,
                                         # Paused (hours, heat) or quarantined by the
                                         # region's audits: Ray gets no GPU.
                                         offer_gpus=self.gpus.serving.serving is not False
                                         and self.session.quarantine is None,
                                         head_reachable=self.session.link.reachable is True,
                                         tunnel_ok=not self.overlay.tunnel_down))

    def version_mismatch(self) -> str | None:
        head = self.identity.head_versions if self.identity else None
        return self.versions.mismatch(head) if head else None

    # ------------------------------------------------------------ state

    def _update_drains(self) -> str | None:
        """Why the engine drains for an OS update (before it installs), or None: only where the
        update can install."""
        if self.updates.wants_drain:  # only ever where the update can install (updatepart.py)
            return f"draining for the OS update to {self.session.update_target}"
        return None

    def _update_state(self) -> None:
        ident = self.identity
        state, message = derive(Facts(
            joined=ident is not None, revoked=bool(ident and ident.revoked), enrollment=self.session.enrollment,
            version_mismatch=self.version_mismatch(), overlay_ready=self.overlay.interface_ready,
            overlay_down=self.overlay.tunnel_down,
            head_reachable=self.session.link.reachable, ray_running=self.ray.running,
            ray_alive_at_head=self.ray.alive_at_head, ray_note=self.ray.note,
            overlay_ip=ident.overlay_ip if ident else None,
            healthy_gpus=len(self.gpus.inventory.healthy_gpus), stopping=self._stopping,
            paused=self.gpus.serving.paused, gpu_notes=self.gpus.notes(),
            quarantine=(q.state, q.why) if (q := self.session.quarantine) else None,
        ))
        with self._lock:
            if (state, message) != (self.state, self.message):
                log.info("state %s: %s", state.value, message)
            self.state, self.message = state, message

    # ------------------------------------------------------------ what others read

    def snapshot(self) -> Status:
        """The status document served by the local API (keys documented in docs/node.md)."""
        ident = self.identity
        inv = self.gpus.inventory
        now = self.clock.monotonic()
        with self._lock:
            state, message = self.state, self.message
        link = self.session.link
        problems = self.health.statuses()
        engine = self.engine.snapshot()
        if self.assign.draining:  # a switch under way: the gateway sends this engine nothing new
            engine = dataclasses.replace(engine, draining=True)
        paused = self.gpus.serving.paused is not None or self.engine.draining
        return Status(
            state=state,
            message=message,
            node_id=ident.node_id if ident else None,
            name=ident.name if ident else self.session.node_name(),
            region=ident.region if ident else None,
            # Inside the bounds of core/wire.py, which `status` decodes with too.
            gpus=[dataclasses.replace(g, error=clip(g.error, 512)) for g in inv.gpus[:MAX_GPUS]],
            gpu_note=inv.nvml_error,
            driver_version=inv.driver_version,
            cuda_version=inv.cuda_version,
            overlay=self.overlay.status(ident),
            head=HeadStatus(
                api_url=ident.api_url if ident else None,
                reachable=link.reachable,
                last_contact_age_s=round(now - link.last_contact, 1) if link.last_contact is not None else None,
                error=link.last_error,
            ),
            ray=RayStatus(
                state=self.ray.state(self.version_mismatch() is not None),
                address=ident.ray_address if ident else None,
                alive_at_head=self.ray.alive_at_head,
                pid=self.ray.child.state.pid,
                restarts=self.ray.child.state.restarts,
                last_exit_code=self.ray.child.state.last_exit_code,
                resources=RayResources(GPU=len(inv.healthy_gpus), vram_mib=inv.vram_mib),
            ),
            engine=engine,
            versions=AgentVersions(agent=__version__, ray=self.versions.ray, python=self.versions.python),
            last_error=problems[0] if problems else None,
            agent=AgentInfo(pid=os.getpid(), uptime_s=round(now - self.started_at, 1)),
            tokens_served=self.session.tokens_served,
            serving=self.gpus.serving,
            problems=problems,
            placement=self.assign.facts(paused) if self.cfg.engine.enabled else None,
            assignment=self.session.assignment,
            quarantine=self.session.quarantine,
            update=self.updates.status(),
        )

    def _report(self) -> NodeReport:
        """What the head learns with each heartbeat (never a secret): one mapping, core/wire.py."""
        self.assign.reported()  # the announcement of a switch, if one is under way, goes with it
        return NodeReport.of(self.snapshot())
