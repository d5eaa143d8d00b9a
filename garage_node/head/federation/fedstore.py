"""`federation.db` in the head's state directory: every region's usage records (the global
ledger, one row per request id: a record that arrives twice is kept once), which of this
region's own records are in its NATS stream yet, and the last version of each key record this
head has published or applied. Its own file: the gateway's schema stays the gateway's."""

from __future__ import annotations

from pathlib import Path

from garage_node.head import sqlite
from garage_node.head.federation.records import UsageRecord

MIGRATIONS: list[sqlite.Step] = [
    """
    CREATE TABLE usage_log (
        id TEXT PRIMARY KEY,                -- the request's id, unique across the network
        region TEXT NOT NULL, at REAL NOT NULL,
        key TEXT NOT NULL, node_id TEXT NOT NULL, node_name TEXT NOT NULL, model TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL
    );
    CREATE INDEX usage_log_region ON usage_log (region, at);
    CREATE TABLE key_seen (
        name TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,          -- records.KeyRecord.fingerprint()
        updated_at REAL NOT NULL,
        origin TEXT NOT NULL
    );
    CREATE TABLE cursor (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    """,
    # v2: the region that grants each key's quota leases (leases.py)
    """
    ALTER TABLE key_seen ADD COLUMN home TEXT NOT NULL DEFAULT '';
    """,
]

GROUPS = {"key": "key", "region": "region", "node": "node_name", "model": "model"}


class FedStore(sqlite.Database):
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(path, synchronous="NORMAL")
        self.migrate(MIGRATIONS)
        path.chmod(0o600)

    def add_usage(self, records: list[UsageRecord]) -> int:
        """Insert what is new; a record already here (same id) is skipped. Returns how many were new."""
        with self.transaction() as db:
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO usage_log VALUES (?,?,?,?,?,?,?,?,?)",
                           [(r.id, r.region, r.at, r.key, r.node_id, r.node_name, r.model, r.prompt_tokens,
                             r.completion_tokens) for r in records])
            return int(db.total_changes - before)

    def own_unshipped(self, region: str, limit: int = 500) -> list[tuple[int, UsageRecord]]:
        after = self.cursor_value("shipped")
        rows = self.query("SELECT rowid, * FROM usage_log WHERE region = ? AND rowid > ? ORDER BY rowid LIMIT ?",
                          (region, after, limit))
        return [(r[0], UsageRecord(*tuple(r)[1:])) for r in rows]

    def own_unshipped_count(self, region: str) -> int:
        """How many of this region's records are not in its stream yet (for the status)."""
        return int(self.query("SELECT COUNT(*) FROM usage_log WHERE region = ? AND rowid > ?",
                              (region, self.cursor_value("shipped")))[0][0])

    def cursor_value(self, name: str) -> int:
        rows = self.query("SELECT value FROM cursor WHERE name = ?", (name,))
        return int(rows[0][0]) if rows else 0

    def set_cursor(self, name: str, value: int) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO cursor VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                       (name, value))

    def key_seen(self) -> dict[str, tuple[str, float]]:
        return {r[0]: (r[1], r[2]) for r in self.query("SELECT name, fingerprint, updated_at FROM key_seen")}

    def key_homes(self) -> dict[str, str]:
        return {r[0]: r[1] for r in self.query("SELECT name, home FROM key_seen WHERE home != ''")}

    def set_key_seen(self, name: str, fingerprint: str, updated_at: float, origin: str, home: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO key_seen (name, fingerprint, updated_at, origin, home) VALUES (?,?,?,?,?)"
                       " ON CONFLICT (name) DO UPDATE SET fingerprint = excluded.fingerprint,"
                       " updated_at = excluded.updated_at, origin = excluded.origin,"
                       " home = CASE WHEN key_seen.home = '' THEN excluded.home ELSE key_seen.home END",
                       (name, fingerprint, updated_at, origin, home))

    def spent(self, region: str) -> dict[str, int]:
        """Tokens served per key in `region` (for its leases)."""
        return {r[0]: int(r[1]) for r in self.query(
            "SELECT key, SUM(prompt_tokens + completion_tokens) FROM usage_log WHERE region = ? GROUP BY key", (region,))}

    def usage(self, by: str, since: float = 0.0) -> list[tuple[str, int, int, int]]:
        """(group, requests, prompt tokens, completion tokens) over every region's records."""
        if by not in GROUPS:
            raise ValueError(f"global usage is grouped by one of {', '.join(GROUPS)}, not {by!r}")
        col = GROUPS[by]
        rows = self.query(f"SELECT {col}, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM usage_log"
                          f" WHERE at >= ? GROUP BY {col} ORDER BY SUM(prompt_tokens + completion_tokens) DESC, {col}",
                          (since,))
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def counts(self) -> dict[str, int]:
        """Records per region (for the status and the proofs)."""
        return {r[0]: r[1] for r in self.query("SELECT region, COUNT(*) FROM usage_log GROUP BY region")}
