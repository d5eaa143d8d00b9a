"""The node agent (`garage-node run`): a reconcile loop, like a kubelet.

Each pass compares what should be (config, identity, what the head says) with what is (GPUs,
WireGuard interface, Ray worker) and takes the next idempotent step; the engine reconciles in
its own thread. Failures are retried with backoff and jitter and shown in status; nothing here
crashes the loop. The lifecycle has uvicorn's shape: `serve()` = `startup()`, `main_loop()`,
`shutdown()`.

Every edge is handed in (head API, WireGuard interface, Ray child process, engine manager,
GPU reader, clock), so unit tests run the agent's decisions in-process; the namespace, Docker
and QEMU suites run the same code on real parts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable

from garage_node import __version__
from garage_node.core import sdnotify, token
from garage_node.core.backoff import Backoff
from garage_node.core.clock import SYSTEM, Clock
from garage_node.core.firewall import Firewall, FirewallError, Nftables, Rules
from garage_node.core.fsutil import write_private
from garage_node.core.raycmd import RAY_PORTS, local_versions, ray_env
from garage_node.core.supervise import RunAs, Supervised
from garage_node.core.wire import MAX_GPUS, clip
from garage_node.core.wire import (AgentInfo, AgentVersions, EngineReport, HeadStatus, HeartbeatReply, NodeReport,
                                   NodeState, OverlayStatus, ProblemStatus, RayResources, RayStatus, Status,
                                   TokensServed)
from garage_node.core.wireguard import Interface, Peer, WireGuardError, public_key_of
from garage_node.node import gpu, identity, keys
from garage_node.node.config import NodeConfig
from garage_node.node.engine.manager import EngineManager
from garage_node.node.engine.spec import EngineConfigError, EngineSpec, desired_spec
from garage_node.node.headclient import BeatTimer, HeadApi, HeadError, Revoked
from garage_node.node.identity import Identity
from garage_node.node.paths import StatePaths
from garage_node.node.ray import Child, RayWorker, ray_worker_command, worker_argv, worker_labels
from garage_node.node.state import Facts, Problem, Source, derive
from garage_node.core.wire import ServingStatus
from garage_node.node.gpuguard import GpuGuard
from garage_node.node.schedule import Schedule, system_timezone

log = logging.getLogger(__name__)

FIREWALL_CHECK_S = 30.0  # rules flushed by someone else are put back within this
# The hub is pinged through the tunnel this often; this many misses in a row mean the overlay
# is down (a blocked UDP port, a dead tunnel) even while HTTPS to the head still works.
HUB_PROBE_S = 5.0
HUB_MISSES = 2
# Supplementary groups of the Ray worker's account, where they exist: GPU device nodes.
RAY_GROUPS = ("video", "render")


@dataclass
class HeadLink:
    """The node's view of its head, from the last enrollment or heartbeat (monotonic times)."""

    reachable: bool | None = None  # None: not asked yet
    last_contact: float | None = None
    last_error: str | None = None
    next_call: float = 0.0


