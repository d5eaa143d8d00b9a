"""The head's registry (SQLite): join tokens, enrolled nodes, overlay addresses.

One file, opened by the head's server and by the `garage-node head` CLI alike; SQLite's
locking makes the two safe together. Overlay addresses are never handed out twice: a
revoked node keeps its row, and so its address.

Enrollment is idempotent: a node makes its WireGuard key before it calls the head, so a node
that crashed before the answer arrived asks again with the same token and key and gets the
same node id and address (and a fresh credential, since the first never arrived) without
spending another use of the token. A row is *confirmed* by the node's first authenticated
heartbeat; a row never confirmed is reclaimed after a while (its address and hub peer go, and
the token gets its use back).

Credentials expire (`credential_lifetime_s`); a node renews its credential over the
authenticated channel, and the one it replaces stays valid for `credential_overlap_s`, so an
answer lost on the way does not lock the node out.

Built for a thousand PCs beating every 5 s: long-lived connections (WAL, `head/sqlite.py`),
and, in the server, heartbeats and Ray membership held in memory and written in batches
(`head/heartbeats.py`). Every node row this object returns is read through `_select`, which lays
the values not yet written over the file's, so the head itself (heartbeat answers, the fleet)
never sees an older value; another process (the CLI) reads the file, at most `batch_s` behind.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from garage_node.core import token as tokens
from garage_node.core.errors import ErrorCode
from garage_node.head import sqlite
from garage_node.head.heartbeats import HeartbeatBuffer

# The first release's tables, as it made them. Frozen: version 1 (_adopt) builds on it, and every
# change after is a step added to MIGRATIONS.
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

# Columns added after the first release, before versions were numbered (see _adopt). Rows that
# existed before are taken as confirmed, and their credentials as issued at enrollment.
UNNUMBERED_COLUMNS = (
    ("confirmed_at", "REAL", "UPDATE nodes SET confirmed_at = COALESCE(last_seen, enrolled_at)"),
    ("credential_issued_at", "REAL", "UPDATE nodes SET credential_issued_at = enrolled_at"),
    ("prev_credential_hash", "TEXT", None),
    ("prev_credential_until", "REAL", None),
)

DEFAULT_CREDENTIAL_LIFETIME_S = 30 * 86400
DEFAULT_CREDENTIAL_OVERLAP_S = 3600


class EnrollError(Exception):
    """A token was refused; `code` is machine-readable, the message is for a person."""

    def __init__(self, code: ErrorCode, message: str) -> None:
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
    report: Any  # normally a dict (the last heartbeat's report); whatever the row holds
    ray_alive: bool
    ray_checked_at: float | None
    confirmed_at: float | None = None  # the node's first authenticated heartbeat

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class Enrollment:
    node: NodeRow
    credential: str = field(repr=False)  # returned once, stored only as a hash
    resumed: bool = False  # the same token and key again: the row of an enrollment whose answer was lost


@dataclass(frozen=True)
class Auth:
    """A node that proved its credential; `expires_in_s` is that credential's time left."""

    node: NodeRow
    expires_in_s: float
    lifetime_s: float
    previous: bool  # the credential presented is the one a renewal replaced (in its overlap)


@dataclass(frozen=True)
class Renewal:
    node: NodeRow
    credential: str = field(repr=False)
    expires_in_s: float
    lifetime_s: float
    key_changed: bool


