"""Keys everywhere: the gateway's key table (gateway.db, written by `head key create/revoke`
in any process) and the other regions' key records, kept equal.

- Outgoing: every 0.25 s the head reads its key table; a key whose record differs from the last
  version this head published or applied (made or revoked here) is put into this region's
  key bucket (a JetStream key-value bucket) with this region as origin.
- Incoming: each other region's bucket is read through a durable consumer (one per reading
  region), so a head that was cut off or stopped reads on where it left off. A record is applied
  to the key table when it is newer than what this head knows; a revocation is never undone
  (the earliest revocation time wins), so two versions arriving in any order end the same.
- Cut off, a region keeps checking requests against the keys its table holds.

Only hashes travel: a key itself is shown once to the operator who made it and kept nowhere."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Iterable

from garage_node.head.federation.records import KeyRecord
from garage_node.head.gateway.store import Store

log = logging.getLogger(__name__)

BUCKET = "gn_keys"


def bucket_key(name: str) -> str:
    """A key name as a bucket key (names may hold '@', which bucket keys may not)."""
    return name.encode().hex()


def local_records(store: Store) -> list[KeyRecord]:
    return [KeyRecord(name=r["name"], hash=r["hash"], hint=r["hint"], models=r["models"], rpm=r["rpm"], tpm=r["tpm"],
                      quota_tokens=r["quota_tokens"], created_at=r["created_at"], expires_at=r["expires_at"],
                      revoked_at=r["revoked_at"])
            for r in store.query("SELECT * FROM api_keys")]


def changed(records: Iterable[KeyRecord], seen: dict[str, tuple[str, float]]) -> list[KeyRecord]:
    """The local records that differ from the version last published or applied."""
    return [r for r in records if seen.get(r.name, ("", 0.0))[0] != r.fingerprint()]


def merge(local: KeyRecord | None, incoming: KeyRecord, seen_updated_at: float) -> KeyRecord | None:
    """What the key table should hold after `incoming`, or None to leave it as it is.

    Newest version wins (by its updated_at); a revocation stays whatever the order: the
    earliest revocation time of the two is kept. A record for a name this region holds with
    another hash (the same name made in two regions) is not applied: each key keeps working
    where it was made, and the conflict is logged for the operators."""
    if local is None:
        return incoming
    if local.hash != incoming.hash:
        log.warning("key '%s' from region %s has another hash than this region's key of that name: not applied "
                    "(give keys names unique across regions)", incoming.name, incoming.origin)
        return None
    revoked = min((t for t in (local.revoked_at, incoming.revoked_at) if t is not None), default=None)
    base = incoming if incoming.updated_at > seen_updated_at else local
    out = replace(base, revoked_at=revoked, origin=incoming.origin, updated_at=max(incoming.updated_at, seen_updated_at))
    return None if out.fingerprint() == local.fingerprint() else out


def apply(store: Store, record: KeyRecord) -> None:
    with store.transaction() as db:
        db.execute(
            "INSERT INTO api_keys (name, hash, hint, models, rpm, tpm, quota_tokens, created_at, expires_at, revoked_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (name) DO UPDATE SET hint = excluded.hint,"
            " models = excluded.models, rpm = excluded.rpm, tpm = excluded.tpm, quota_tokens = excluded.quota_tokens,"
            " expires_at = excluded.expires_at, revoked_at = excluded.revoked_at",
            (record.name, record.hash, record.hint, record.models, record.rpm, record.tpm, record.quota_tokens,
             record.created_at, record.expires_at, record.revoked_at))
