"""The head's typed configuration: /etc/garage-node/head.toml."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from garage_node.core.settings import ConfigError, one_of, parse, positive, read_toml, setting
from garage_node.node.config import IFNAME, WG_IMPLEMENTATIONS

DEFAULT_HEAD_CONFIG = Path("/etc/garage-node/head.toml")



def _cidr(text: str) -> ipaddress.IPv4Network:
    if not isinstance(text, str):
        raise ValueError(text)
    return ipaddress.IPv4Network(text)


@dataclass(frozen=True)
class HeadSection:
    region: str = "home"
    state_dir: Path = Path("/var/lib/garage-head")


@dataclass(frozen=True)
class ApiSection:
    listen_host: str = "0.0.0.0"
    port: int = 8443
    # The address nodes use, written into join tokens and the server certificate.
    advertise_host: str = ""
    # TCP ports open to everyone besides the control API (the firewall closes all others, Ray's
    # included, except through WireGuard). 22: so an operator keeps SSH.
    open_tcp: tuple[int, ...] = (22,)
    # Hostile input: the API is open to the internet. A request body over this is refused
    # (413); a request whose headers and body are not all in within request_timeout_s of its
    # first byte, or a TLS handshake not done within tls_handshake_timeout_s, is cut off; one
    # address may hold at most max_connections_per_client connections (head/connguard.py).
    max_body_bytes: int = setting(32768, check=positive())
    request_timeout_s: float = setting(10.0, check=positive())
    tls_handshake_timeout_s: float = setting(10.0, check=positive())
    max_connections_per_client: int = setting(32, check=positive())


@dataclass(frozen=True)
class HubSection:
    interface: str = setting("garage-hub", check=IFNAME)
    implementation: str = setting("auto", check=one_of(*WG_IMPLEMENTATIONS))
    cidr: str = setting("100.96.0.0/16", check=(lambda v: _valid_cidr(v), "an IPv4 network like 100.96.0.0/16"))
    listen_port: int = 51820
    # host:port nodes send WireGuard to; empty: advertise_host and listen_port.
    endpoint: str = ""

    def problems(self):
        if ipaddress.IPv4Network(self.cidr).prefixlen > 29:
            yield "cidr", "is too small for a region; use /24 or larger."


def _valid_cidr(text: str) -> bool:
    try:
        _cidr(text)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class HeadRaySection:
    command: str = ""
    port: int = 6379
    temp_dir: Path = Path("/tmp/garage-ray-head")
    num_cpus: int = 0
    memory_mib: int = 0
    object_store_mib: int = 0


@dataclass(frozen=True)
class HeadOptions:
    default_token_ttl_s: int = 24 * 3600
    heartbeat_s: float = 10.0
    # A node unheard for this long is shown as offline.
    offline_after_s: float = 45.0
    peer_sync_s: float = 2.0
    # An enrollment whose node never came back with its credential (no authenticated
    # heartbeat) is removed after this long: its address and hub peer go, the token's use returns.
    reclaim_unconfirmed_after_s: float = setting(3600.0, check=positive())
    # Node credentials: how long one is valid (nodes renew it when a third is left), and how
    # long the one a renewal replaced still works (an answer lost on the way is not fatal).
    credential_lifetime_s: float = setting(30 * 86400.0, check=positive())
    credential_overlap_s: float = setting(3600.0, check=positive())


@dataclass(frozen=True)
class HeadConfig:
    head: HeadSection = field(default_factory=HeadSection)
    api: ApiSection = field(default_factory=ApiSection)
    overlay: HubSection = field(default_factory=HubSection)
    ray: HeadRaySection = field(default_factory=HeadRaySection)
    options: HeadOptions = field(default_factory=HeadOptions)

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.overlay.cidr)

    @property
    def hub_ip(self) -> str:
        return str(self.network.network_address + 1)

    @property
    def wg_endpoint(self) -> str:
        return self.overlay.endpoint or f"{self.api.advertise_host}:{self.overlay.listen_port}"

    @property
    def api_url(self) -> str:
        return f"https://{self.api.advertise_host}:{self.api.port}"


def load_head_config(path: Path | None = None) -> HeadConfig:
    path = path or Path(os.environ.get("GARAGE_HEAD_CONFIG", DEFAULT_HEAD_CONFIG))
    if not path.exists():
        raise ConfigError(
            f"{path}: head config not found. Copy configs/head.example.toml there and set "
            "[api] advertise_host to the address nodes reach this head at."
        )
    cfg = parse(HeadConfig(), read_toml(path, ConfigError), path, error=ConfigError)
    if not cfg.api.advertise_host:
        raise ConfigError(
            f"{path}: 'api.advertise_host' is empty. Set it to the IP or DNS name nodes reach "
            "this head at; it goes into join tokens and the head's certificate."
        )
    return cfg