class Registry:
    def __init__(self, path: Path, network: ipaddress.IPv4Network,
                 credential_lifetime_s: float = DEFAULT_CREDENTIAL_LIFETIME_S,
                 credential_overlap_s: float = DEFAULT_CREDENTIAL_OVERLAP_S,
                 batch_s: float | None = None) -> None:
        """`batch_s`: heartbeats and Ray membership are kept in memory and written every
        `batch_s` by a background thread (the server); None: written at once (the CLI)."""
        self.path = path
        self.network = network
        self.credential_lifetime_s = credential_lifetime_s
        self.credential_overlap_s = credential_overlap_s
        path.parent.mkdir(parents=True, exist_ok=True)
        # Three connections, each behind its own lock; with WAL, readers never wait for a writer.
        # - writes (enrollment, renewal, revocation, tokens): fsync'd at every commit, as an
        #   identity handed out must not be forgotten by a power cut;
        # - batches of heartbeats (synchronous=NORMAL, see heartbeats.py);
        # - reads.
        self._writes = sqlite.Database(path)
        self._reads = sqlite.Database(path)
        self._heartbeats = HeartbeatBuffer(sqlite.Database(path, synchronous="NORMAL"), batch_s)
        # The id of the Ray cluster the last membership came from (see record_ray_membership).
        self._ray_cluster_id = ""
        self._ray_dead: frozenset[str] = frozenset()
        self._writes.migrate(MIGRATIONS)
        # The region's catalog and the head's assignments (#18).
        self.region = RegionCatalog(self._writes, self._reads)

    @property
    def batch_s(self) -> float | None:
        return self._heartbeats.batch_s

    # -- batching

    def flush(self) -> int:
        """Write the heartbeats and membership held in memory, in one transaction; returns how
        many heartbeats were written."""
        return self._heartbeats.flush()

    def close(self) -> None:
        """Stop the flusher and write what is left (the head's shutdown). The registry still
        works afterwards, writing at once."""
        self._heartbeats.close()

    # -- the one read of node rows

    def _select(self, sql: str, args: Sequence[Any] = (), node_id: str | None = None,
                db: sqlite3.Connection | None = None, reports: bool = True) -> list[tuple[NodeRow, sqlite3.Row]]:
        """Node rows as the head knows them (what memory holds laid over the file), each beside
        the row as read (for columns a NodeRow does not carry). Every NodeRow this class returns
        is made here, so a new query cannot forget the heartbeats not yet written. `node_id`:
        the one node the query can return (only its held values are copied); `db`: a
        connection inside a write transaction."""
        before = self._heartbeats.held(node_id)
        rows = self._reads.query(sql, args) if db is None else db.execute(sql, args).fetchall()
        # A batch may have been written while the rows were read: the newest of the three wins.
        held = before.then(self._heartbeats.held(node_id))
        return [(held.lay_over(_file_row(r), reports), r) for r in rows]

    def _nodes(self, sql: str, args: Sequence[Any] = (), node_id: str | None = None) -> list[NodeRow]:
        return [node for node, _ in self._select(sql, args, node_id)]

    # -- tokens

    def add_token(self, token_id: str, secret: str, ttl_s: float, uses: int | None) -> TokenRow:
        now = time.time()
        with self._writes.use() as db:
            db.execute(
                "INSERT INTO tokens (id, secret_hash, created_at, expires_at, uses_left) VALUES (?,?,?,?,?)",
                (token_id, tokens.hash_secret(secret), now, now + ttl_s, uses),
            )
        return TokenRow(token_id, now, now + ttl_s, uses, 0)

    def tokens(self) -> list[TokenRow]:
        rows = self._reads.query("SELECT id, created_at, expires_at, uses_left, uses FROM tokens ORDER BY created_at")
        return [TokenRow(**dict(r)) for r in rows]

    # -- enrollment

    def enroll(self, token_id: str, secret: str, name: str, region: str, wg_public_key: str) -> Enrollment:
        """Spend one use of the token and register the node, all in one transaction; or, for
        the same token and key as an enrollment not yet confirmed, hand out that row again."""
        now = time.time()
        credential = secrets.token_urlsafe(32)
        with self._writes.transaction() as db:
            node_id = self._unconfirmed_enrollment(db, token_id, secret, wg_public_key)
            resumed = node_id is not None
            if node_id is None:
                self._spend_token(db, token_id, secret)
                if db.execute("SELECT 1 FROM nodes WHERE wg_public_key=?", (wg_public_key,)).fetchone():
                    raise EnrollError(ErrorCode.KEY_IN_USE, "this WireGuard key is already enrolled; the node must make a new key")
                node_id = "n" + secrets.token_hex(5)
                db.execute(
                    "INSERT INTO nodes (id, name, region, wg_public_key, overlay_ip, credential_hash, token_id,"
                    " enrolled_at) VALUES (?,?,?,?,?,?,?,?)",
                    (node_id, name, region, wg_public_key, self._next_free_ip(db), "", token_id, now),
                )
            # A resumed enrollment gets a fresh credential: the first one never reached the node.
            db.execute("UPDATE nodes SET credential_hash=?, credential_issued_at=?, prev_credential_hash=NULL,"
                       " prev_credential_until=NULL WHERE id=?", (tokens.hash_secret(credential), now, node_id))
        return Enrollment(self.node(node_id), credential, resumed)

    def _unconfirmed_enrollment(self, db: sqlite3.Connection, token_id: str, secret: str, wg_public_key: str) -> str | None:
        """The node id of an enrollment with this token and key that its node never confirmed
        (no authenticated heartbeat yet, in the file or in memory), if the secret is right. No
        use is spent on it, so the token's expiry and remaining uses do not matter here."""
        found = self._select("SELECT n.*, t.secret_hash AS token_secret_hash FROM nodes n JOIN tokens t ON t.id = n.token_id"
                             " WHERE n.wg_public_key=? AND n.token_id=? AND n.confirmed_at IS NULL"
                             " AND n.revoked_at IS NULL", (wg_public_key, token_id), db=db)
        for node, row in found:
            if node.confirmed_at is None and tokens.secret_matches(secret, row["token_secret_hash"]):
                return node.id
        return None

    def _spend_token(self, db: sqlite3.Connection, token_id: str, secret: str) -> None:
        row = db.execute("SELECT * FROM tokens WHERE id=?", (token_id,)).fetchone()
        if row is None or not tokens.secret_matches(secret, row["secret_hash"]):
            raise EnrollError(ErrorCode.TOKEN_UNKNOWN, "the head does not know this join token: ask the operator for a new one")
        if row["expires_at"] < time.time():
            raise EnrollError(ErrorCode.TOKEN_EXPIRED, "this join token has expired: ask the operator for a new one")
        if row["uses_left"] is not None and row["uses_left"] <= 0:
            raise EnrollError(ErrorCode.TOKEN_USED, "this join token was already used: ask the operator for a new one")
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
        raise EnrollError(ErrorCode.NETWORK_FULL, f"the overlay {self.network} has no free address left: the operator must widen it")

    # -- nodes

    def node(self, node_id: str) -> NodeRow:
        rows = self._nodes("SELECT * FROM nodes WHERE id=?", (node_id,), node_id)
        if not rows:
            raise KeyError(node_id)
        return rows[0]

    def find_node(self, id_or_name: str) -> NodeRow:
        rows = self._nodes("SELECT * FROM nodes WHERE id=? OR name=?", (id_or_name, id_or_name))
        if not rows:
            raise KeyError(id_or_name)
        if len(rows) > 1:
            raise LookupError(f"'{id_or_name}' names {len(rows)} nodes: use the node id ({', '.join(r.id for r in rows)})")
        return rows[0]

    def nodes(self) -> list[NodeRow]:
        return self._nodes("SELECT * FROM nodes ORDER BY enrolled_at")

    def authenticate(self, node_id: str, credential: str) -> Auth | None:
        """The node, if `credential` is its current credential or the one a renewal replaced
        (during the overlap). An expired credential still authenticates here, with
        `expires_in_s` <= 0: the API refuses it with its own message."""
        found = self._select("SELECT * FROM nodes WHERE id=?", (node_id,), node_id)
        if not found or not credential:
            return None
        node, row = found[0]
        now = time.time()
        if row["credential_hash"] and tokens.secret_matches(credential, row["credential_hash"]):
            issued = row["credential_issued_at"] or row["enrolled_at"]
            return Auth(node, issued + self.credential_lifetime_s - now, self.credential_lifetime_s, False)
        if row["prev_credential_hash"] and tokens.secret_matches(credential, row["prev_credential_hash"]):
            return Auth(node, (row["prev_credential_until"] or 0.0) - now, self.credential_lifetime_s, True)
        return None

    def record_heartbeat(self, node_id: str, report: dict[str, Any], confirm: bool = True) -> None:
        """Store a node's report. `confirm`: it came with the node's credential, which proves
        the node holds its identity (an enrollment's report does not)."""
        self._heartbeats.beat(node_id, report, time.time(), confirm)

    def renew_credential(self, auth: Auth, credential: str, wg_public_key: str | None = None) -> Renewal:
        """A new credential for an authenticated node (and, if given, a new WireGuard key).
        The credential presented (`credential`) stays valid for the overlap, never longer
        than it would have anyway."""
        now = time.time()
        node_id = auth.node.id
        new = secrets.token_urlsafe(32)
        key = wg_public_key or auth.node.wg_public_key
        with self._writes.transaction() as db:
            if db.execute("SELECT 1 FROM nodes WHERE wg_public_key=? AND id<>?", (key, node_id)).fetchone():
                raise EnrollError(ErrorCode.KEY_IN_USE, "this WireGuard key belongs to another node: make a new key")
            db.execute(
                "UPDATE nodes SET credential_hash=?, credential_issued_at=?, prev_credential_hash=?,"
                " prev_credential_until=?, wg_public_key=?, confirmed_at=COALESCE(confirmed_at, ?) WHERE id=?",
                (tokens.hash_secret(new), now, tokens.hash_secret(credential),
                 now + min(self.credential_overlap_s, max(0.0, auth.expires_in_s)), key, now, node_id),
            )
        return Renewal(self.node(node_id), new, self.credential_lifetime_s, self.credential_lifetime_s,
                       key_changed=key != auth.node.wg_public_key)

    def reclaim_unconfirmed(self, older_than_s: float) -> list[NodeRow]:
        """Remove enrollments whose node never confirmed them (never came back with its
        credential) within `older_than_s`: the address is free again, the hub peer goes with
        the next sync, and the token gets its use back. Revoked rows stay (the operator's)."""
        cutoff = time.time() - older_than_s
        with self._writes.transaction() as db:
            found = self._select("SELECT * FROM nodes WHERE confirmed_at IS NULL AND revoked_at IS NULL"
                                 " AND enrolled_at < ?", (cutoff,), db=db)
            gone = [(node, row) for node, row in found if node.confirmed_at is None]  # one confirmed in memory stays
            for node, row in gone:
                db.execute("DELETE FROM nodes WHERE id=?", (node.id,))
                db.execute("UPDATE tokens SET uses = MAX(uses - 1, 0), uses_left = CASE WHEN uses_left IS NULL"
                           " THEN NULL ELSE uses_left + 1 END WHERE id=?", (row["token_id"],))
        return [node for node, _ in gone]

    def record_ray_membership(self, alive_node_ids: set[str], cluster_id: str = "",
                              dead_node_ids: set[str] | frozenset[str] = frozenset()) -> None:
        """Which nodes the Ray head holds alive, the id of the Ray cluster that said so (hex; ""
        when not known), and which nodes it has declared dead. A call that clears the membership
        (no answer, the Ray head down or starting) clears the id and the dead with it."""
        # In memory only: a restarted head asks its Ray head again.
        self._ray_cluster_id = cluster_id
        self._ray_dead = frozenset(dead_node_ids)
        self._heartbeats.membership(alive_node_ids, time.time())

    def ray_dead(self, node_id: str) -> bool:
        """The Ray head has declared every Ray node of this node dead (see HeartbeatReply.ray_dead)."""
        return node_id in self._ray_dead

    @property
    def ray_cluster_id(self) -> str:
        """The Ray cluster the head's Ray head runs now, as the last membership said (nodes
        learn it with their heartbeat: a PC whose worker joined another cluster restarts it)."""
        return self._ray_cluster_id

    def revoke(self, node_id: str) -> NodeRow:
        with self._writes.use() as db:
            db.execute("UPDATE nodes SET revoked_at=COALESCE(revoked_at, ?) WHERE id=?", (time.time(), node_id))
        return self.node(node_id)

    def active_peers(self) -> list[NodeRow]:
        """The rows the hub needs (not revoked), without their reports: the head asks every
        couple of seconds, and decoding a thousand reports each time cost the heartbeats'
        latency (the reports are the one large column). `report` is {} in these rows."""
        found = self._select("SELECT id, name, region, wg_public_key, overlay_ip, enrolled_at, last_seen,"
                             " revoked_at, '{}' AS report, ray_alive, ray_checked_at, confirmed_at FROM nodes"
                             " WHERE revoked_at IS NULL ORDER BY enrolled_at", reports=False)
        return [node for node, _ in found]


