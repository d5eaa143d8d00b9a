"""The gateway's own SQLite database (`gateway.db` in the head's state directory): API keys and
the usage ledger. Apart from the registry, so a burst of usage writes never waits on, or
delays, the heartbeat path, and the registry's schema stays the control plane's alone."""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SCHEMA = [
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
]


class Store:
    """One long-lived connection (WAL), serialised by a lock: the gateway's event loop, the
    control API's threads and the ledger's flusher all use it, each call short."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10.0)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        # The ledger's batches are its own durability unit; a crash loses at most the last one.
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._lock = threading.Lock()
        with self.transaction() as db:
            _migrate(db)
        path.chmod(0o600)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _migrate(db: sqlite3.Connection) -> None:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    for number, script in enumerate(SCHEMA[version:], start=version + 1):
        for statement in script.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {number}")
