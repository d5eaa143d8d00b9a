"""The WireGuard interface: kernel module where it loads, wireguard-go where it does not.

All changes go through `ip` and `wg` (wireguard-tools), the same tools an operator uses to
look at the interface. Private keys travel to `wg` on stdin, never on a command line.
"""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from shutil import which

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

log = logging.getLogger(__name__)


class WireGuardError(RuntimeError):
    pass


@dataclass(frozen=True)
class Peer:
    public_key: str
    allowed_ips: tuple[str, ...]
    endpoint: str | None = None
    keepalive_s: int | None = None


@dataclass(frozen=True)
class PeerStatus:
    public_key: str
    endpoint: str | None
    allowed_ips: tuple[str, ...]
    latest_handshake: int  # unix time; 0 = never
    rx_bytes: int
    tx_bytes: int

    def handshake_age_s(self, now: float | None = None) -> float | None:
        if not self.latest_handshake:
            return None
        return max(0.0, (now or time.time()) - self.latest_handshake)


def generate_private_key() -> str:
    raw = X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return base64.b64encode(raw).decode()


def public_key_of(private_key: str) -> str:
    key = X25519PrivateKey.from_private_bytes(base64.b64decode(private_key))
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def parse_dump(text: str) -> list[PeerStatus]:
    """Peers from `wg show IFACE dump`; the first line (the interface, with its private key) is skipped."""
    peers = []
    for line in text.splitlines()[1:]:
        cols = line.split("\t")
        if len(cols) < 8:
            continue
        endpoint = None if cols[2] == "(none)" else cols[2]
        allowed = () if cols[3] == "(none)" else tuple(a for a in cols[3].split(",") if a)
        peers.append(PeerStatus(cols[0], endpoint, allowed, int(cols[4]), int(cols[5]), int(cols[6])))
    return peers


class Interface:
    """One WireGuard interface owned by this process."""

    def __init__(self, name: str, implementation: str = "auto") -> None:
        self.name = name
        self.implementation = implementation
        self._userspace: subprocess.Popen | None = None

    # -- lifecycle

    def exists(self) -> bool:
        # sysfs, not `ip link`: the agent asks on every reconcile pass, and a fork is costly.
        return Path("/sys/class/net", self.name).exists()

    def address(self) -> str | None:
        """The interface's IPv4 address with prefix, e.g. 100.96.0.2/16 (readable without root)."""
        res = _run(["ip", "-o", "-4", "address", "show", "dev", self.name], check=False)
        parts = res.stdout.split()
        return parts[parts.index("inet") + 1] if "inet" in parts else None

    def up(self, private_key: str, address: str, listen_port: int | None = None) -> None:
        """Create (or adopt) the interface and give it our key and address. Idempotent."""
        if self.exists() and not self._controllable():
            # Left by a wireguard-go that died or lives in another mount namespace: no one
            # can configure it, so replace it.
            log.warning("interface %s exists but WireGuard cannot configure it; recreating it", self.name)
            _run(["ip", "link", "delete", "dev", self.name], check=False)
        if not self.exists():
            self._create()
        cmd = ["wg", "set", self.name, "private-key", "/dev/stdin"]
        if listen_port:
            cmd += ["listen-port", str(listen_port)]
        _run(cmd, input=private_key + "\n")
        _run(["ip", "address", "replace", address, "dev", self.name])
        _run(["ip", "link", "set", "dev", self.name, "mtu", "1420", "up"])

    def _controllable(self) -> bool:
        return _run(["wg", "show", self.name, "listen-port"], check=False).returncode == 0

    def down(self) -> None:
        if self.exists():
            _run(["ip", "link", "delete", "dev", self.name], check=False)
        if self._userspace is not None:
            # wireguard-go exits by itself once its interface is gone.
            try:
                self._userspace.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._userspace.terminate()
                self._userspace.wait(timeout=5)
            self._userspace = None

    def _create(self) -> None:
        if self.implementation in ("auto", "kernel"):
            made = _run(["ip", "link", "add", "dev", self.name, "type", "wireguard"], check=False)
            if made.returncode == 0:
                return
            if self.implementation == "kernel":
                raise WireGuardError(
                    f"cannot create kernel WireGuard interface {self.name}: {made.stderr.strip()}. "
                    "Load the wireguard module, or set overlay.implementation = \"wireguard-go\"."
                )
        self._start_userspace()

    def _start_userspace(self) -> None:
        if which("wireguard-go") is None:
            raise WireGuardError(
                "no WireGuard kernel module and no wireguard-go: install wireguard-go "
                "(apt-get install wireguard-go) or a kernel with WireGuard."
            )
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
        # Foreground mode keeps it our child, so we know when it dies.
        self._userspace = proc = subprocess.Popen(
            ["wireguard-go", self.name], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=False
        )
        deadline = time.monotonic() + 10
        while not self.exists():
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                raise WireGuardError(f"wireguard-go could not create {self.name}: {err or 'it exited'}")
            if time.monotonic() > deadline:
                raise WireGuardError(f"wireguard-go did not create {self.name} within 10 s")
            time.sleep(0.05)

    # -- peers

    def peers(self) -> list[PeerStatus]:
        return parse_dump(_run(["wg", "show", self.name, "dump"]).stdout)

    def set_peer(self, peer: Peer) -> None:
        cmd = ["wg", "set", self.name, "peer", peer.public_key, "allowed-ips", ",".join(peer.allowed_ips)]
        if peer.endpoint:
            cmd += ["endpoint", peer.endpoint]
        if peer.keepalive_s:
            cmd += ["persistent-keepalive", str(peer.keepalive_s)]
        _run(cmd)

    def remove_peer(self, public_key: str) -> None:
        _run(["wg", "set", self.name, "peer", public_key, "remove"])

    def sync_peers(self, wanted: list[Peer]) -> tuple[int, int]:
        """Make the peer list exactly `wanted`; returns (added or changed, removed)."""
        have = {p.public_key: p for p in self.peers()}
        want = {p.public_key: p for p in wanted}
        changed = 0
        for key, peer in want.items():
            cur = have.get(key)
            if cur is None or set(cur.allowed_ips) != set(peer.allowed_ips):
                self.set_peer(peer)
                changed += 1
        removed = 0
        for key in have.keys() - want.keys():
            self.remove_peer(key)
            removed += 1
        return changed, removed


def _run(cmd: list[str], check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=15)
    except FileNotFoundError:
        raise WireGuardError(f"'{cmd[0]}' is not installed: apt-get install wireguard-tools iproute2") from None
    if check and res.returncode != 0:
        # The command line holds no secret (keys go on stdin), so it is safe to quote.
        raise WireGuardError(f"{' '.join(cmd[:4])} failed: {res.stderr.strip()}")
    return res