@dataclass(frozen=True)
class RegionModel:
    """A model the operator wants the region to serve (`garage-node head model add`)."""

    model: str
    min_replicas: int = 0
    max_replicas: int | None = None
    weight: float = 1.0
    added_at: float = 0.0


@dataclass(frozen=True)
class CatalogEntry:
    """A catalog table imported by `garage-node head model import`, as the file had it."""

    kind: str  # "model" or "image"
    name: str
    body: dict[str, Any]
    source: str
    imported_at: float


class RegionCatalog:
    """The registry's part for issue #18: the region's models, imported catalog entries, each
    PC's assignment with its generation, and the last placement decision. Written by the CLI
    (models, imports) and by the head's placement loop (assignments, decision); every write is
    fsync'd at once (an assignment handed out must not be forgotten: its generation with it)."""

    def __init__(self, writes: sqlite.Database, reads: sqlite.Database) -> None:
        self._writes, self._reads = writes, reads

    # -- the region's models

    def put_model(self, m: RegionModel) -> RegionModel:
        """Add or change a model (its min, max and weight); returns it as stored."""
        with self._writes.transaction() as db:
            row = db.execute("SELECT added_at FROM region_models WHERE model=?", (m.model,)).fetchone()
            added = row["added_at"] if row else (m.added_at or time.time())
            db.execute("INSERT OR REPLACE INTO region_models (model, min_replicas, max_replicas, weight, added_at)"
                       " VALUES (?,?,?,?,?)", (m.model, m.min_replicas, m.max_replicas, m.weight, added))
        return RegionModel(m.model, m.min_replicas, m.max_replicas, m.weight, added)

    def remove_model(self, model: str) -> bool:
        with self._writes.use() as db:
            return db.execute("DELETE FROM region_models WHERE model=?", (model,)).rowcount > 0

    def models(self) -> list[RegionModel]:
        rows = self._reads.query("SELECT * FROM region_models ORDER BY added_at, model")
        return [RegionModel(r["model"], r["min_replicas"], r["max_replicas"], r["weight"], r["added_at"]) for r in rows]

    # -- imported catalog entries

    def import_entries(self, entries: Sequence[tuple[str, str, dict[str, Any]]], source: str) -> None:
        """(kind, name, table) each; an entry of the same kind and name is replaced. All or none."""
        now = time.time()
        with self._writes.transaction() as db:
            for kind, name, body in entries:
                db.execute("INSERT OR REPLACE INTO catalog_entries (kind, name, body, source, imported_at)"
                           " VALUES (?,?,?,?,?)", (kind, name, json.dumps(body), source, now))

    def entries(self) -> list[CatalogEntry]:
        rows = self._reads.query("SELECT * FROM catalog_entries ORDER BY imported_at, kind, name")
        return [CatalogEntry(r["kind"], r["name"], json.loads(r["body"]), r["source"], r["imported_at"]) for r in rows]

    # -- assignments

    def assignments(self) -> dict[str, dict[str, Any]]:
        """node id -> its last assignment as stored (a wire.Assignment's JSON)."""
        return {r["node_id"]: json.loads(r["body"]) for r in self._reads.query("SELECT node_id, body FROM assignments")}

    def assignment_generations(self) -> dict[str, int]:
        """node id -> the generation stored with its assignment (its own column, readable when
        the body is not)."""
        return {r["node_id"]: int(r["generation"])
                for r in self._reads.query("SELECT node_id, generation FROM assignments")}

    def store_assignments(self, changed: dict[str, dict[str, Any]]) -> None:
        """Store the assignments that changed (node id -> wire.Assignment's JSON, with its
        "generation"), in one transaction. A generation lower than the one stored is refused
        (ValueError, nothing written): a PC must never be told an older plan than it has seen."""
        if not changed:
            return
        now = time.time()
        with self._writes.transaction() as db:
            for node_id, body in changed.items():
                generation = int(body["generation"])
                row = db.execute("SELECT generation FROM assignments WHERE node_id=?", (node_id,)).fetchone()
                if row is not None and generation < row["generation"]:
                    raise ValueError(f"assignment generation {generation} for {node_id} is below the stored "
                                     f"{row['generation']}")
                db.execute("INSERT OR REPLACE INTO assignments (node_id, generation, body, updated_at) VALUES (?,?,?,?)",
                           (node_id, generation, json.dumps(body), now))

    # -- the last decision, for `head model list`

    def store_state(self, body: dict[str, Any]) -> None:
        with self._writes.use() as db:
            db.execute("INSERT OR REPLACE INTO placement_state (key, body, updated_at) VALUES ('last', ?, ?)",
                       (json.dumps(body), time.time()))

    def state(self) -> tuple[dict[str, Any], float] | None:
        """The last decision the head stored and when (time.time()), or None before the first."""
        rows = self._reads.query("SELECT body, updated_at FROM placement_state WHERE key='last'")
        return (json.loads(rows[0]["body"]), rows[0]["updated_at"]) if rows else None


