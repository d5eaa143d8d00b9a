"""API keys: made by the operator (`garage-node head key create`), shown once, stored as a
SHA-256 hash. A key is 256 random bits, so a plain hash is enough (a slow password hash
protects guessable secrets; these are not)."""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
from dataclasses import dataclass

from garage_node.head.gateway.store import Store

PREFIX = "gk-"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$")


class KeyError_(ValueError):
    """A key operation the operator asked for cannot be done; the message says why."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    hint: str  # the key's first characters, never the key
    models: tuple[str, ...]  # empty: every model
    rpm: int | None
    tpm: int | None
    quota_tokens: int | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def allows(self, model: str) -> bool:
        return not self.models or model in self.models


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    def create(self, name: str, now: float, models: tuple[str, ...] = (), rpm: int | None = None,
               tpm: int | None = None, quota_tokens: int | None = None, ttl_s: float | None = None) -> tuple[ApiKey, str]:
        """(the key's record, the key itself: shown to the operator once, never stored)."""
        if not NAME.match(name):
            raise KeyError_(f"key name {name!r} is not usable: use 1-63 letters, digits, '.', '_', '@' or '-'")
        for what, value in (("rpm", rpm), ("tpm", tpm), ("quota", quota_tokens)):
            if value is not None and value <= 0:
                raise KeyError_(f"--{what} must be a positive number")
        if ttl_s is not None and ttl_s <= 0:
            raise KeyError_("--ttl must be positive")
        secret = PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(name=name, hint=secret[:8], models=tuple(models), rpm=rpm, tpm=tpm, quota_tokens=quota_tokens,
                     created_at=now, expires_at=now + ttl_s if ttl_s else None, revoked_at=None)
        try:
            with self.store.transaction() as db:
                db.execute("INSERT INTO api_keys (name, hash, hint, models, rpm, tpm, quota_tokens, created_at, expires_at)"
                           " VALUES (?,?,?,?,?,?,?,?,?)",
                           (name, digest(secret), key.hint, ",".join(models), rpm, tpm, quota_tokens, now, key.expires_at))
        except sqlite3.IntegrityError:
            raise KeyError_(f"a key named {name!r} exists already: pick another name, or revoke it first") from None
        return key, secret

    def revoke(self, name: str, now: float) -> ApiKey:
        with self.store.transaction() as db:
            cur = db.execute("UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL", (now, name))
            if cur.rowcount == 0 and db.execute("SELECT 1 FROM api_keys WHERE name = ?", (name,)).fetchone() is None:
                raise KeyError_(f"no key is named {name!r} (`garage-node head key list` shows them)")
        return self.get(name)

    def get(self, name: str) -> ApiKey:
        rows = self.store.query("SELECT * FROM api_keys WHERE name = ?", (name,))
        if not rows:
            raise KeyError_(f"no key is named {name!r}")
        return _key(rows[0])

    def all(self) -> list[ApiKey]:
        return [_key(r) for r in self.store.query("SELECT * FROM api_keys ORDER BY created_at")]

    def lookup(self, secret: str) -> ApiKey | None:
        """The key this secret is, whatever its state (the caller says why it is refused)."""
        if not secret.startswith(PREFIX) or len(secret) > 128:
            return None
        rows = self.store.query("SELECT * FROM api_keys WHERE hash = ?", (digest(secret),))
        return _key(rows[0]) if rows else None


def _key(row: sqlite3.Row) -> ApiKey:
    return ApiKey(name=row["name"], hint=row["hint"], models=tuple(m for m in row["models"].split(",") if m),
                  rpm=row["rpm"], tpm=row["tpm"], quota_tokens=row["quota_tokens"], created_at=row["created_at"],
                  expires_at=row["expires_at"], revoked_at=row["revoked_at"])
