"""`garage-node head run`: the control API over HTTPS, with the service it needs running beside
it — the WireGuard hub's peers kept equal to the registry, and the Ray head on the overlay.

The service starts and stops in the API's lifespan: uvicorn runs the server's lifecycle
(startup, main loop, shutdown on SIGTERM), and the hub and Ray head live exactly as long.
"""

from __future__ import annotations

import gc
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from dataclasses import replace

from garage_node.core import sdnotify, wireguard
from garage_node.core.backoff import Backoff
from garage_node.core.firewall import Firewall, Nftables, Rules
from garage_node.core.raycmd import RAY_PORTS, ray_env, ray_executable
from garage_node.core.supervise import Supervised
from garage_node.core.wire import HeartbeatExtras
from garage_node.head.api import ApiHooks, create_app
from garage_node.head.config import HeadConfig
from garage_node.head.connguard import GuardLimits, guarded_loop_factory, guarded_protocol
from garage_node.head.gcs import GcsStore, open_store
from garage_node.head.ray import HEALTH_CHECK_ENV, garage_ids, head_argv, parse_watch_line, watch_command
from garage_node.head.gateway.gateway import Gateway
from garage_node.head.listener import BackgroundServer, tls13_config
from garage_node.head.reports import Reports, with_extra
from garage_node.head.setup import RayToken, SetupError, open_registry, region_facts, require_init

log = logging.getLogger(__name__)

RAY_PROBE_S = 2.0
# How often the head hands memory freed after a load back to the system (see _trim_memory).
TRIM_EVERY_S = 30.0


