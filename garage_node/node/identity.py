"""The node's identity, kept in its state directory across reboots.

identity.json (mode 0600) holds the node id, the per-node credential, the WireGuard private
key and what the head told the node at enrollment; head-ca.pem is the head's CA, verified
against the join token's pin. A reboot reads these and rejoins without a token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from garage_node.core.fsutil import read_json, write_json, write_private
from garage_node.core.wire import EnrollReply, RegionFacts, Versions
from garage_node.node.paths import StatePaths


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
    # The Ray cluster's token, as the head last sent it (enrollment, heartbeats).
    ray_token: str = field(default="", repr=False)
    # The key the head's gateway calls this node's engine with (vLLM's VLLM_API_KEY).
    engine_api_key: str = field(default="", repr=False)

    @classmethod
    def from_enrollment(cls, name: str, api_url: str, wg_private_key: str, reply: EnrollReply, now: float) -> Identity:
        return cls(
            node_id=reply.node_id, name=name, region=reply.region, credential=reply.credential,
            wg_private_key=wg_private_key, overlay_ip=reply.overlay_ip, api_url=api_url, enrolled_at=now,
            ray_token=reply.ray_token, engine_api_key=reply.engine_api_key,
        ).with_region(reply)

    def with_region(self, facts: RegionFacts) -> Identity:
        """Fold in what the head sends with every enrollment and heartbeat."""
        return dataclasses.replace(
            self,
            prefix_len=facts.prefix_len, hub_ip=facts.hub.ip, hub_public_key=facts.hub.public_key,
            hub_endpoint=facts.hub.endpoint, ray_address=facts.ray_address, region=facts.region,
            head_ray_version=facts.versions.ray, head_python_version=facts.versions.python,
            heartbeat_s=float(facts.heartbeat_s),
        )

    @property
    def head_versions(self) -> Versions | None:
        return Versions(self.head_ray_version, self.head_python_version) if self.head_ray_version else None


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
