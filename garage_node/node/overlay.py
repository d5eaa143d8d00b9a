"""The overlay part of the agent: the WireGuard interface to the hub, the firewall that shuts
every door but WireGuard, and the probe that tells whether the tunnel really carries traffic.

Ray and the engine may run only while `ready`: the interface is up with the hub as its peer
and the firewall is in place (Ray and vLLM listen on every address; only the firewall keeps
them off the owner's LAN). Each of the three sets and clears its own problem.
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
from typing import Callable

from garage_node.core.clock import Clock
from garage_node.core.firewall import Firewall, FirewallError, Rules
from garage_node.core.raycmd import RAY_PORTS
from garage_node.core.wire import OverlayStatus
from garage_node.core.wireguard import Interface, Peer, WireGuardError
from garage_node.node.config import NodeConfig
from garage_node.node.health import Health, Source
from garage_node.node.identity import Identity

log = logging.getLogger(__name__)

FIREWALL_CHECK_S = 30.0  # rules flushed by someone else are put back within this
# The hub is pinged through the tunnel this often; this many misses in a row mean the overlay
# is down (a blocked UDP port, a dead tunnel) even while HTTPS to the head still works.
HUB_PROBE_S = 5.0
HUB_MISSES = 2


class Overlay:
    def __init__(self, cfg: NodeConfig, clock: Clock, health: Health, iface: Interface, firewall: Firewall,
                 probe_hub: Callable[[str], bool] | None = None) -> None:
        self.cfg = cfg
        self.clock = clock
        self.health = health
        self.iface = iface
        self.firewall = firewall
        self.probe_hub = probe_hub or ping
        self._iface_ready = False  # interface up with the hub peer set, by this process
        self._firewall: tuple[Rules, float] | None = None  # rules applied, and when last checked
        self._hub_misses = 0
        self._next_hub_probe = 0.0

    @property
    def ready(self) -> bool:
        """Workloads may bind the overlay address: interface and firewall both in place."""
        return self._iface_ready and self._firewall is not None

    @property
    def interface_ready(self) -> bool:
        return self._iface_ready

    @property
    def tunnel_down(self) -> bool:
        """The interface is up but the hub has not answered through it lately."""
        return self._iface_ready and self._hub_misses >= HUB_MISSES

    def ensure(self, ident: Identity) -> None:
        """One pass: interface, firewall, tunnel probe, in that order."""
        self._ensure_interface(ident)
        self._ensure_firewall(ident)
        self._probe(ident)

    def reapply(self) -> None:
        """The identity's key or hub changed: configure the interface again on the next
        `ensure` (no tear-down, so Ray and the engine keep their address)."""
        self._iface_ready = False

    def down(self) -> None:
        self.iface.down()
        self._iface_ready = False
        self._hub_misses = 0
        self._remove_firewall()
        self.health.clear(Source.OVERLAY, Source.FIREWALL, Source.TUNNEL)  # what is down has no problem

    # -- interface

    def _ensure_interface(self, ident: Identity) -> None:
        if self._iface_ready and self.iface.exists():
            return
        try:
            self.iface.up(ident.wg_private_key, f"{ident.overlay_ip}/{ident.prefix_len}")
            # Hub and spoke: the whole overlay is reached through the head.
            network = f"{ident.hub_ip}/{ident.prefix_len}"
            self.iface.set_peer(Peer(ident.hub_public_key, (network,), ident.hub_endpoint, self.cfg.overlay.keepalive_s))
            self._iface_ready = True
            self.health.clear(Source.OVERLAY)
        except WireGuardError as e:
            self._iface_ready = False
            self.health.fail(Source.OVERLAY, f"overlay interface {self.iface.name} could not be set up: {e}")

    # -- firewall

    def rules(self, ident: Identity) -> Rules:
        net = ipaddress.ip_network(f"{ident.hub_ip}/{ident.prefix_len}", strict=False)
        ray = tuple(RAY_PORTS.ranges())
        engine_port = self.cfg.engine.port
        closed = None if self.cfg.overlay.firewall == "all-tcp" else ray + ((engine_port, engine_port),)
        return Rules(table=f"garage-node-{self.iface.name}", overlay_interface=self.iface.name, overlay_cidr=str(net),
                     ray_ports=ray, open_tcp=self.cfg.overlay.open_tcp, closed_tcp=closed)

    def _ensure_firewall(self, ident: Identity) -> None:
        """Ray and the engine listen on every address: shut every door but WireGuard first."""
        rules = self.rules(ident)
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
            self.health.clear(Source.FIREWALL)
        except FirewallError as e:
            self._firewall = None
            self.health.fail(Source.FIREWALL, f"the firewall could not be set up, so Ray and the engine stay stopped: {e}")

    def _remove_firewall(self) -> None:
        if self._firewall is None:
            return
        try:
            self.firewall.remove(self._firewall[0].table)
        except FirewallError as e:
            log.warning("could not remove the firewall: %s", e)
        self._firewall = None

    # -- tunnel probe

    def _probe(self, ident: Identity) -> None:
        """Is the tunnel really carrying traffic? A ping to the hub's overlay address, every few
        seconds: the interface and a handshake that once happened prove nothing when UDP to the
        hub is blocked while HTTPS to the head still gets through."""
        now = self.clock.monotonic()
        if not self._iface_ready or now < self._next_hub_probe:
            return
        self._next_hub_probe = now + HUB_PROBE_S
        if self.probe_hub(ident.hub_ip):
            self._hub_misses = 0
            self.health.clear(Source.TUNNEL)
            return
        self._hub_misses += 1
        if self._hub_misses >= HUB_MISSES:
            self.health.fail(Source.TUNNEL, f"overlay down: the hub {ident.hub_ip} does not answer through WireGuard "
                             f"({self._hub_misses} pings missed)",
                             f"check that UDP to {ident.hub_endpoint} is not blocked (router, firewall); the node keeps "
                             "trying by itself")

    # -- status

    def status(self, ident: Identity | None) -> OverlayStatus:
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


def ping(ip: str) -> bool:
    """One ICMP echo to `ip` (the hub's overlay address, routed through WireGuard), 2 s to answer."""
    try:
        return subprocess.run(["ping", "-n", "-q", "-c", "1", "-W", "2", ip], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