class HeadService:
    """Everything `garage-node head run` keeps alive besides the HTTP server."""

    def __init__(self, cfg: HeadConfig, firewall: Firewall | None = None) -> None:
        self.cfg = cfg
        _fewer_malloc_arenas()  # before the API's worker threads exist
        _smaller_tls_buffers()  # before the first connection
        self.paths = require_init(cfg)
        # Heartbeats are held in memory and written in batches (registry.py); stop() writes the rest.
        self.registry = open_registry(cfg, batch_s=cfg.options.heartbeat_batch_s)
        self.facts = region_facts(cfg, self.paths)
        self.iface = wireguard.Interface(cfg.overlay.interface, cfg.overlay.implementation)
        self.ray_token = RayToken(self.paths.ray_token)
        self.ray_ports = replace(RAY_PORTS, gcs=cfg.ray.port)
        self.firewall = firewall or Nftables()
        # The PCs the audits quarantined (node ids; set to the gateway's trust store's view by
        # run()); their overlay addresses are refused Ray at the hub (core/firewall.py), and the
        # rules are applied again whenever that set changes.
        self.quarantined: Callable[[], frozenset[str]] = frozenset
        self._refused: tuple[str, ...] = ()
        self.gcs: GcsStore | None = None
        self.redis: Supervised | None = None
        if cfg.ray.gcs_fault_tolerance:
            self.gcs = open_store(cfg.head.state_dir / "redis", cfg.ray.redis_port, cfg.ray.redis_command)
            if self.gcs is None:
                log.warning("redis-server is not installed: the Ray head runs without GCS fault tolerance, so a "
                            "head restart makes every PC restart its Ray worker (scripts/install-deps installs it)")
            else:
                self.redis = Supervised("redis (Ray GCS store)", cfg.head.state_dir / "logs" / "redis.log",
                                        Backoff(1.0, 30.0), pid_file=self.gcs.paths.pid_file)
        self._redis_waiting_since: float | None = None
        self.ray = Supervised("ray head", self.paths.ray_log, Backoff(1.0, 30.0),
                              env={**ray_env(), **self.ray_token.env(), **HEALTH_CHECK_ENV,
                                   **(self.gcs.ray_env() if self.gcs else {})},
                              pid_file=cfg.head.state_dir / "ray-head.pid")
        self._ray_token_started: str | None = None
        self._watcher: subprocess.Popen | None = None
        self._membership_cleared = False  # since the Ray head last went down
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._reconciler = threading.Thread(target=self._loop, name="head-reconcile", daemon=True)
        self._prober = threading.Thread(target=self._probe_loop, name="ray-probe", daemon=True)

    # -- lifecycle

    def start(self) -> None:
        hub = self.facts.hub
        # The firewall first: Ray must never listen before its door is shut (raises FirewallError).
        self.firewall.apply(self.firewall_rules())
        self.iface.up(self.paths.wg_key.read_text().strip(), f"{hub.ip}/{self.facts.prefix_len}", self.cfg.overlay.listen_port)
        _enable_forwarding()
        # Whatever the last head's Ray said about its nodes is stale before anyone can ask
        # (written at once, not with the next batch: `head nodes` reads the file).
        self.registry.record_ray_membership(set())
        self.registry.flush()
        self.sync_peers()
        # Two loops: a Ray probe can block for seconds while the Ray head starts, and peer
        # sync must not wait for it (a new node's first handshake depends on it).
        self._reconciler.start()
        self._prober.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._reconciler.is_alive():
            self._reconciler.join(timeout=30)
        self.registry.close()  # first: the heartbeats still in memory, before the slow stops below
        self.ray.stop()
        if self.redis is not None:
            # After the GCS: what it wrote stays in Redis' file for the next head (SIGTERM makes
            # Redis write its append-only file out before it exits).
            self.redis.stop()
        self.iface.down()
        self.firewall.remove(self.firewall_rules().table)
        watcher = self._watcher
        if watcher is not None:
            watcher.kill()  # ends the prober's read of its output
        if self._prober.is_alive():
            self._prober.join(timeout=5)

    def peers_changed(self) -> None:
        self._wake.set()

    def firewall_rules(self) -> Rules:
        api = self.cfg.api
        return Rules(table=f"garage-head-{self.cfg.overlay.interface}", overlay_interface=self.cfg.overlay.interface,
                     overlay_cidr=self.cfg.overlay.cidr, ray_ports=tuple(self.ray_ports.ranges()),
                     open_tcp=tuple(sorted({api.port, *api.open_tcp, *self._gateway_ports(), *self._federation_ports()})),
                     hub=True,
                     refused=self._refused)

    def refuse_quarantined(self) -> bool:
        """Apply the firewall again if the quarantined PCs' overlay addresses changed (each
        reconcile pass: an operator's `head node` command writes the database from another
        process). True if the rules changed."""
        excluded = self.quarantined()
        refused = tuple(sorted(n.overlay_ip for n in self.registry.active_peers()
                               if n.id in excluded and _is_ipv4(n.overlay_ip)))
        if refused == self._refused:
            return False
        before, self._refused = self._refused, refused
        try:
            self.firewall.apply(self.firewall_rules())
        except Exception:
            self._refused = before  # tried again on the next pass
            raise
        log.info("firewall: %d quarantined PC(s) refused Ray at the hub%s", len(refused),
                 f" ({', '.join(refused)})" if refused else "")
        return True

    def _gateway_ports(self) -> tuple[int, ...]:
        # The OpenAI API is for everyone (its keys guard it); the metrics listener is opened
        # only if the operator put it on a non-loopback address on purpose.
        g = self.cfg.gateway
        if not g.enabled:
            return ()
        return (g.port,) + (() if g.metrics_host.startswith("127.") else (g.metrics_port,))

    def _federation_ports(self) -> tuple[int, ...]:
        # The other regions' heads reach this region's NATS (issue #21; password-protected).
        f = self.cfg.federation
        return (f.nats_port,) if f.enabled and self.cfg.gateway.enabled else ()

    # -- reconcile

    def _loop(self) -> None:
        trimmed = time.monotonic()
        while not self._stop.is_set():
            try:
                self.sync_peers()
                self.refuse_quarantined()
                self._ensure_ray()
                sdnotify.watchdog()
            except Exception:  # keep the head serving; the next pass retries
                log.exception("head reconcile pass failed")
            if time.monotonic() - trimmed > TRIM_EVERY_S:
                _trim_memory()
                trimmed = time.monotonic()
            self._wake.wait(self.cfg.options.peer_sync_s)
            self._wake.clear()

    def sync_peers(self) -> None:
        for gone in self.registry.reclaim_unconfirmed(self.cfg.options.reclaim_unconfirmed_after_s):
            log.info("reclaimed node %s (%s, %s): enrolled but never came back with its credential",
                     gone.id, gone.name, gone.overlay_ip)
        wanted = [wireguard.Peer(n.wg_public_key, (f"{n.overlay_ip}/32",)) for n in self.registry.active_peers()]
        added, removed = self.iface.sync_peers(wanted)
        if added or removed:
            log.info("hub peers: %d added or changed, %d removed", added, removed)

    def _ensure_ray(self) -> None:
        token = self.ray_token.value()
        if self.ray.running and token != self._ray_token_started:
            # `garage-node head ray-token rotate`: Ray reads its token at start only.
            log.info("the Ray cluster token changed: restarting the Ray head; nodes follow with their next heartbeat")
            self.ray.stop()
        if not self.ray.running:
            # A stale pointer file from the previous Ray head blocks a new one from starting.
            (self.cfg.ray.temp_dir / "ray_current_cluster").unlink(missing_ok=True)
            # What the last Ray head said is not what the next one will: no node is alive in
            # it until it says so. Once per outage, not on every pass while it is down.
            if not self._membership_cleared:
                self.registry.record_ray_membership(set())
                self.registry.flush()
                self._membership_cleared = True
        r = self.cfg.ray
        started = self.ray.running
        if not self._gcs_store_ready():
            return
        self.ray.ensure(head_argv(ray_executable(r.command), self.facts.hub.ip, self.ray_ports, r.temp_dir,
                                 self.cfg.head.region, r.num_cpus, r.memory_mib, r.object_store_mib,
                                 redis_password=self.gcs.password if self.gcs else ""))
        if self.ray.running and not started:
            self._ray_token_started = token
            self._membership_cleared = False

    def _gcs_store_ready(self) -> bool:
        """Redis running (restarted if it died) and, before a Ray head starts, answering: a
        GCS started on a store that is not there yet would begin a new cluster. True without
        fault tolerance."""
        if self.gcs is None or self.redis is None:
            return True
        if not self.redis.running:
            self.gcs.write_config()
        self.redis.ensure(self.gcs.argv())
        if self.ray.running:
            return True
        if self.redis.running and self.gcs.ready():
            self._redis_waiting_since = None
            return True
        now = time.monotonic()
        if self._redis_waiting_since is None:
            self._redis_waiting_since = now
        elif now - self._redis_waiting_since > 30:
            log.warning("the Ray head waits for its GCS store (redis on %s), which does not answer yet; see %s",
                        self.gcs.address, self.redis.log_path)
            self._redis_waiting_since = now
        return False

    def _probe_loop(self) -> None:
        """Record which nodes the Ray head holds alive (nodes learn it with their heartbeat),
        from one long-lived watch process; a new one whenever it ends."""
        while not self._stop.is_set():
            if not self.ray.running:
                self._stop.wait(RAY_PROBE_S)
                continue
            self._watch_membership()
            self._stop.wait(RAY_PROBE_S)

    def _watch_membership(self) -> None:
        proc = subprocess.Popen(watch_command(self.facts.ray_address, RAY_PROBE_S), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env={**os.environ, **self.ray_token.env()})
        self._watcher = proc
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if self._stop.is_set():
                    break
                try:
                    seen = parse_watch_line(line)
                except (ValueError, TypeError, KeyError, AttributeError):
                    continue
                # No answer is no node alive and no cluster id: a value older than the Ray head
                # it came from would let `head nodes` and the PCs believe in workers that are gone.
                alive, dead = garage_ids(seen.nodes) if seen else (set(), set())
                self.registry.record_ray_membership(alive, seen.cluster_id if seen else "", dead)
        finally:
            proc.kill()
            proc.wait()
            self._watcher = None


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _fewer_malloc_arenas() -> None:
    """glibc gives each thread that allocates its own malloc arena (up to 8 per core); the API
    runs handlers in up to 40 threads, and a thousand PCs' connections left the head at 400 MB
    after a load, most of it freed but scattered over those arenas. Two arenas hold the same
    work (the GIL runs one thread at a time anyway). M_ARENA_MAX is mallopt's -8."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-8, 2)


# Per TLS connection, asyncio keeps a receive buffer of SSLProtocol.max_size (256 KiB in Python
# 3.11), filled with zeros at once: with a thousand PCs each holding its kept-alive connection,
# that was 250 MB of the head's 390 MB. A TLS record is at most 16 KiB and a heartbeat 1-2 KB
# (bodies are capped at [api] max_body_bytes): 32 KiB reads lose nothing. Both listeners now run
# on uvloop, which allocates its buffer without touching it (1,000 PCs: 175 MB at most, as
# before); this still bounds every TLS connection on an asyncio loop in the head (its clients).
TLS_READ_BUFFER = 32 * 1024


def _smaller_tls_buffers() -> None:
    import asyncio.sslproto

    if getattr(asyncio.sslproto.SSLProtocol, "max_size", 0) > TLS_READ_BUFFER:
        asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER


def _trim_memory() -> None:
    """Return freed heap pages to the system, so the head's RSS comes back down after a load
    (a burst of enrollments or reconnections) instead of staying at its peak."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def settle_heap() -> None:
    """Once the head is up (imports done, its start-up objects made): collect once, then move
    everything alive into the permanent generation (gc.freeze), which collections never walk.
    Without it every full collection walked the ~76,000 objects of the imports and the app
    (FastAPI, pydantic, Ray's client, prometheus) and paused the head 77-151 ms every 10-30 s
    under the gateway's load (issue #22); objects made later are collected as before.
    Generation 0's threshold stays Python's 700: at 7,000, the gateway at 200 requests/s spent
    15 ms in collections per 6 s instead of 23, but its longest pause went from 1.7 to 3-8 ms
    (bench/gateway_load.py, one turn each on a shared 2-CPU machine): not a clear gain."""
    gc.collect()
    gc.freeze()


