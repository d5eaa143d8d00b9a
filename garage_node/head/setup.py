"""What the head is born with (`garage-node head init`: CA, server certificate, WireGuard key,
registry), where it keeps it, the tokens it hands out, and the facts it tells every node."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from garage_node.core import wireguard
from garage_node.core.fsutil import write_private
from garage_node.core.raycmd import local_versions
from garage_node.core.token import JoinToken, ca_pin, new_token
from garage_node.core.wire import HubInfo, RegionFacts
from garage_node.head import pki
from garage_node.head.config import HeadConfig
from garage_node.head.registry import Registry


class SetupError(Exception):
    """The head cannot do what was asked as it is set up: not initialised (`head init` not run),
    or its server could not start. The CLI prints it and exits EX_UNAVAILABLE. (Not the node's
    node/headclient.HeadError, which is a PC failing to talk to a head.)"""


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
    def ray_token(self) -> Path:
        return self.state_dir / "ray-token"

    @property
    def ray_log(self) -> Path:
        return self.state_dir / "logs" / "ray-head.log"


def paths(cfg: HeadConfig) -> HeadPaths:
    return HeadPaths(cfg.head.state_dir)


def open_registry(cfg: HeadConfig, batch_s: float | None = None) -> Registry:
    """`batch_s`: the server's registry holds heartbeats in memory and writes them in batches;
    the CLI's (the default) writes at once."""
    return Registry(paths(cfg).registry, cfg.network, credential_lifetime_s=cfg.options.credential_lifetime_s,
                    credential_overlap_s=cfg.options.credential_overlap_s, batch_s=batch_s)


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
    if not p.ray_token.exists():
        write_private(p.ray_token, new_ray_token().encode())
        done.append(f"created Ray cluster token {p.ray_token}")
    open_registry(cfg)
    done.append(f"registry {p.registry}")
    return done


def require_init(cfg: HeadConfig) -> HeadPaths:
    p = paths(cfg)
    missing = [f for f in (p.pki.ca_cert, p.pki.server_cert, p.wg_key, p.ray_token) if not f.exists()]
    if missing:
        raise SetupError(f"the head is not initialised ({missing[0]} is missing): run `garage-node head init` first.")
    return p


def create_token(cfg: HeadConfig, ttl_s: float | None, uses: int | None) -> JoinToken:
    p = require_init(cfg)
    tok = new_token(cfg.api_url, ca_pin(p.pki.ca_cert.read_bytes()))
    open_registry(cfg).add_token(tok.token_id, tok.secret, ttl_s or cfg.options.default_token_ttl_s, uses)
    return tok


def region_facts(cfg: HeadConfig, p: HeadPaths) -> RegionFacts:
    """Fixed for the life of the head process; sent with every enrollment and heartbeat answer."""
    return RegionFacts(
        prefix_len=cfg.network.prefixlen,
        hub=HubInfo(ip=cfg.hub_ip, public_key=wireguard.public_key_of(p.wg_key.read_text().strip()),
                    endpoint=cfg.wg_endpoint),
        ray_address=f"{cfg.hub_ip}:{cfg.ray.port}",
        region=cfg.head.region,
        heartbeat_s=cfg.options.heartbeat_s,
        versions=local_versions(),
    )


def new_ray_token() -> str:
    return secrets.token_hex(32)


def rotate_ray_token(cfg: HeadConfig) -> None:
    """A new Ray cluster token: the running head restarts its Ray head with it, and every node
    gets it with its next heartbeat answer and restarts its Ray worker."""
    p = require_init(cfg)
    write_private(p.ray_token, new_ray_token().encode())


class RayToken:
    """The Ray cluster token as the head serves it: read again when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, str] | None = None

    def value(self) -> str:
        mtime = self.path.stat().st_mtime_ns
        if self._seen is None or self._seen[0] != mtime:
            self._seen = (mtime, self.path.read_text().strip())
        return self._seen[1]

    def env(self) -> dict[str, str]:
        """Environment for Ray processes of the head (Ray head, membership probe)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.path)}
