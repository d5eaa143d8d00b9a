"""The regional head: the CA and keys it is born with (`init`), the tokens it hands out, and
the long-running service (`run`) that serves the control API over HTTPS, keeps the
WireGuard hub's peers equal to the registry, and supervises the Ray head on the overlay."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from . import pki, sdnotify, wireguard
from .backoff import Backoff
from .config import HeadConfig
from .fsutil import write_private
from .headapi import HubInfo, create_app
from .process import Supervised
from .raycluster import head_argv, local_versions, probe, ray_env, ray_executable
from .registry import Registry
from .token import JoinToken, new_token

log = logging.getLogger(__name__)

RAY_PROBE_S = 2.0


class HeadError(Exception):
    pass


@dataclass(frozen=True)
class HeadPaths:
    state_dir: Path

    @property
    def pki(self) -> pki.PkiPaths:
        return pki.PkiPaths(self.state_dir / "pki")

    @property
    def registry(self) -> Path:
        return self.state_dir / "registry.sqlite"

    @property
    def wg_key(self) -> Path:
        return self.state_dir / "wireguard.key"

    @property
    def ray_log(self) -> Path:
        return self.state_dir / "logs" / "ray-head.log"


def paths(cfg: HeadConfig) -> HeadPaths:
    return HeadPaths(cfg.head.state_dir)


def registry(cfg: HeadConfig) -> Registry:
    return Registry(paths(cfg).registry, cfg.network)


def init(cfg: HeadConfig) -> list[str]:
    """Create what the head needs once; keeps what already exists, so it is safe to repeat."""
    p = paths(cfg)
    done = []
    if not p.pki.ca_cert.exists():
        pki.create_ca(p.pki, cfg.head.region)
        done.append(f"created CA {p.pki.ca_cert}")
    # Re-issued every time: the advertised address may have changed; the CA pin stays valid.
    pki.issue_server_cert(p.pki, cfg.api.advertise_host)
    done.append(f"issued server certificate for {cfg.api.advertise_host}")
    if not p.wg_key.exists():
        write_private(p.wg_key, wireguard.generate_private_key().encode())
        done.append(f"created WireGuard key {p.wg_key}")
    registry(cfg)
    done.append(f"registry {p.registry}")
    return done


def require_init(cfg: HeadConfig) -> HeadPaths:
    p = paths(cfg)
    missing = [f for f in (p.pki.ca_cert, p.pki.server_cert, p.wg_key) if not f.exists()]
    if missing:
        raise HeadError(f"the head is not initialised ({missing[0]} is missing): run `garage-node head init` first.")
    return p


def create_token(cfg: HeadConfig, ttl_s: float | None, uses: int | None) -> JoinToken:
    p = require_init(cfg)
    tok = new_token(cfg.api_url, pki.ca_pin(p.pki.ca_cert.read_bytes()))
    registry(cfg).add_token(tok.token_id, tok.secret, ttl_s or cfg.options.default_token_ttl_s, uses)
    return tok


def hub_info(cfg: HeadConfig, p: HeadPaths) -> HubInfo:
    return HubInfo(
        ip=cfg.hub_ip,
        prefix_len=cfg.network.prefixlen,
        public_key=wireguard.public_key_of(p.wg_key.read_text().strip()),
        endpoint=cfg.wg_endpoint,
        ray_address=f"{cfg.hub_ip}:{cfg.ray.port}",
        region=cfg.head.region,
        heartbeat_s=cfg.options.heartbeat_s,
        versions=local_versions(),
    )


class HeadService:
    """Everything `garage-node head run` keeps alive besides the HTTP server."""

    def __init__(self, cfg: HeadConfig) -> None:
        self.cfg = cfg
        self.paths = require_init(cfg)
        self.registry = registry(cfg)
        self.hub = hub_info(cfg, self.paths)
        self.iface = wireguard.Interface(cfg.overlay.interface, cfg.overlay.implementation)
        self.ray = Supervised("ray head", self.paths.ray_log, Backoff(1.0, 30.0),
                              env=ray_env(), pid_file=cfg.head.state_dir / "ray-head.pid")
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._reconciler = threading.Thread(target=self._loop, name="head-reconcile", daemon=True)
        self._prober = threading.Thread(target=self._probe_loop, name="ray-probe", daemon=True)

    # -- lifecycle

    def start(self) -> None:
        self.iface.up(self.paths.wg_key.read_text().strip(), f"{self.hub.ip}/{self.hub.prefix_len}", self.cfg.overlay.listen_port)
        _enable_forwarding()
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
        # The prober may sit in a probe of the Ray head just stopped; it is a daemon thread
        # with nothing of value left to write, so do not wait for it long.
        if self._prober.is_alive():
            self._prober.join(timeout=2)

    def peers_changed(self) -> None:
        self._wake.set()

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
        wanted = [wireguard.Peer(n.wg_public_key, (f"{n.overlay_ip}/32",)) for n in self.registry.active_peers()]
        added, removed = self.iface.sync_peers(wanted)
        if added or removed:
            log.info("hub peers: %d added or changed, %d removed", added, removed)

    def _ensure_ray(self) -> None:
        if not self.ray.running:
            # A stale pointer file from the previous Ray head blocks a new one from starting.
            (self.cfg.ray.temp_dir / "ray_current_cluster").unlink(missing_ok=True)
        r = self.cfg.ray
        self.ray.ensure(head_argv(ray_executable(r.command), self.hub.ip, r.port, r.temp_dir, self.cfg.head.region,
                                 r.num_cpus, r.memory_mib, r.object_store_mib))

    def _probe_loop(self) -> None:
        """Record which nodes the Ray head holds alive; nodes learn it with their heartbeat."""
        while not self._stop.wait(RAY_PROBE_S):
            if not self.ray.running:
                continue
            try:
                nodes = probe(self.hub.ray_address)
            except Exception as e:  # the Ray head may still be starting
                log.debug("ray probe: %s", e)
                continue
            alive = {n.labels.get("garage.node_id", "") for n in nodes if n.alive and not n.is_head}
            self.registry.record_ray_membership(alive)


def _enable_forwarding() -> None:
    # Hub and spoke: node-to-node packets arrive on the hub interface and leave through it again.
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")


def run(cfg: HeadConfig) -> None:
    import uvicorn  # only the head needs it

    service = HeadService(cfg)
    p = service.paths
    app = create_app(service.registry, service.hub, p.pki.ca_cert.read_bytes(), service.peers_changed,
                     on_ready=lambda: sdnotify.ready(f"serving {cfg.api_url}, hub {service.hub.ip} on {cfg.overlay.interface}"))
    service.start()
    server = uvicorn.Server(uvicorn.Config(
        app, host=cfg.api.listen_host, port=cfg.api.port,
        ssl_certfile=str(p.pki.server_cert), ssl_keyfile=str(p.pki.server_key),
        log_level="info", access_log=False,
    ))
    # uvicorn re-raises the signal that stopped it once it has shut down; with these
    # handlers in place that re-raise is a no-op, so the cleanup below runs and we exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()  # returns on SIGTERM/SIGINT after in-flight requests finish
    finally:
        sdnotify.stopping()
        service.stop()
