"""The gateway's own SQLite database (`gateway.db` in the head's state directory): API keys and
the usage ledger. Apart from the registry, so a burst of usage writes never waits on, or
delays, the heartbeat path, and the registry's schema stays the control plane's alone."""

from __future__ import annotations

from pathlib import Path

from garage_node.head import sqlite

# Step i brings the file to user_version i + 1 (this file has been numbered from its first
# release); add new steps at the end, never edit one shipped.
MIGRATIONS: list[sqlite.Step] = [
    # v1
    """
    CREATE TABLE api_keys (
        name TEXT PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,          -- sha256 of the key (the key itself is shown once)
        hint TEXT NOT NULL,                 -- its first characters, to tell keys apart
        models TEXT NOT NULL DEFAULT '',    -- comma-separated, empty: every model
        rpm INTEGER, tpm INTEGER, quota_tokens INTEGER,
        created_at REAL NOT NULL, expires_at REAL, revoked_at REAL
    );
    CREATE TABLE usage (
        hour INTEGER NOT NULL,              -- unix time // 3600 (UTC)
        key TEXT NOT NULL, node_id TEXT NOT NULL, model TEXT NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (hour, key, node_id, model)
    );
    CREATE INDEX usage_node ON usage (node_id, hour);
    CREATE INDEX usage_key ON usage (key, hour);
    """,
    # v2: issue #20, audits. node_trust: head/audit/trust.py. Further audit tables are added
    # by later steps, never by editing this one.
    """
    CREATE TABLE node_trust (
        node_id TEXT PRIMARY KEY,
        trusted INTEGER NOT NULL DEFAULT 0,       -- the operator's mark: may verify others
        state TEXT NOT NULL DEFAULT 'ok',         -- ok | quarantined | rechecking
        why TEXT NOT NULL DEFAULT '',
        since REAL,
        frozen_at REAL,                           -- earnings credited before this are frozen
        forfeited INTEGER NOT NULL DEFAULT 0,
        forfeited_before REAL                     -- what was credited before this is forfeited
    );
    """,
]


class Store(sqlite.Database):
    """One long-lived connection (WAL), serialised by a lock: the gateway's event loop, the
    control API's threads and the ledger's flusher all use it, each call short."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The ledger's batches are its own durability unit; a crash loses at most the last one.
        super().__init__(path, synchronous="NORMAL")
        self.migrate(MIGRATIONS)
        path.chmod(0o600)  # key hashes and who used what: the operator's alone
