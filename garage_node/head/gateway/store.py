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
    # v3: issue #20, the audits' findings (head/audit/book.py): one row per scored audit, each
    # PC's standing in the sequential test, honest rates per model and precision, and the
    # audit loop's state for `head audit status`.
    """
    CREATE TABLE audits (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,                 -- when the PC answered (unix time)
        scored_at REAL NOT NULL,
        node_id TEXT NOT NULL, model TEXT NOT NULL,
        precision TEXT NOT NULL DEFAULT '',
        kind TEXT NOT NULL,               -- customer | canary | recheck
        greedy INTEGER NOT NULL, n INTEGER NOT NULL, bad INTEGER NOT NULL,
        z REAL NOT NULL, mean_gap REAL NOT NULL,
        early_stop INTEGER NOT NULL, usage_inflated INTEGER NOT NULL,
        tokens_counted INTEGER NOT NULL, tokens_reported INTEGER NOT NULL,
        llr_tokens REAL NOT NULL, llr_stops REAL NOT NULL, llr_usage REAL NOT NULL,
        verifier TEXT NOT NULL,           -- a trusted PC's node id, or 'verifier_url'
        engine TEXT NOT NULL DEFAULT ''   -- the PC's agent version when it answered
    );
    CREATE INDEX audits_node ON audits (node_id, at);
    CREATE INDEX audits_model ON audits (model, precision, at);
    CREATE TABLE audit_nodes (
        node_id TEXT PRIMARY KEY,
        requests INTEGER NOT NULL DEFAULT 0,      -- requests the gateway sent it
        audits INTEGER NOT NULL DEFAULT 0,        -- audits weighed by the sequential test
        sum_tokens REAL NOT NULL DEFAULT 0, sum_stops REAL NOT NULL DEFAULT 0,
        sum_usage REAL NOT NULL DEFAULT 0,
        updated_at REAL
    );
    CREATE TABLE audit_rates (
        model TEXT NOT NULL, precision TEXT NOT NULL,
        eps0 REAL NOT NULL,               -- the honest bad-token rate in use
        tokens INTEGER NOT NULL, bad INTEGER NOT NULL, audits INTEGER NOT NULL,
        calibrated_at REAL NOT NULL,
        PRIMARY KEY (model, precision)
    );
    CREATE TABLE audit_state (
        name TEXT PRIMARY KEY, value TEXT NOT NULL, at REAL NOT NULL
    );
    """,
    # v4: issue #20, every forfeit the operator made (`head node forfeit`), not only the last:
    # a PC quarantined, forfeited, released and quarantined again keeps its first forfeit
    # (head/gateway/ledger.py counts what each freeze held as forfeited).
    """
    CREATE TABLE node_forfeits (
        node_id TEXT NOT NULL,
        frozen_at REAL NOT NULL,          -- the freeze it kept: what was not yet earned then
        at REAL NOT NULL,                 -- when the operator forfeited it
        PRIMARY KEY (node_id, frozen_at)
    );
    INSERT INTO node_forfeits (node_id, frozen_at, at)
        SELECT node_id, forfeited_before, forfeited_before FROM node_trust
        WHERE forfeited = 1 AND forfeited_before IS NOT NULL;
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