def _file_row(row: sqlite3.Row) -> NodeRow:
    """A row as the file has it. Only `Registry._select` calls this: what memory holds goes over it there."""
    d = dict(row)
    return NodeRow(
        id=d["id"], name=d["name"], region=d["region"], wg_public_key=d["wg_public_key"],
        overlay_ip=d["overlay_ip"], enrolled_at=d["enrolled_at"], last_seen=d["last_seen"],
        revoked_at=d["revoked_at"], report=_report(d["report"]),
        ray_alive=bool(d["ray_alive"]), ray_checked_at=d["ray_checked_at"], confirmed_at=d.get("confirmed_at"),
    )


def _report(text: Any) -> Any:
    """The stored report as JSON; what does not parse (a damaged row) is passed on as the
    text, for `head nodes` to call unreadable rather than fail on."""
    try:
        return json.loads(text or "{}")
    except (TypeError, ValueError):
        return str(text)


def _adopt(db: sqlite3.Connection) -> None:
    """Version 1: whatever a registry from before numbered versions holds, brought to the schema
    of the release that began numbering them. Such a file may be empty, the first release's, or
    have some of the columns added since (each was added at open when missing), so this step
    looks before it adds; a column it adds is backfilled, one already there is left alone."""
    for statement in sqlite.statements(SCHEMA):
        db.execute(statement)
    have = {r[1] for r in db.execute("PRAGMA table_info(nodes)")}
    for column, kind, backfill in UNNUMBERED_COLUMNS:
        if column not in have:
            db.execute(f"ALTER TABLE nodes ADD COLUMN {column} {kind}")
            if backfill:
                db.execute(backfill)


