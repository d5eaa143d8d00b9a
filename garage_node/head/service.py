"""`garage-node head run`: the control API over HTTPS, with the service it needs running beside
it — the WireGuard hub's peers kept equal to the registry, and the Ray head on the overlay.

The service starts and stops in the API's lifespan: uvicorn runs the server's lifecycle
(startup, main loop, shutdown on SIGTERM), and the hub and Ray head live exactly as long.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from dataclasses import replace

from garage_node.core import sdnotify, wireguard
from garage_node.core.backoff import Backoff
from garage_node.core.firewall import Firewall, Nftables, Rules
from garage_node.core.raycmd import RAY_PORTS, ray_env, ray_executable
from garage_node.core.supervise import Supervised
from garage_node.head.api import create_app
from garage_node.head.config import HeadConfig
from garage_node.head.connguard import GuardLimits, guarded_loop_factory, guarded_protocol
from garage_node.head.ray import head_argv, parse_watch_line, watch_command
from garage_node.head.setup import HeadError, RayToken, open_registry, region_facts, require_init

log = logging.getLogger(__name__)

RAY_PROBE_S = 2.0


class HeadService:
    """Everything `garage-node head run` keeps alive besides the HTTP server."""

    def __init__(self, cfg: HeadConfig, firewall: Firewall | None = None) -> None:
        self.cfg = cfg
        self.paths = require_init(cfg)
        self.registry = open_registry(cfg)
        self.facts = region_facts(cfg, self.paths)
        self.iface = wireguard.Interface(cfg.overlay.interface, cfg.overlay.implementation)
        self.ray_token = RayToken(self.paths.ray_token)
        self.ray_ports = replace(RAY_PORTS, gcs=cfg.ray.port)
        self.firewall = firewall or Nftables()
        self.ray = Supervised("ray head", self.paths.ray_log, Backoff(1.0, 30.0),
                              env={**ray_env(), **self.ray_token.env()}, pid_file=cfg.head.state_dir / "ray-head.pid")
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
        # Whatever the last head's Ray said about its nodes is stale before anyone can ask.
        self.registry.record_ray_membership(set())
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
        self.ray.stop()
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
                     open_tcp=tuple(sorted({api.port, *api.open_tcp})), hub=True)

    # -- reconcile

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_peers()
                self._ensure_ray()
                sdnotify.watchdog()
            except Exception:  # keep the head serving; the next pass retries
                log.exception("head reconcile pass failed")
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
                self._membership_cleared = True
        r = self.cfg.ray
        started = self.ray.running
        self.ray.ensure(head_argv(ray_executable(r.command), self.facts.hub.ip, self.ray_ports, r.temp_dir,
                                 self.cfg.head.region, r.num_cpus, r.memory_mib, r.object_store_mib))
        if self.ray.running and not started:
            self._ray_token_started = token
            self._membership_cleared = False

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
                    nodes = parse_watch_line(line)
                except (ValueError, TypeError):
                    continue
                # No answer is no node alive: a value older than the Ray head it came from
                # would let `head nodes` and the PCs believe in workers that are gone.
                alive = {n.labels.get("garage.node_id", "") for n in nodes or [] if n.alive and not n.is_head}
                self.registry.record_ray_membership(alive)
        finally:
            proc.kill()
            proc.wait()
            self._watcher = None


def _enable_forwarding() -> None:
    # Hub and spoke: node-to-node packets arrive on the hub interface and leave through it again.
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")


def run(cfg: HeadConfig) -> None:
    import uvicorn  # only the head needs it

    service = HeadService(cfg)
    p = service.paths

    def started() -> None:
        service.start()
        sdnotify.ready(f"serving {cfg.api_url}, hub {service.facts.hub.ip} on {cfg.overlay.interface}")

    def stopping() -> None:
        sdnotify.stopping()
        service.stop()

    app = create_app(service.registry, service.facts, p.pki.ca_cert.read_bytes(), service.peers_changed,
                     on_startup=started, on_shutdown=stopping, ray_token=service.ray_token.value,
                     max_body_bytes=cfg.api.max_body_bytes)
    # The API faces the internet: uvicorn's h11 protocol with a deadline for every request and
    # a cap on connections per address, and a loop that bounds TLS handshakes (connguard.py).
    limits = GuardLimits(request_timeout_s=cfg.api.request_timeout_s,
                         max_connections_per_client=cfg.api.max_connections_per_client,
                         tls_handshake_timeout_s=cfg.api.tls_handshake_timeout_s)
    server = uvicorn.Server(uvicorn.Config(
        app, host=cfg.api.listen_host, port=cfg.api.port,
        ssl_certfile=str(p.pki.server_cert), ssl_keyfile=str(p.pki.server_key),
        log_level="info", access_log=False,
        # Longer than the heartbeat period: a node's connection is still open for its next
        # heartbeat (at uvicorn's default 5 s, 3-5 % of heartbeats met a closing connection).
        timeout_keep_alive=max(30, int(3 * cfg.options.heartbeat_s)),
        http=guarded_protocol(limits), loop=guarded_loop_factory(limits),  # type: ignore[arg-type]
    ))
    # uvicorn finishes its shutdown (the lifespan above included), then raises again the signal
    # that stopped it; by then everything is cleaned up, so that signal means a clean exit.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    server.run()
    if not server.started:
        raise HeadError("the head could not start (the reason is in the log above)")