def _is_ipv4(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).version == 4
    except ValueError:
        return False


def _enable_forwarding() -> None:
    # Hub and spoke: node-to-node packets arrive on the hub interface and leave through it again.
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")


def run(cfg: HeadConfig) -> None:
    import uvicorn  # only the head needs it

    service = HeadService(cfg)
    p = service.paths
    reports = Reports()
    # Listeners beside the control API (the gateway, the fleet page), each built here and
    # started once the service is up; a listener that cannot bind stops the head with why.
    listeners: list[BackgroundServer] = []
    node_extras: Callable[[str], HeartbeatExtras] = lambda _node_id: HeartbeatExtras()  # noqa: E731
    gateway = None
    federation = None
    workers = None
    if cfg.gateway.enabled:
        gateway = Gateway(cfg.gateway, cfg.head.state_dir,
                          # Without the reports: the gateway asks every few seconds, on its loop.
                          lambda: {n.id: n.name for n in service.registry.active_peers()}, audit=cfg.audit)
        reports.subscribe(gateway.on_report)
        node_extras = gateway.node_extras
        from garage_node.head.federation.hooks import attach

        federation = attach(cfg, gateway)  # issue #21: None unless [federation] enabled
        listeners.extend(gateway_listeners(cfg, gateway, federation))
        if cfg.gateway.workers > 1:  # more processes on the gateway's port (issue #22)
            from garage_node.head.gateway.workers import GatewayWorkers

            workers = GatewayWorkers(gateway, guard_limits(cfg))
            reports.subscribe(workers.on_report)
    # The head decides what each PC serves (head/placement.py), from the region's catalog and
    # the gateway's demand; its part of each heartbeat's answer is the PC's assignment.
    from garage_node.head.placement import PlacementLoop

    placement = PlacementLoop(service.registry, cfg, gateway.demand.snapshot if gateway is not None else dict)
    if gateway is not None:
        gateway.placed = placement.placed  # requests for these wait while a model is placed
        placement.excluded = gateway.trust.excluded  # quarantined PCs are not counted as running
        gateway.metrics.watch_placement(placement)
        gateway.metrics.watch_trust(gateway.trust.snapshot)  # the audits' quarantines (issue #20)
        service.quarantined = gateway.trust.excluded  # refused Ray at the hub's firewall
    node_extras = with_extra(node_extras, "assignment", placement.assignment)
    # Rollouts of the stick's OS (head/rollout.py): every report feeds the rollout, and each
    # answer names the PC's update target; the operator's commands change its file.
    from garage_node.head.rolloutkeeper import RolloutKeeper
    from garage_node.head.rolloutstore import RolloutStore
    from garage_node.head.rolloutstore import database_path as rollout_db

    rollouts = RolloutKeeper(RolloutStore(rollout_db(cfg.head.state_dir), synchronous="NORMAL"))
    reports.subscribe(rollouts.on_report)
    node_extras = with_extra(node_extras, "update_target", rollouts.target)
    if cfg.fleet.enabled:
        # The operator's fleet page ([fleet]): a history fed by every accepted heartbeat.
        from garage_node.head.fleetpage import History
        from garage_node.head.fleetpage.listener import fleet_listener

        history = History(cfg.options.offline_after_s, window_s=cfg.fleet.history_hours * 3600)
        reports.subscribe(history.record)
        usage = gateway.ledger.node_totals_all if gateway is not None else None  # tokens served per PC
        listeners.append(fleet_listener(cfg, service.registry, history, p.pki, usage, placement.fleet_models,
                                        gateway.trust.snapshot if gateway is not None else None,
                                        rollout=rollouts.current))  # versions and the rollout (#19)

    def started() -> None:
        service.start()
        placement.start()
        rollouts.start()
        if gateway is not None:
            gateway.start()
        if federation is not None:
            federation.start()
        for listener in listeners:
            listener.start()
        if workers is not None:
            workers.start()  # after the head's own listener: it binds the port first
        settle_heap()
        sdnotify.ready(f"serving {cfg.api_url}, hub {service.facts.hub.ip} on {cfg.overlay.interface}")

    def stopping() -> None:
        sdnotify.stopping()
        if workers is not None:
            workers.stop()
        for listener in reversed(listeners):
            listener.stop()
        placement.stop()
        rollouts.stop()
        if federation is not None:
            federation.stop()  # its usage records not yet written, then its nats-server
        if gateway is not None:
            gateway.stop()  # the usage ledger's last batch
        service.stop()

    hooks = ApiHooks(on_change=service.peers_changed, on_startup=started, on_shutdown=stopping,
                     ray_token=service.ray_token.value, reports=reports, node_extras=node_extras,
                     on_heartbeat_s=gateway.on_heartbeat_s if gateway is not None else None)
    app = create_app(service.registry, service.facts, p.pki.ca_cert.read_bytes(), hooks,
                     max_body_bytes=cfg.api.max_body_bytes)
    # The region's model store (head/modelstore.py, in the state directory): enrolled PCs fetch
    # model weights from it over the overlay (head/api/store.py).
    from garage_node.head.api import store as store_api
    from garage_node.head.modelstore import ModelStore, store_root

    app.include_router(store_api.router(service.registry, ModelStore(store_root(cfg.head.state_dir))))
    # The operator's signed releases of the stick's OS (head/releases.py), fetched by PCs the same way.
    from garage_node.head.api import releases as releases_api
    from garage_node.head.releases import ReleaseStore, releases_root

    app.include_router(releases_api.router(service.registry, ReleaseStore(releases_root(cfg.head.state_dir))))
    # The API faces the internet: a deadline for every request, a cap on connections per
    # address, and a loop that bounds TLS handshakes (connguard.py). uvloop and httptools, as
    # the gateway: at 1,000 PCs the head took 29 % of a core instead of 37 %, and heartbeats'
    # p99 fell from 32 to 23 ms (#22, bench/head_scale.py --pin). The collector walks about as
    # many objects per kept-alive connection (~45: httptools' bound callbacks replace h11's state).
    limits = guard_limits(cfg)
    server = uvicorn.Server(tls13_config(  # TLS 1.3 only (listener.py)
        app, host=cfg.api.listen_host, port=cfg.api.port,
        ssl_certfile=str(p.pki.server_cert), ssl_keyfile=str(p.pki.server_key),
        log_level="info", access_log=False,
        # Longer than the heartbeat period: a node's connection is still open for its next
        # heartbeat (at uvicorn's default 5 s, 3-5 % of heartbeats met a closing connection).
        timeout_keep_alive=max(30, int(3 * cfg.options.heartbeat_s)),
        http=guarded_protocol(limits, fast=True), loop=guarded_loop_factory(limits, fast=True),
    ))
    # uvicorn finishes its shutdown (the lifespan above included), then raises again the signal
    # that stopped it; by then everything is cleaned up, so that signal means a clean exit.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    server.run()
    if not server.started:
        raise SetupError("the head could not start (the reason is in the log above)")


