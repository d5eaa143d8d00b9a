"""What the regions tell each other, as JSON on NATS: key records (hashes only, never a key),
usage records and capacity summaries. Decoded with msgspec into these types, so a malformed or
hostile message is refused as a whole instead of half applied."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec


@dataclass(frozen=True)
class KeyRecord:
    """An API key as every region needs it to check requests: its SHA-256, never the key."""

    name: str
    hash: str
    hint: str
    models: str  # comma-separated, as gateway.db keeps it; empty: every model
    rpm: int | None
    tpm: int | None
    quota_tokens: int | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    origin: str = ""  # the region that wrote this version
    updated_at: float = 0.0  # when it did: the newest version wins (a revocation always does)
    home: str = ""  # the region where the key was made: it grants the key's quota leases

    def fingerprint(self) -> str:
        """What the key is, without who said so when: equal records need no new version."""
        return "|".join(str(v) for v in (self.name, self.hash, self.hint, self.models, self.rpm, self.tpm,
                                          self.quota_tokens, self.created_at, self.expires_at, self.revoked_at))


@dataclass(frozen=True)
class UsageRecord:
    """One request's usage, with an id unique across the network (the de-duplication key)."""

    id: str
    region: str  # the region whose PC served it
    at: float
    key: str
    node_id: str
    node_name: str
    model: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ModelCapacity:
    healthy: int  # PCs that take requests for it now
    free_slots: int  # requests it could take before every such PC is saturated
    queue: int  # requests waiting in its engines' queues (last reports)
    ttft_p50_ms: float | None  # measured at this region's gateway; None: not yet


@dataclass(frozen=True)
class Summary:
    region: str
    at: float  # the sender's wall clock (for display; freshness is judged by arrival)
    models: dict[str, ModelCapacity] = field(default_factory=dict)


def encode(record: KeyRecord | UsageRecord | Summary) -> bytes:
    return msgspec.json.encode(record)  # msgspec encodes dataclasses as they are: no asdict copy


def decode_key(data: bytes) -> KeyRecord:
    return msgspec.json.decode(data, type=KeyRecord)


def decode_usage(data: bytes) -> UsageRecord:
    return msgspec.json.decode(data, type=UsageRecord)


def decode_summary(data: bytes) -> Summary:
    return msgspec.json.decode(data, type=Summary)