# Version 2 (#18): the region's catalog (the models the operator wants served, and catalog entries
# imported from a file) and the head's assignment of each PC, with its generation. An assignment's
# row is never deleted (a PC revoked or idle keeps its generation), so a generation never goes
# back, across head restarts included.
REGION_CATALOG = """
CREATE TABLE region_models (
    model TEXT PRIMARY KEY,           -- a catalog name
    min_replicas INTEGER NOT NULL DEFAULT 0,
    max_replicas INTEGER,             -- NULL: as many as demand asks
    weight REAL NOT NULL DEFAULT 1.0,
    added_at REAL NOT NULL
);
CREATE TABLE catalog_entries (
    kind TEXT NOT NULL,               -- 'model' or 'image'
    name TEXT NOT NULL,
    body TEXT NOT NULL,               -- the entry's TOML table, as JSON
    source TEXT NOT NULL,             -- the file it was imported from
    imported_at REAL NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE assignments (
    node_id TEXT PRIMARY KEY,
    generation INTEGER NOT NULL,
    body TEXT NOT NULL,               -- the wire.Assignment, as JSON
    updated_at REAL NOT NULL
);
CREATE TABLE placement_state (
    key TEXT PRIMARY KEY,             -- 'last': the last decision (models, explanations), for `head model list`
    body TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""

# Step i brings the file to user_version i + 1; add new steps at the end, never edit one shipped.
MIGRATIONS: list[sqlite.Step] = [_adopt, REGION_CATALOG]