def guard_limits(cfg: HeadConfig) -> GuardLimits:
    """The guards of every listener facing the internet (the control API, the gateway and its
    workers): [api]'s request deadline, per-address cap and TLS handshake deadline."""
    return GuardLimits(request_timeout_s=cfg.api.request_timeout_s,
                       max_connections_per_client=cfg.api.max_connections_per_client,
                       tls_handshake_timeout_s=cfg.api.tls_handshake_timeout_s)


def gateway_listeners(cfg: HeadConfig, gateway: Gateway, federation: Any = None) -> list[BackgroundServer]:
    """The OpenAI API (facing users: the same guards as the control API) and the metrics."""
    import uvicorn
    from prometheus_client import make_asgi_app

    from garage_node.head.gateway.app import create_gateway_app
    from garage_node.head.gateway.serve import gateway_config

    g = cfg.gateway
    gateway_app = create_gateway_app(gateway)
    app: Any = gateway_app
    if federation is not None:  # spill-over to other regions in front of the gateway (issue #21)
        from garage_node.head.federation.hooks import wrap_app

        app = wrap_app(app, federation, gateway)
    api = gateway_config(g, guard_limits(cfg), app, gateway_app.admission.protocol_hook())
    metrics = uvicorn.Config(make_asgi_app(gateway.metrics.registry), host=g.metrics_host, port=g.metrics_port,
                             log_level="warning", access_log=False)
    return [BackgroundServer("gateway", api), BackgroundServer("metrics", metrics)]