class Agent:
    def __init__(self, cfg: NodeConfig, *, clock: Clock = SYSTEM, head_api: HeadApi | None = None,
                 iface: Interface | None = None, ray_child: Child | None = None,
                 engine: Callable[..., EngineManager] | None = None,
                 read_inventory: Callable[[], gpu.Inventory] = gpu.read_inventory,
                 firewall: Firewall | None = None,
                 lookup_account: Callable[[str, tuple[str, ...]], RunAs] = RunAs.lookup,
                 probe_hub: Callable[[str], bool] | None = None,
                 nvml: gpu.NvmlSession | None = None, beats: BeatTimer | None = None) -> None:
        self.cfg = cfg
        self.clock = clock
        self.paths = StatePaths(cfg.node.state_dir)
        self.head_api = head_api or HeadApi()
        self.iface = iface or Interface(cfg.overlay.interface, cfg.overlay.implementation)
        self.firewall = firewall or Nftables()
        self.lookup_account = lookup_account
        self.probe_hub = probe_hub or _ping
        # Ray authenticates every client with the cluster token; the worker reads it from a
        # file only its own account can read (never from the command line).
        # The runtime directory is root's (0755): the worker's account can read its own file
        # there but cannot plant anything root would then write through.
        self.ray_token_path = cfg.node.runtime_dir / "ray-token"
        ray_auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.ray_token_path)}
        self.ray = RayWorker(ray_child or Supervised(
            "ray worker", self.paths.logs / "ray-worker.log", self._backoff(), env={**ray_env(), **ray_auth},
            pid_file=cfg.node.runtime_dir / "ray-worker.pid", clock=clock), clock)
        # The engine asks the agent what it should run; `engine` builds it (tests hand in one
        # with a fake Docker): engine(cfg.engine, drain_flag, desired, clock=...).
        self.engine = (engine or EngineManager)(cfg.engine, self.paths.drain_flag, self._engine_desired, clock=clock)
        self.read_inventory = read_inventory
        # Serving hours, power and heat, per-GPU faults (the owner's [schedule] and [gpu]).
        self.nvml = nvml or gpu.NvmlSession()
        self.guard = GpuGuard(cfg.gpu.max_temp_c, cfg.gpu.resume_below_c)
        self.schedule = Schedule(cfg.schedule.windows, _zone(cfg.schedule.timezone))
        self.serving = ServingStatus()
        self._raw_inventory = gpu.Inventory()  # NVML's last reading, before the guard's judgement
        self._power_notes: dict[int, str] = {}
        self.versions = local_versions()
        self.started_at = clock.monotonic()
        self.identity: Identity | None = None
        self.inventory = gpu.Inventory()
        self.link = HeadLink()
        self.tokens_served: TokensServed | None = None  # as the head's last answer said
        self.problem: Problem | None = None
        self.state, self.message = NodeState.STARTING, "starting"
        self._enrollment: tuple[NodeState, str] | None = None  # what the enrollment step last said
        self._stopping = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._gpus_read_at: float | None = None
        self._head_backoff = self._backoff()
        self._refused_token: str | None = None  # hash of a token the head refused for good
        self._renew_at: float | None = None  # when to renew the credential (monotonic); None: not known yet
        self._renew_backoff = self._backoff()
        self._client: Any = None  # the head client of the current identity
        self._overlay_ready = False  # interface up with the hub peer set, by this process
        self._firewall: tuple[Rules, float] | None = None  # rules applied, and when last checked
        self._hub_misses = 0
        self._next_hub_probe = 0.0
        # Heartbeats spread over time (headclient.py); a test gives a seeded one, so the number
        # of heartbeats in a stretch of its clock is the same on every run.
        self._beat_timer = beats or BeatTimer()
        self._ray_account: RunAs | None = None
        self._ray_token_written: str | None = None  # digest of the token in the worker's file

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
        self._tell_head_now()
        self.engine.shutdown()
        self.nvml.close()  # power limits back to the cards' defaults
        self.ray.stop()
        self.iface.down()
        self._remove_firewall()
        if self._client:
            self._client.close()
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
            self._refresh_gpus()
            if not self._member():
                self._enroll()
            if self._member():
                self._ensure_overlay()
                self._ensure_firewall()
                self._probe_overlay()
                self._heartbeat_if_due()
                self._renew_credential_if_due()
                self._ensure_ray()
        except Exception as e:  # the loop must survive anything; the next pass retries
            log.exception("reconcile pass failed")
            self._fail(Source.INTERNAL, f"internal error: {e}",
                       "this is a bug; the agent keeps retrying. Report it with `journalctl -u garage-node`.")
        self._update_state()
        sdnotify.status(self.message)
        sdnotify.watchdog()

    def _member(self) -> bool:
        return self.identity is not None and not self.identity.revoked

    def _refresh_gpus(self) -> None:
        now = self.clock.monotonic()
        # Xid events are queued by NVML; asked for on every pass (it never waits) so a card
        # that faults leaves the plan within a pass, not a refresh period.
        xids = self.nvml.xids()
        due = self._gpus_read_at is None or now - self._gpus_read_at >= self.cfg.gpu.refresh_s
        if due:
            self._raw_inventory = self._with_power_limits(self.read_inventory())
            self._gpus_read_at = now
            self.nvml.watch([g.index for g in self._raw_inventory.gpus if g.healthy])
        if due or xids:
            self.inventory = self.guard.observe(self._raw_inventory, xids)
        self._decide_serving()

    def _with_power_limits(self, inv: gpu.Inventory) -> gpu.Inventory:
        """[gpu] power_limit_w on every healthy GPU (NVML keeps it; re-set only if changed)."""
        watts = self.cfg.gpu.power_limit_w
        if not watts:
            return inv
        gpus = []
        for g in inv.gpus:
            if g.healthy and g.index not in self.guard.quarantined:
                result = self.nvml.set_power_limit(g.index, watts)
                if result.note and self._power_notes.get(g.index) != result.note:
                    log.warning("%s", result.note)
                self._power_notes[g.index] = result.note
                if result.applied_w is not None:
                    g = dataclasses.replace(g, power_limit_w=result.applied_w)
            gpus.append(g)
        return dataclasses.replace(inv, gpus=tuple(gpus))

    def _decide_serving(self) -> None:
        """Serve now? The owner's hours first, then heat on the GPUs the engine uses. The engine
        drains for either and comes back by itself; the owner's own drain stays the owner's."""
        g = self.cfg.gpu
        hours = self.schedule.at(self.clock.time())
        paused = None if hours.serving else f"outside serving hours until {hours.until_text()}"
        paused = paused or self.guard.heat_reason(self._engine_gpus())
        self.engine.hold(paused)
        notes = sorted({n for n in self._power_notes.values() if n})
        self.serving = ServingStatus(
            serving=paused is None, paused=clip(paused, 512),
            until=hours.until.timestamp() if hours.until else None,
            schedule=clip(_schedule_words(self.cfg.schedule.windows, self.schedule.tz), 512),
            max_temp_c=g.max_temp_c or None, resume_temp_c=g.resume_below_c if g.max_temp_c else None,
            power_limit_w=g.power_limit_w or None, power_note=clip("; ".join(notes), 512) if notes else None)

    def _engine_gpus(self) -> tuple[int, ...]:
        """The GPU indices the engine runs on (or would), per the planner; () if none."""
        if not self.cfg.engine.enabled:
            return ()
        try:
            wanted = self._engine_desired()
        except EngineConfigError:
            return ()
        return tuple(int(i) for i in wanted[0].gpu_ids) if wanted else ()

    # -- enrollment

    def _pending_token(self) -> tuple[str, str] | None:
        """(token text, where it came from): the one `garage-node join` stored wins over config."""
        if self.paths.join_token.exists():
            return self.paths.join_token.read_text().strip(), str(self.paths.join_token)
        if self.cfg.node.join_token:
            return self.cfg.node.join_token, "config [node] join_token"
        return None

    def _enroll(self) -> None:
        pending = self._pending_token()
        if pending is None:
            if self.identity is None:
                self._enrollment = (NodeState.NEEDS_TOKEN, "waiting for a join token")
                self._fail(Source.ENROLL, "this PC has not joined a region yet",
                           "put the join token in garage.toml ([node] join_token) or run `garage-node join TOKEN`")
            return
        text, source = pending
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest == self._refused_token or self.clock.monotonic() < self.link.next_call:
            return
        if self.identity is not None and digest == self.identity.token_digest:
            return  # revoked, and this is the token it joined with: wait for a new one
        try:
            tok = token.parse(text)
        except token.TokenError as e:
            self._refused_token = digest
            self._fail(Source.ENROLL, f"the join token in {source} is unusable: {e}", "")
            self._enrollment = (NodeState.ERROR, "the join token is unusable")
            return
        self._enrollment = (NodeState.ENROLLING, f"enrolling with the head at {tok.api_url}")
        # The key is stored before the head hears of it: after a crash here, the same token and
        # key get the same identity back instead of spending the token again (node/keys.py).
        wg_key = keys.pending_key(self.paths.enroll_key, digest, avoid=self.identity.wg_private_key if self.identity else "")
        try:
            ident, ca_pem = self.head_api.enroll(tok, self._node_name(), self._report(), wg_key, self.cfg.node.region)
        except HeadError as e:
            if e.code == "key_in_use":
                keys.done(self.paths.enroll_key)  # a new token then comes with a new key
            self._enroll_failed(e, digest)
            return
        ident = dataclasses.replace(ident, token_digest=digest)
        identity.save(self.paths, ident, ca_pem)
        keys.done(self.paths.enroll_key)
        self.paths.join_token.unlink(missing_ok=True)
        self._replace_identity(ident)
        self._head_backoff.reset()
        self.link = HeadLink(reachable=True, last_contact=self.clock.monotonic())
        self.problem = None
        self._enrollment = None
        log.info("enrolled as node %s with overlay address %s", ident.node_id, ident.overlay_ip)

    def _enroll_failed(self, e: HeadError, digest: str) -> None:
        self.link.reachable = e.code != "unreachable" if e.code else None
        if e.retry:
            delay = self._head_backoff.next_delay()
            self.link.next_call = self.clock.monotonic() + delay
            self._fail(Source.ENROLL, str(e), "check that the head is running and reachable from this PC", retry_in=delay)
            self._enrollment = (NodeState.ENROLLING, str(e))
        else:
            self._refused_token = digest
            self._fail(Source.ENROLL, str(e), "get a new join token from the operator and run `garage-node join TOKEN`")
            self._enrollment = (NodeState.ERROR, str(e))

    def _replace_identity(self, ident: Identity) -> None:
        old = self.identity
        if old is not None and old.wg_private_key != ident.wg_private_key:
            self.ray.stop()
            self.iface.down()
            self._overlay_ready = False
        self.identity = ident
        if self._client:
            self._client.close()
            self._client = None

    def _node_name(self) -> str:
        return self.cfg.node.name or socket.gethostname().split(".")[0]

    # -- overlay

    def _probe_overlay(self) -> None:
        """Is the tunnel really carrying traffic? A ping to the hub's overlay address, every few
        seconds: the interface and a handshake that once happened prove nothing when UDP to the
        hub is blocked while HTTPS to the head still gets through."""
        now = self.clock.monotonic()
        if not self._overlay_ready or now < self._next_hub_probe:
            return
        self._next_hub_probe = now + HUB_PROBE_S
        ident = self.identity
        assert ident is not None
        if self.probe_hub(ident.hub_ip):
            if self._hub_misses >= HUB_MISSES:
                log.info("the hub answers through the overlay again")
            self._hub_misses = 0
            self._clear(Source.TUNNEL)
            return
        self._hub_misses += 1
        if self._hub_misses >= HUB_MISSES:
            self._fail(Source.TUNNEL, f"overlay down: the hub {ident.hub_ip} does not answer through WireGuard "
                       f"({self._hub_misses} pings missed)",
                       f"check that UDP to {ident.hub_endpoint} is not blocked (router, firewall); the node keeps "
                       "trying by itself")

    def _overlay_down(self) -> bool:
        return self._overlay_ready and self._hub_misses >= HUB_MISSES

    def _ensure_overlay(self) -> None:
        ident = self.identity
        assert ident is not None
        if self._overlay_ready and self.iface.exists():
            return
        try:
            self.iface.up(ident.wg_private_key, f"{ident.overlay_ip}/{ident.prefix_len}")
            # Hub and spoke: the whole overlay is reached through the head.
            network = f"{ident.hub_ip}/{ident.prefix_len}"
            self.iface.set_peer(Peer(ident.hub_public_key, (network,), ident.hub_endpoint, self.cfg.overlay.keepalive_s))
            self._overlay_ready = True
            self._clear(Source.OVERLAY)
        except WireGuardError as e:
            self._overlay_ready = False
            self._fail(Source.OVERLAY, f"overlay interface {self.iface.name} could not be set up: {e}", "")

    # -- heartbeat

    def _tell_head_now(self) -> None:
        """One last heartbeat on the way down, so the head knows at once (best effort)."""
        if self._member() and self._overlay_ready:
            self.link.next_call = 0.0
            self._heartbeat_if_due()

    def _heartbeat_if_due(self) -> None:
        if self.clock.monotonic() < self.link.next_call:
            return
        try:
            reply = self._head_client().heartbeat(self._report())
        except Revoked as e:
            self._revoked(str(e))
        except HeadError as e:
            self._head_unreachable(str(e))
        else:
            self._heartbeat_ok(reply)

    def _heartbeat_ok(self, reply: HeartbeatReply) -> None:
        now = self.clock.monotonic()
        self.link.reachable, self.link.last_contact, self.link.last_error = True, now, None
        self.ray.head_says(reply.ray_alive, reply.ray_cluster_id)
        self._head_backoff.reset()
        ident = self.identity
        assert ident is not None
        updated = ident.with_region(reply)
        hub_moved = updated != ident
        if reply.ray_token:  # rotated at the head: the worker restarts with the new one
            updated = dataclasses.replace(updated, ray_token=reply.ray_token)
        if reply.engine_api_key:  # a new key replaces the engine container (its spec changes)
            updated = dataclasses.replace(updated, engine_api_key=reply.engine_api_key)
        self.tokens_served = reply.tokens_served
        if updated != ident:
            identity.save(self.paths, updated)
            self.identity = updated
        if hub_moved:
            self._overlay_ready = False  # re-apply the hub peer
        self.link.next_call = now + self._beat_timer.next_in(updated.heartbeat_s)  # jittered: see BeatTimer
        self._clear(Source.HEAD)
        if reply.credential_expires_in_s is not None and reply.credential_lifetime_s:
            self._renew_at = now + _renew_in(reply.credential_expires_in_s, reply.credential_lifetime_s)

    # -- credential renewal

    def _renew_credential_if_due(self) -> None:
        """Renew the credential (and the WireGuard key with it) when a third of its lifetime is
        left, over the authenticated channel; also finish a rotation a crash interrupted."""
        ident = self.identity
        if not self._member() or self.link.reachable is not True or ident is None:
            return
        now = self.clock.monotonic()
        interrupted = self.paths.rotate_key.exists()
        if not interrupted and (self._renew_at is None or now < self._renew_at):
            return
        new_key = keys.pending_key(self.paths.rotate_key, ident.node_id, avoid=ident.wg_private_key)
        try:
            reply = self._head_client().renew_credential(public_key_of(new_key))
        except Revoked as e:
            self._revoked(str(e))
            return
        except HeadError as e:
            if e.code == "key_in_use":
                keys.done(self.paths.rotate_key)  # the next try makes another key
            delay = self._renew_backoff.next_delay()
            self._renew_at = now + delay
            log.warning("renewing this node's credential failed, trying again in %.0f s: %s", delay, e)
            return
        updated = dataclasses.replace(ident, credential=reply.credential, wg_private_key=new_key)
        identity.save(self.paths, updated)
        keys.done(self.paths.rotate_key)
        self.identity = updated
        if self._client is not None:
            self._client.ident = updated
        self._renew_backoff.reset()
        self._renew_at = now + _renew_in(reply.credential_expires_in_s, reply.credential_lifetime_s)
        # The hub has the new public key already: give the interface the new private key now.
        self._overlay_ready = False
        self._ensure_overlay()
        log.info("renewed this node's credential and WireGuard key")

    def _head_unreachable(self, message: str) -> None:
        delay = min(self._head_backoff.next_delay(), self.identity.heartbeat_s if self.identity else 10.0)
        self.link.next_call = self.clock.monotonic() + delay
        self.link.reachable, self.link.last_error = False, message
        self._fail(Source.HEAD, message, "check that the head is running; the node keeps its place and rejoins by itself",
                   retry_in=delay)

    def _revoked(self, message: str) -> None:
        ident = self.identity
        assert ident is not None
        log.warning("the head revoked this node: %s", message)
        self.engine.stand_down()
        self.ray.stop()
        self.iface.down()
        self._overlay_ready = False
        self._remove_firewall()
        self.identity = dataclasses.replace(ident, revoked=True)
        identity.save(self.paths, self.identity)
        self.link.reachable = True
        self._fail(Source.HEAD, f"revoked: {message}", "ask the operator for a new join token and run `garage-node join TOKEN`")

    def _head_client(self):
        if self._client is None:
            assert self.identity is not None
            self._client = self.head_api.connect(self.identity, self.paths.head_ca.read_bytes())
        return self._client

    # -- Ray

    def version_mismatch(self) -> str | None:
        head = self.identity.head_versions if self.identity else None
        return self.versions.mismatch(head) if head else None

    def _ensure_ray(self) -> None:
        ident = self.identity
        assert ident is not None
        if not (self._overlay_ready and self._firewall_up()) or self.version_mismatch() or not ident.ray_token:
            self.ray.stop()
            return
        account = self._ray_worker_account()
        if account is None:
            self.ray.stop()
            return
        self.ray.child.run_as = account
        token_digest = self._write_ray_token(ident.ray_token, account)
        r = self.cfg.ray
        _own_dir(r.temp_dir, account)
        labels = worker_labels(ident.node_id, ident.region, self.inventory, self._engine_model())
        argv = worker_argv(ray_worker_command(r.command), ident.ray_address, ident.overlay_ip, r.temp_dir, labels,
                           self.inventory, r.num_cpus, r.memory_mib, r.object_store_mib, ports=RAY_PORTS,
                           offer_gpus=self.serving.serving)
        self.ray.run(argv, head_reachable=self.link.reachable is True, generation=token_digest)

    def _ray_worker_account(self) -> RunAs | None:
        """The unprivileged account for Ray (looked up once); None, with a problem, if missing."""
        if self._ray_account is None:
            user = self.cfg.ray.user
            try:
                account = self.lookup_account(user, RAY_GROUPS)
            except KeyError:
                self._fail(Source.RAY, f"the Ray worker's account '{user}' does not exist, so Ray is not started "
                           "(Ray tasks never run as root on this PC)",
                           f"create it: useradd --system --create-home --home-dir /var/lib/{user} "
                           f"--shell /usr/sbin/nologin {user}  (or set [ray] user)")
                return None
            if account.uid == 0:
                self._fail(Source.RAY, f"[ray] user '{user}' is root: Ray tasks must not run as root on a PC",
                           "set [ray] user to an unprivileged account")
                return None
            self._ray_account = account
            self._clear(Source.RAY)
        return self._ray_account

    def _write_ray_token(self, token_text: str, account: RunAs) -> str:
        digest = hashlib.sha256(token_text.encode()).hexdigest()
        path = self.ray_token_path
        if digest != self._ray_token_written or not path.exists():
            write_private(path, token_text.encode())
            if os.geteuid() == 0:
                os.chown(path, account.uid, account.gid)
            self._ray_token_written = digest
        return digest

    # -- firewall

    def _firewall_rules(self, ident: Identity) -> Rules:
        net = ipaddress.ip_network(f"{ident.hub_ip}/{ident.prefix_len}", strict=False)
        ray = tuple(RAY_PORTS.ranges())
        closed = None if self.cfg.overlay.firewall == "all-tcp" else ray + ((self.cfg.engine.port, self.cfg.engine.port),)
        return Rules(table=f"garage-node-{self.iface.name}", overlay_interface=self.iface.name, overlay_cidr=str(net),
                     ray_ports=ray, open_tcp=self.cfg.overlay.open_tcp, closed_tcp=closed)

    def _ensure_firewall(self) -> None:
        """Ray and the engine listen on every address: shut every door but WireGuard first."""
        ident = self.identity
        assert ident is not None
        rules = self._firewall_rules(ident)
        now = self.clock.monotonic()
        applied = self._firewall
        try:
            if applied and applied[0] == rules:
                if now - applied[1] < FIREWALL_CHECK_S:
                    return
                if self.firewall.present(rules.table):
                    self._firewall = (rules, now)
                    return
                log.warning("the firewall table %s is gone; putting it back", rules.table)
            self.firewall.apply(rules)
            self._firewall = (rules, now)
            self._clear(Source.FIREWALL)
        except FirewallError as e:
            self._firewall = None
            self._fail(Source.FIREWALL, f"the firewall could not be set up, so Ray and the engine stay stopped: {e}", "")

    def _firewall_up(self) -> bool:
        return self._firewall is not None

    def _remove_firewall(self) -> None:
        if self._firewall is None:
            return
        try:
            self.firewall.remove(self._firewall[0].table)
        except FirewallError as e:
            log.warning("could not remove the firewall: %s", e)
        self._firewall = None

    # -- engine

    def _engine_desired(self) -> tuple[EngineSpec, str] | None:
        """What the engine should run; None until the node has joined (it binds the overlay address)."""
        ident = self.identity
        if ident is None or ident.revoked or not self._overlay_ready or not self._firewall_up():
            return None
        return desired_spec(self.cfg.engine, self.inventory, ident.overlay_ip, ident.engine_api_key)

    def _engine_model(self) -> str | None:
        if not self.cfg.engine.enabled:
            return None
        try:
            wanted = self._engine_desired()
        except EngineConfigError:
            return None
        return wanted[0].model if wanted else None

    # ------------------------------------------------------------ state

    def _fail(self, source: Source, message: str, hint: str, retry_in: float | None = None) -> None:
        """Record the problem status shows; log it once, not on every retry."""
        now = self.clock.monotonic()
        if self.problem is None or self.problem.message != message:
            log.warning("%s", message)
            self.problem = Problem(message, hint, source, at=now)
        self.problem.retry_at = now + retry_in if retry_in is not None else None

    def _clear(self, source: Source) -> None:
        if self.problem is not None and self.problem.source is source:
            self.problem = None

    def _update_state(self) -> None:
        ident = self.identity
        state, message = derive(Facts(
            joined=ident is not None, revoked=bool(ident and ident.revoked), enrollment=self._enrollment,
            version_mismatch=self.version_mismatch(), overlay_ready=self._overlay_ready,
            overlay_down=self._overlay_down(),
            head_reachable=self.link.reachable, ray_running=self.ray.running,
            ray_alive_at_head=self.ray.alive_at_head, overlay_ip=ident.overlay_ip if ident else None,
            healthy_gpus=len(self.inventory.healthy_gpus), stopping=self._stopping,
            paused=self.serving.paused, gpu_notes=tuple(self.guard.notes()),
        ))
        with self._lock:
            if (state, message) != (self.state, self.message):
                log.info("state %s: %s", state.value, message)
            self.state, self.message = state, message

    # ------------------------------------------------------------ what others read

    def snapshot(self) -> Status:
        """The status document served by the local API (keys documented in the README)."""
        ident = self.identity
        inv = self.inventory
        now = self.clock.monotonic()
        with self._lock:
            state, message = self.state, self.message
        link = self.link
        return Status(
            state=state,
            message=message,
            node_id=ident.node_id if ident else None,
            name=ident.name if ident else self._node_name(),
            region=ident.region if ident else None,
            # Inside the bounds of core/wire.py, which `status` decodes with too.
            gpus=[dataclasses.replace(g, error=clip(g.error, 512)) for g in inv.gpus[:MAX_GPUS]],
            gpu_note=inv.nvml_error,
            driver_version=inv.driver_version,
            cuda_version=inv.cuda_version,
            overlay=self._overlay_status(),
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
            engine=self.engine.snapshot(),
            versions=AgentVersions(agent=__version__, ray=self.versions.ray, python=self.versions.python),
            last_error=self._problem_status(now),
            agent=AgentInfo(pid=os.getpid(), uptime_s=round(now - self.started_at, 1)),
            tokens_served=self.tokens_served,
            serving=self.serving,
        )

    def _report(self) -> NodeReport:
        """What the head learns with each heartbeat (never a secret)."""
        s = self.snapshot()
        e = s.engine
        # Inside the bounds the head checks (core/wire.py): a long message must not cost the heartbeat.
        return NodeReport(
            state=s.state, message=clip(s.message, 512), gpus=s.gpus, gpu_note=clip(s.gpu_note, 512),
            driver_version=s.driver_version, cuda_version=s.cuda_version, versions=s.versions, ray=s.ray,
            serving=s.serving,
            # Paused for the owner's hours or heat: no new work, as with the owner's drain.
            engine=EngineReport(state=e.state, model=e.model, endpoint=e.endpoint, draining=e.draining or bool(e.paused),
                                healthy_since=e.healthy_since, requests_running=e.requests_running,
                                requests_waiting=e.requests_waiting, kv_cache_usage_pct=e.kv_cache_usage_pct,
                                generation_tokens_per_s=e.generation_tokens_per_s),
        )

    def _problem_status(self, now: float) -> ProblemStatus | None:
        p = self.problem
        if p is None:
            return None
        retry = round(max(0.0, p.retry_at - now), 1) if p.retry_at is not None else None
        return ProblemStatus(message=p.message, hint=p.hint, age_s=round(now - p.at, 1), retry_in_s=retry)

    def _overlay_status(self) -> OverlayStatus:
        ident = self.identity
        up = self.iface.exists()
        age = None
        if up and ident:
            try:
                hub = next((p for p in self.iface.peers() if p.public_key == ident.hub_public_key), None)
                # WireGuard reports handshakes in wall-clock time.
                age = hub.handshake_age_s(self.clock.time()) if hub else None
            except WireGuardError:
                pass
        return OverlayStatus(
            interface=self.iface.name, up=up,
            address=ident.overlay_ip if ident else None,
            hub_ip=ident.hub_ip if ident else None,
            hub_endpoint=ident.hub_endpoint if ident else None,
            handshake_age_s=round(age, 1) if age is not None else None,
        )


def _own_dir(path, account: RunAs) -> None:
    """Ray's temp dir belongs to the Ray worker's account (it writes sessions and sockets there)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0 and path.stat().st_uid != account.uid:
        for root, dirs, files in os.walk(path):
            for name in (root, *(os.path.join(root, n) for n in dirs + files)):
                try:
                    os.lchown(name, account.uid, account.gid)
                except FileNotFoundError:
                    pass


def _zone(name: str):
    from zoneinfo import ZoneInfo

    return ZoneInfo(name) if name else system_timezone()


def _schedule_words(windows: tuple[str, ...], tz) -> str:
    return f"{', '.join(windows)} ({tz})" if windows else "always"


def _renew_in(expires_in_s: float, lifetime_s: float) -> float:
    """Seconds until a renewal is due: when a third of the credential's lifetime is left."""
    return max(0.0, expires_in_s - lifetime_s / 3)


def _ping(ip: str) -> bool:
    """One ICMP echo to `ip` (the hub's overlay address, routed through WireGuard), 2 s to answer."""
    import subprocess

    try:
        return subprocess.run(["ping", "-n", "-q", "-c", "1", "-W", "2", ip], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
