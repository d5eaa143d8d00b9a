"""The node's identity, kept in its state directory across reboots.

identity.json (mode 0600) holds the node id, the per-node credential, the WireGuard private
key and what the head told the node at enrollment; head-ca.pem is the head's CA, verified
against the join token's pin. A reboot reads these and rejoins without a token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fsutil import read_json, write_json, write_private


@dataclass(frozen=True)
class Identity:
    node_id: str
    name: str
    region: str
    credential: str = field(repr=False)
    wg_private_key: str = field(repr=False)
    overlay_ip: str = ""
    prefix_len: int = 16
    api_url: str = ""
    hub_ip: str = ""
    hub_public_key: str = ""
    hub_endpoint: str = ""
    ray_address: str = ""
    head_ray_version: str = ""
    head_python_version: str = ""
    heartbeat_s: float = 10.0
    enrolled_at: float = 0.0
    revoked: bool = False
    # SHA-256 of the join token this identity came from: after a revocation only a different
    # token is worth trying (the old one stays in garage.toml but is spent).
    token_digest: str = ""

    @classmethod
    def from_enrollment(cls, name: str, api_url: str, wg_private_key: str, body: dict[str, Any], now: float) -> "Identity":
        return cls(
            node_id=body["node_id"], name=name, region=body["region"], credential=body["credential"],
            wg_private_key=wg_private_key, overlay_ip=body["overlay_ip"], api_url=api_url, enrolled_at=now,
        ).with_hub(body)

    def with_hub(self, body: dict[str, Any]) -> "Identity":
        """Fold in the hub fields the head sends with every enrollment and heartbeat."""
        return dataclasses.replace(
            self,
            prefix_len=body["prefix_len"], hub_ip=body["hub"]["ip"], hub_public_key=body["hub"]["public_key"],
            hub_endpoint=body["hub"]["endpoint"], ray_address=body["ray_address"], region=body["region"],
            head_ray_version=body["versions"]["ray"], head_python_version=body["versions"]["python"],
            heartbeat_s=float(body["heartbeat_s"]),
        )


@dataclass(frozen=True)
class StatePaths:
    state_dir: Path

    @property
    def identity(self) -> Path:
        return self.state_dir / "identity.json"

    @property
    def head_ca(self) -> Path:
        return self.state_dir / "head-ca.pem"

    @property
    def join_token(self) -> Path:
        return self.state_dir / "join-token"

    @property
    def drain_flag(self) -> Path:
        return self.state_dir / "draining"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"


def load(paths: StatePaths) -> Identity | None:
    if not paths.identity.exists():
        return None
    data = read_json(paths.identity)
    known = {f.name for f in dataclasses.fields(Identity)}
    return Identity(**{k: v for k, v in data.items() if k in known})


def save(paths: StatePaths, ident: Identity, head_ca_pem: bytes | None = None) -> None:
    # The CA first: an identity without its CA could never talk to the head.
    if head_ca_pem is not None:
        write_private(paths.head_ca, head_ca_pem, mode=0o644)
    write_json(paths.identity, dataclasses.asdict(ident))
