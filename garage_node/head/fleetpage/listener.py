"""The fleet page's own listener for `garage-node head run` (see head/listener.py)."""

from __future__ import annotations

import ipaddress
from typing import Any

from garage_node.head.config import HeadConfig
from garage_node.head.connguard import GuardLimits, guarded_loop_factory, guarded_protocol
from garage_node.head.fleetpage.app import NodeSource, create_fleet_app
from garage_node.head.fleetpage.auth import key_file
from garage_node.head.fleetpage.history import History
from garage_node.head.fleetpage.view import Models, RolloutView, TrustView, Usage
from garage_node.head.listener import BackgroundServer, tls13_config
from garage_node.head.pki import PkiPaths


def fleet_listener(cfg: HeadConfig, registry: NodeSource, history: History, pki: PkiPaths,
                   usage: Usage | None = None, models: Models | None = None,
                   trust: TrustView | None = None, rollout: RolloutView | None = None) -> BackgroundServer:
    f = cfg.fleet
    loopback = ipaddress.ip_address(f.listen_host).is_loopback
    # Off loopback the admin key crosses a network: HTTPS with the head's own certificate (the
    # browser trusts it once the head's CA is imported, or warns). On loopback the SSH tunnel
    # already encrypts.
    tls: dict[str, Any] = {} if loopback else {"ssl_certfile": str(pki.server_cert), "ssl_keyfile": str(pki.server_key)}
    app = create_fleet_app(registry, history, cfg.options.offline_after_s, region=cfg.head.region,
                           key_path=key_file(cfg.head.state_dir), require_key=f.needs_key,
                           secure_cookie=not loopback, usage=usage, models=models, trust=trust, rollout=rollout)
    # The control API's guards (request deadlines, connections per address, TLS handshake
    # deadline): the page may face a network where not everyone is friendly.
    limits = GuardLimits(request_timeout_s=cfg.api.request_timeout_s,
                         max_connections_per_client=cfg.api.max_connections_per_client,
                         tls_handshake_timeout_s=cfg.api.tls_handshake_timeout_s)
    config = tls13_config(app, host=f.listen_host, port=f.port, log_level="warning", access_log=False,
                            timeout_keep_alive=30, timeout_graceful_shutdown=5,
                            http=guarded_protocol(limits), loop=guarded_loop_factory(limits),
                            **tls)
    return BackgroundServer("fleet page", config)
