"""The firewall that makes the overlay the only way in: nftables rules the agent and the head
install when they start and remove when they stop (one table each, named, so nothing else on
the machine is touched).

Why a firewall at all: Ray binds its GCS, raylet, object manager and worker ports on every
address whatever `--node-ip-address` says (and the head's Ray opens more on ports chosen at
random), and Linux accepts a packet for any local address on any interface. Without it,
anyone on a PC's home network, or with a forged route to an overlay address, reaches Ray,
which runs code, and the engine. The rules:

- prerouting (after conntrack, before Docker's DNAT): a packet for this machine's own overlay
  address that did not come through the WireGuard interface (or loopback) and opens or belongs
  to no connection this machine knows is dropped, for every port;
- input: through WireGuard and loopback, everything; from anywhere else, TCP only to the
  ports named open (the head's control API, SSH) and to connections this machine opened.
  Not a list of Ray's ports: some of them cannot be pinned, and a door left off a list stays
  open. UDP (WireGuard itself, DHCP, DNS answers) is left alone: Ray does not use it;
- on the head (the hub): traffic between two nodes is forwarded for Ray's ports (workers talk
  to each other) and ping, never for anything else: a PC cannot call another PC's engine; and
  nothing from outside the tunnel is forwarded into it;
- on the head, for the overlay addresses of PCs the audits quarantined (`refused`, issue #20):
  nothing they open to the head is accepted but the ports anyone may reach (the control API,
  so they hear why, and are re-checked and released), the head opens no Ray connection to them
  (its drivers and GCS cannot hand them work), and nothing is forwarded to or from them. Even an
  agent its owner changed to keep offering its GPUs gets no Ray work. Connections already open
  are cut too: these rules come before the ones that accept established traffic.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import Protocol


class FirewallError(RuntimeError):
    """nft is missing or refused the rules; the message says what to do."""


@dataclass(frozen=True)
class Rules:
    table: str  # "garage-node" on a PC, "garage-head" on the head
    overlay_interface: str
    overlay_cidr: str  # every overlay address, e.g. 100.96.0.0/16
    ray_ports: tuple[tuple[int, int], ...]  # (first, last) ranges, from core.raycmd.RayPorts
    open_tcp: tuple[int, ...] = ()  # TCP ports anyone may reach (the head's API, SSH)
    # None: every other TCP port is closed to all but WireGuard. Else only these (first, last)
    # ranges are (Ray's pinned ports and the engine's), for a machine that also serves others.
    closed_tcp: tuple[tuple[int, int], ...] | None = None
    hub: bool = False  # the head: forward node-to-node traffic for Ray's ports only
    # The head: overlay addresses of quarantined PCs, cut off from Ray (see the module's doc).
    refused: tuple[str, ...] = ()


def ruleset(r: Rules) -> str:
    """The nft script: the table is created, emptied and filled in one transaction."""
    ray = _ports(r.ray_ports)
    trusted = f'{{ "lo", "{r.overlay_interface}" }}'
    if r.closed_tcp is None:
        tcp = ([f"    tcp dport {{ {', '.join(str(p) for p in r.open_tcp)} }} accept"] if r.open_tcp else []) + \
              ["    meta l4proto tcp drop"]
    else:
        tcp = [f"    tcp dport {{ {_ports(r.closed_tcp)} }} drop"]
    lines = [
        f"table inet {r.table} {{}}",
        f"delete table inet {r.table}",
        f"table inet {r.table} {{",
        "  chain prerouting {",
        # After conntrack (-200), before Docker's DNAT (-100): answers within a connection
        # this machine made (its own call to the engine on its overlay address, which Docker
        # turns into a call to the container) come back on docker0 and must pass.
        "    type filter hook prerouting priority mangle; policy accept;",
        # Only packets for this machine's own overlay address: traffic passing through (a
        # container's answer going back into the tunnel) is not ours to drop.
        f"    iifname != {trusted} ip daddr {r.overlay_cidr} fib daddr type local ct state new,invalid,untracked drop",
        "  }",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        *_refused_input(r),
        f"    iifname {trusted} accept",
        "    ct state established,related accept",
        *tcp,
        "  }",
    ]
    if r.hub:
        hub = f'iifname "{r.overlay_interface}" oifname "{r.overlay_interface}"'
        refused = _addresses(r.refused)
        lines += [
            "  chain forward {",
            "    type filter hook forward priority filter; policy accept;",
            *([f"    {hub} ip saddr {refused} drop", f"    {hub} ip daddr {refused} drop"] if r.refused else []),
            f"    {hub} ct state established,related accept",
            f"    {hub} icmp type echo-request accept",
            f"    {hub} tcp dport {{ {ray} }} accept",
            f"    {hub} drop",
            # Into the tunnel only from the tunnel: the hub forwards nothing from its LAN or the
            # internet to a node (WireGuard on the node would drop it too: wrong source address).
            f'    oifname "{r.overlay_interface}" drop',
            "  }",
        ]
        if r.refused:
            lines += [
                "  chain output {",
                "    type filter hook output priority filter; policy accept;",
                # The head's Ray (GCS, raylet, drivers) reaches a PC's worker on Ray's ports;
                # its gateway's calls to the PC's engine (a re-check's canaries) go on.
                f'    oifname "{r.overlay_interface}" ip daddr {refused} tcp dport {{ {ray} }} drop',
                "  }",
            ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _refused_input(r: Rules) -> list[str]:
    """A quarantined PC opens nothing to the head but the ports anyone may reach; answers to
    what the head opened (its gateway's calls to the engine) come back (`ct direction reply`)."""
    if not (r.hub and r.refused):
        return []
    match = f'iifname "{r.overlay_interface}" ip saddr {_addresses(r.refused)} ct direction original'
    if r.open_tcp:
        return [f"    {match} tcp dport != {{ {', '.join(str(p) for p in r.open_tcp)} }} drop"]
    return [f"    {match} meta l4proto tcp drop"]


def _addresses(addresses: tuple[str, ...]) -> str:
    return "{ " + ", ".join(sorted(addresses)) + " }"


def _ports(ranges: tuple[tuple[int, int], ...]) -> str:
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges)


class Firewall(Protocol):
    def apply(self, rules: Rules) -> None: ...

    def remove(self, table: str) -> None: ...

    def present(self, table: str) -> bool: ...


class Nftables:
    """The real thing: `nft -f -`."""

    def apply(self, rules: Rules) -> None:
        self._nft(["-f", "-"], ruleset(rules))

    def remove(self, table: str) -> None:
        if self.present(table):
            self._nft(["delete", "table", "inet", table])

    def present(self, table: str) -> bool:
        nft = self._binary()
        return subprocess.run([nft, "list", "table", "inet", table], capture_output=True).returncode == 0

    def _nft(self, args: list[str], script: str | None = None) -> None:
        res = subprocess.run([self._binary(), *args], input=script, capture_output=True, text=True)
        if res.returncode != 0:
            raise FirewallError(f"nft refused the firewall rules: {res.stderr.strip()[:300]}. "
                                "Is this kernel built with nftables (nf_tables)?")

    @staticmethod
    def _binary() -> str:
        # /usr/sbin too: a PATH without it (a user's shell, some test runners) must not hide nft.
        nft = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
        if nft is None:
            raise FirewallError("the nft command is missing: install Debian's nftables package "
                                "(apt-get install nftables); Ray stays stopped until the firewall is up")
        return nft
