"""The head's registry (SQLite): join tokens, enrolled nodes, overlay addresses.

One file, opened by the head's server and by the `garage-node head` CLI alike; SQLite's
locking makes the two safe together. Overlay addresses are never handed out twice: a
revoked node keeps its row, and so its address.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from garage_node.core import token as tokens

SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    uses_left INTEGER,            -- NULL: unlimited until it expires
    uses INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    region TEXT NOT NULL,
    wg_public_key TEXT NOT NULL UNIQUE,
    overlay_ip TEXT NOT NULL UNIQUE,
    credential_hash TEXT NOT NULL,
    token_id TEXT NOT NULL,
    enrolled_at REAL NOT NULL,
    last_seen REAL,
    revoked_at REAL,
    report TEXT NOT NULL DEFAULT '{}',   -- the node's last heartbeat body (GPUs, versions, state)
    ray_alive INTEGER NOT NULL DEFAULT 0,
    ray_checked_at REAL
);
"""


class EnrollError(Exception):
    """A token was refused; `code` is machine-readable, the message is for a person."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class TokenRow:
    id: str
    created_at: float
    expires_at: float
    uses_left: int | None
    uses: int


@dataclass(frozen=True)
class NodeRow:
    id: str
    name: str
    region: str
    wg_public_key: str
    overlay_ip: str
    enrolled_at: float
    last_seen: float | None
    revoked_at: float | None
    report: dict[str, Any]
    ray_alive: bool
    ray_checked_at: float | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class Enrollment:
    node: NodeRow
    credential: str  # returned once, stored only as a hash


class Registry:
    def __init__(self, path: Path, network: ipaddress.IPv4Network) -> None:
        self.path = path
        self.network = network
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(SCHEMA)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA journal_mode=WAL")
            yield db
        finally:
            db.close()

    # -- tokens

    def add_token(self, token_id: str, secret: str, ttl_s: float, uses: int | None) -> TokenRow:
        now = time.time()
        with self._db() as db:
            db.execute(
                "INSERT INTO tokens (id, secret_hash, created_at, expires_at, uses_left) VALUES (?,?,?,?,?)",
                (token_id, tokens.hash_secret(secret), now, now + ttl_s, uses),
            )
        return TokenRow(token_id, now, now + ttl_s, uses, 0)

    def tokens(self) -> list[TokenRow]:
        with self._db() as db:
            rows = db.execute("SELECT id, created_at, expires_at, uses_left, uses FROM tokens ORDER BY created_at").fetchall()
        return [TokenRow(**dict(r)) for r in rows]

    # -- enrollment

    def enroll(self, token_id: str, secret: str, name: str, region: str, wg_public_key: str) -> Enrollment:
        """Spend one use of the token and register the node, all in one transaction."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                self._spend_token(db, token_id, secret)
                if db.execute("SELECT 1 FROM nodes WHERE wg_public_key=?", (wg_public_key,)).fetchone():
                    raise EnrollError("key_in_use", "this WireGuard key is already enrolled; the node must make a new key")
                node_id = "n" + secrets.token_hex(5)
                credential = secrets.token_urlsafe(32)
                ip = self._next_free_ip(db)
                db.execute(
                    "INSERT INTO nodes (id, name, region, wg_public_key, overlay_ip, credential_hash, token_id, enrolled_at)"
                    " VALUES (?,?,?,?,?,?,?,?)",
                    (node_id, name, region, wg_public_key, ip, tokens.hash_secret(credential), token_id, time.time()),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return Enrollment(self.node(node_id), credential)

    def _spend_token(self, db: sqlite3.Connection, token_id: str, secret: str) -> None:
        row = db.execute("SELECT * FROM tokens WHERE id=?", (token_id,)).fetchone()
        if row is None or not tokens.secret_matches(secret, row["secret_hash"]):
            raise EnrollError("token_unknown", "the head does not know this join token: ask the operator for a new one")
        if row["expires_at"] < time.time():
            raise EnrollError("token_expired", "this join token has expired: ask the operator for a new one")
        if row["uses_left"] is not None and row["uses_left"] <= 0:
            raise EnrollError("token_used", "this join token was already used: ask the operator for a new one")
        db.execute(
            "UPDATE tokens SET uses = uses + 1, uses_left = CASE WHEN uses_left IS NULL THEN NULL ELSE uses_left - 1 END WHERE id=?",
            (token_id,),
        )

    def _next_free_ip(self, db: sqlite3.Connection) -> str:
        taken = {r[0] for r in db.execute("SELECT overlay_ip FROM nodes")}
        hub = self.network.network_address + 1
        for ip in self.network.hosts():
            if ip != hub and str(ip) not in taken:
                return str(ip)
        raise EnrollError("network_full", f"the overlay {self.network} has no free address left: the operator must widen it")

    # -- nodes

    def node(self, node_id: str) -> NodeRow:
        with self._db() as db:
            row = db.execute("SELECT * FROM nodes WHERE id=?", (node_id,)).fetchone()
        if row is None:
            raise KeyError(node_id)
        return _node_row(row)

    def find_node(self, id_or_name: str) -> NodeRow:
        with self._db() as db:
            rows = db.execute("SELECT * FROM nodes WHERE id=? OR name=?", (id_or_name, id_or_name)).fetchall()
        if not rows:
            raise KeyError(id_or_name)
        if len(rows) > 1:
            raise LookupError(f"'{id_or_name}' names {len(rows)} nodes: use the node id ({', '.join(r['id'] for r in rows)})")
        return _node_row(rows[0])

    def nodes(self) -> list[NodeRow]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM nodes ORDER BY enrolled_at").fetchall()
        return [_node_row(r) for r in rows]

    def authenticate(self, node_id: str, credential: str) -> NodeRow | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM nodes WHERE id=?", (node_id,)).fetchone()
        if row is None or not tokens.secret_matches(credential, row["credential_hash"]):
            return None
        return _node_row(row)

    def record_heartbeat(self, node_id: str, report: dict[str, Any]) -> None:
        with self._db() as db:
            db.execute("UPDATE nodes SET last_seen=?, report=? WHERE id=?", (time.time(), json.dumps(report), node_id))

    def record_ray_membership(self, alive_node_ids: set[str]) -> None:
        now = time.time()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            for (node_id,) in db.execute("SELECT id FROM nodes").fetchall():
                db.execute("UPDATE nodes SET ray_alive=?, ray_checked_at=? WHERE id=?", (node_id in alive_node_ids, now, node_id))
            db.execute("COMMIT")

    def revoke(self, node_id: str) -> NodeRow:
        with self._db() as db:
            db.execute("UPDATE nodes SET revoked_at=COALESCE(revoked_at, ?) WHERE id=?", (time.time(), node_id))
        return self.node(node_id)

    def active_peers(self) -> list[NodeRow]:
        return [n for n in self.nodes() if not n.revoked]


def _node_row(row: sqlite3.Row) -> NodeRow:
    d = dict(row)
    return NodeRow(
        id=d["id"], name=d["name"], region=d["region"], wg_public_key=d["wg_public_key"],
        overlay_ip=d["overlay_ip"], enrolled_at=d["enrolled_at"], last_seen=d["last_seen"],
        revoked_at=d["revoked_at"], report=json.loads(d["report"] or "{}"),
        ray_alive=bool(d["ray_alive"]), ray_checked_at=d["ray_checked_at"],
    )
