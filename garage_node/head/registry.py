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

Built for a thousand PCs beating every 5 s: one long-lived connection (WAL) behind a lock, as
the API runs its handlers in threads, where a connection per call and an fsync per heartbeat
capped the head near 150 heartbeats/s. With `batch_s` (the server's registry), a heartbeat and
Ray's membership are taken into memory and acknowledged at once; a background flusher writes
them in one transaction every `batch_s`, and `close()` writes what is left. A crash loses at
most the last batch: a "last seen", a report and a membership the next heartbeat or Ray
answer brings back. Every read of this object lays the values not yet written over the rows, so
the head itself (heartbeat answers, the fleet) never sees an older value; another process (the
CLI) reads the file, at most `batch_s` behind.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from garage_node.core import token as tokens

log = logging.getLogger(__name__)

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

# Columns added after the first release; a registry made before them gets them at open.
# Rows that existed before are taken as confirmed, and their credentials as issued at enrollment.
MIGRATIONS = (
    ("confirmed_at", "REAL", "UPDATE nodes SET confirmed_at = COALESCE(last_seen, enrolled_at)"),
    ("credential_issued_at", "REAL", "UPDATE nodes SET credential_issued_at = enrolled_at"),
    ("prev_credential_hash", "TEXT", None),
    ("prev_credential_until", "REAL", None),
)

DEFAULT_CREDENTIAL_LIFETIME_S = 30 * 86400
DEFAULT_CREDENTIAL_OVERLAP_S = 3600


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


@dataclass
class _Beat:
    """A heartbeat taken into memory and not yet written."""

    last_seen: float
    report: dict[str, Any]
    confirmed_at: float | None  # the first authenticated heartbeat among those not yet written


@dataclass
class _Held:
    beats: dict[str, list[_Beat]]
    rays: list[tuple[frozenset[str], float]]


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
        self.batch_s = batch_s
        path.parent.mkdir(parents=True, exist_ok=True)
        # Long-lived connections, each behind its own lock (the API runs handlers in threads;
        # a sqlite3 connection must not be used by two at once). With WAL, readers never wait
        # for a writer: a heartbeat's credential check does not queue behind a batch's fsync.
        # - writes (enrollment, renewal, revocation, tokens): fsync'd at every commit, as an
        #   identity handed out must not be forgotten by a power cut;
        # - batches of heartbeats: synchronous=NORMAL (WAL: synced at checkpoints), since a lost
        #   batch costs only a "last seen";
        # - reads.
        self._lock = threading.RLock()
        self._conn = _connect(path)
        self._read_lock = threading.Lock()
        self._read_conn = _connect(path)
        self._batch_lock = threading.Lock()
        self._batch_conn = _connect(path)
        self._batch_conn.execute("PRAGMA synchronous=NORMAL")
        # Separate from the connections' locks: taking a heartbeat into memory never waits for the disk.
        self._pending_lock = threading.Lock()
        self._beats: dict[str, _Beat] = {}
        self._ray: tuple[frozenset[str], float] | None = None  # membership not yet written
        # What a flush is writing right now: still laid over reads until its commit is done.
        self._inflight_beats: dict[str, _Beat] = {}
        self._inflight_ray: tuple[frozenset[str], float] | None = None
        self._flusher: threading.Thread | None = None
        self._stop_flusher = threading.Event()
        # The id of the Ray cluster the last membership came from (see record_ray_membership).
        self._ray_cluster_id = ""
        with self._db() as db:
            db.executescript(SCHEMA)
            _migrate(db)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._conn

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        with self._read_lock:
            yield self._read_conn

    # -- batching

    def flush(self) -> int:
        """Write the heartbeats and membership held in memory, in one transaction; returns how
        many heartbeats were written. What is being written stays laid over reads until the
        commit is done, so a reader sees each value in memory or in the file, never in neither."""
        with self._batch_lock:
            with self._pending_lock:
                beats, self._beats = self._beats, {}
                ray, self._ray = self._ray, None
                self._inflight_beats, self._inflight_ray = beats, ray
            if not beats and ray is None:
                return 0
            db = self._batch_conn
            db.execute("BEGIN IMMEDIATE")
            try:
                if beats:
                    db.executemany(
                        "UPDATE nodes SET last_seen=?, report=?, confirmed_at=COALESCE(confirmed_at, ?) WHERE id=?",
                        [(b.last_seen, json.dumps(b.report), b.confirmed_at, node_id) for node_id, b in beats.items()])
                if ray is not None:
                    alive, checked_at = ray
                    db.execute("UPDATE nodes SET ray_alive = id IN (SELECT value FROM json_each(?)), ray_checked_at=?",
                               (json.dumps(sorted(alive)), checked_at))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                # Put them back unless newer values came in meanwhile: the next pass retries.
                with self._pending_lock:
                    for node_id, b in beats.items():
                        self._beats.setdefault(node_id, b)
                    if self._ray is None:
                        self._ray = ray
                raise
            finally:
                with self._pending_lock:
                    self._inflight_beats, self._inflight_ray = {}, None
        return len(beats)

    def close(self) -> None:
        """Stop the flusher and write what is left (the head's shutdown). The registry still
        works afterwards, writing at once."""
        self._stop_flusher.set()
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.join(timeout=10)
        self.batch_s = None
        self.flush()

    def _flush_loop(self) -> None:
        assert self.batch_s is not None
        while not self._stop_flusher.wait(self.batch_s):
            try:
                self.flush()
            except Exception:  # a locked or full disk: keep them in memory, try again
                log.exception("writing heartbeats to the registry failed; retrying")

    def _held(self) -> bool:
        """Whether to hold this write in memory (and start the flusher on first use)."""
        if self.batch_s is None or self._stop_flusher.is_set():
            return False
        if self._flusher is None:
            with self._pending_lock:
                if self._flusher is None:
                    self._flusher = threading.Thread(target=self._flush_loop, name="registry-flush", daemon=True)
                    self._flusher.start()
        return True

    def _confirmed_in_memory(self, node_id: str) -> bool:
        with self._pending_lock:
            beats = (self._beats.get(node_id), self._inflight_beats.get(node_id))
        return any(b is not None and b.confirmed_at is not None for b in beats)

    def _held_now(self, node_id: str | None = None) -> _Held:
        """What memory holds (waiting, or being written) for one node, or for all."""
        with self._pending_lock:
            if node_id is None:
                ids = self._beats.keys() | self._inflight_beats.keys()
            else:
                ids = {node_id}
            beats = {}
            for i in ids:
                got = [b for b in (self._beats.get(i), self._inflight_beats.get(i)) if b is not None]
                if got:
                    beats[i] = got
            rays = [r for r in (self._ray, self._inflight_ray) if r is not None]
        return _Held(beats, rays)

    def _fresh(self, row: sqlite3.Row, before: _Held, after: _Held) -> NodeRow:
        """A row with what memory holds newer than the file laid over it. `before` and `after`
        are what memory held just before and just after the row was read: a batch may have
        been written in between, so the newest of the three wins (by its own timestamp)."""
        node = _node_row(row)
        beats = before.beats.get(node.id, []) + after.beats.get(node.id, [])
        if beats:
            beat = max(beats, key=lambda b: b.last_seen)
            if node.last_seen is None or beat.last_seen >= node.last_seen:
                node = replace(node, last_seen=beat.last_seen, report=beat.report)
            if node.confirmed_at is None:
                node = replace(node, confirmed_at=min((b.confirmed_at for b in beats if b.confirmed_at is not None),
                                                      default=None))
        rays = before.rays + after.rays
        if rays:
            alive, checked_at = max(rays, key=lambda r: r[1])
            if node.ray_checked_at is None or checked_at >= node.ray_checked_at:
                node = replace(node, ray_alive=node.id in alive, ray_checked_at=checked_at)
        return node

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
        with self._reader() as db:
            rows = db.execute("SELECT id, created_at, expires_at, uses_left, uses FROM tokens ORDER BY created_at").fetchall()
        return [TokenRow(**dict(r)) for r in rows]

    # -- enrollment

    def enroll(self, token_id: str, secret: str, name: str, region: str, wg_public_key: str) -> Enrollment:
        """Spend one use of the token and register the node, all in one transaction; or, for
        the same token and key as an enrollment not yet confirmed, hand out that row again."""
        now = time.time()
        credential = secrets.token_urlsafe(32)
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                node_id = self._unconfirmed_enrollment(db, token_id, secret, wg_public_key)
                resumed = node_id is not None
                if node_id is None:
                    self._spend_token(db, token_id, secret)
                    if db.execute("SELECT 1 FROM nodes WHERE wg_public_key=?", (wg_public_key,)).fetchone():
                        raise EnrollError("key_in_use", "this WireGuard key is already enrolled; the node must make a new key")
                    node_id = "n" + secrets.token_hex(5)
                    db.execute(
                        "INSERT INTO nodes (id, name, region, wg_public_key, overlay_ip, credential_hash, token_id,"
                        " enrolled_at) VALUES (?,?,?,?,?,?,?,?)",
                        (node_id, name, region, wg_public_key, self._next_free_ip(db), "", token_id, now),
                    )
                # A resumed enrollment gets a fresh credential: the first one never reached the node.
                db.execute("UPDATE nodes SET credential_hash=?, credential_issued_at=?, prev_credential_hash=NULL,"
                           " prev_credential_until=NULL WHERE id=?", (tokens.hash_secret(credential), now, node_id))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return Enrollment(self.node(node_id), credential, resumed)

    def _unconfirmed_enrollment(self, db: sqlite3.Connection, token_id: str, secret: str, wg_public_key: str) -> str | None:
        """The node id of an enrollment with this token and key that its node never confirmed
        (no authenticated heartbeat yet), if the secret is right. No use is spent on it, so
        the token's expiry and remaining uses do not matter here."""
        row = db.execute("SELECT n.id, t.secret_hash FROM nodes n JOIN tokens t ON t.id = n.token_id"
                         " WHERE n.wg_public_key=? AND n.token_id=? AND n.confirmed_at IS NULL AND n.revoked_at IS NULL",
                         (wg_public_key, token_id)).fetchone()
        if row is None or not tokens.secret_matches(secret, row["secret_hash"]) or self._confirmed_in_memory(row["id"]):
            return None
        return row["id"]

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
        before = self._held_now(node_id)
        with self._reader() as db:
            row = db.execute("SELECT * FROM nodes WHERE id=?", (node_id,)).fetchone()
        if row is None:
            raise KeyError(node_id)
        return self._fresh(row, before, self._held_now(node_id))

    def find_node(self, id_or_name: str) -> NodeRow:
        before = self._held_now()
        with self._reader() as db:
            rows = db.execute("SELECT * FROM nodes WHERE id=? OR name=?", (id_or_name, id_or_name)).fetchall()
        if not rows:
            raise KeyError(id_or_name)
        if len(rows) > 1:
            raise LookupError(f"'{id_or_name}' names {len(rows)} nodes: use the node id ({', '.join(r['id'] for r in rows)})")
        return self._fresh(rows[0], before, self._held_now())

    def nodes(self) -> list[NodeRow]:
        before = self._held_now()
        with self._reader() as db:
            rows = db.execute("SELECT * FROM nodes ORDER BY enrolled_at").fetchall()
        after = self._held_now()
        return [self._fresh(r, before, after) for r in rows]

    def authenticate(self, node_id: str, credential: str) -> Auth | None:
        """The node, if `credential` is its current credential or the one a renewal replaced
        (during the overlap). An expired credential still authenticates here, with
        `expires_in_s` <= 0: the API refuses it with its own message."""
        before = self._held_now(node_id)
        with self._reader() as db:
            row = db.execute("SELECT * FROM nodes WHERE id=?", (node_id,)).fetchone()
        if row is None or not credential:
            return None
        after = self._held_now(node_id)
        now = time.time()
        if row["credential_hash"] and tokens.secret_matches(credential, row["credential_hash"]):
            issued = row["credential_issued_at"] or row["enrolled_at"]
            return Auth(self._fresh(row, before, after), issued + self.credential_lifetime_s - now, self.credential_lifetime_s, False)
        if row["prev_credential_hash"] and tokens.secret_matches(credential, row["prev_credential_hash"]):
            return Auth(self._fresh(row, before, after), (row["prev_credential_until"] or 0.0) - now, self.credential_lifetime_s, True)
        return None

    def record_heartbeat(self, node_id: str, report: dict[str, Any], confirm: bool = True) -> None:
        """Store a node's report. `confirm`: it came with the node's credential, which proves
        the node holds its identity (an enrollment's report does not)."""
        now = time.time()
        if self._held():
            with self._pending_lock:
                before = self._beats.get(node_id)
                first = before.confirmed_at if before is not None and before.confirmed_at is not None else None
                self._beats[node_id] = _Beat(now, report, first if first is not None else (now if confirm else None))
            return
        with self._db() as db:
            db.execute("UPDATE nodes SET last_seen=?, report=?, confirmed_at=CASE WHEN ? THEN COALESCE(confirmed_at, ?)"
                       " ELSE confirmed_at END WHERE id=?", (now, json.dumps(report), confirm, now, node_id))

    def renew_credential(self, auth: Auth, credential: str, wg_public_key: str | None = None) -> Renewal:
        """A new credential for an authenticated node (and, if given, a new WireGuard key).
        The credential presented (`credential`) stays valid for the overlap, never longer
        than it would have anyway."""
        now = time.time()
        node_id = auth.node.id
        new = secrets.token_urlsafe(32)
        key = wg_public_key or auth.node.wg_public_key
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                if db.execute("SELECT 1 FROM nodes WHERE wg_public_key=? AND id<>?", (key, node_id)).fetchone():
                    raise EnrollError("key_in_use", "this WireGuard key belongs to another node: make a new key")
                db.execute(
                    "UPDATE nodes SET credential_hash=?, credential_issued_at=?, prev_credential_hash=?,"
                    " prev_credential_until=?, wg_public_key=?, confirmed_at=COALESCE(confirmed_at, ?) WHERE id=?",
                    (tokens.hash_secret(new), now, tokens.hash_secret(credential),
                     now + min(self.credential_overlap_s, max(0.0, auth.expires_in_s)), key, now, node_id),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return Renewal(self.node(node_id), new, self.credential_lifetime_s, self.credential_lifetime_s,
                       key_changed=key != auth.node.wg_public_key)

    def reclaim_unconfirmed(self, older_than_s: float) -> list[NodeRow]:
        """Remove enrollments whose node never confirmed them (never came back with its
        credential) within `older_than_s`: the address is free again, the hub peer goes with
        the next sync, and the token gets its use back. Revoked rows stay (the operator's)."""
        cutoff = time.time() - older_than_s
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                rows = db.execute("SELECT * FROM nodes WHERE confirmed_at IS NULL AND revoked_at IS NULL"
                                  " AND enrolled_at < ?", (cutoff,)).fetchall()
                # A confirmation still in memory keeps its row.
                rows = [r for r in rows if not self._confirmed_in_memory(r["id"])]
                for row in rows:
                    db.execute("DELETE FROM nodes WHERE id=?", (row["id"],))
                    db.execute("UPDATE tokens SET uses = MAX(uses - 1, 0), uses_left = CASE WHEN uses_left IS NULL"
                               " THEN NULL ELSE uses_left + 1 END WHERE id=?", (row["token_id"],))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return [_node_row(r) for r in rows]

    def record_ray_membership(self, alive_node_ids: set[str], cluster_id: str = "") -> None:
        """Which nodes the Ray head holds alive, and the id of the Ray cluster that said so
        (hex; "" when not known). A call that clears the membership (no answer, the Ray head
        down or starting) clears the id with it."""
        now = time.time()
        self._ray_cluster_id = cluster_id  # in memory only: a restarted head asks its Ray head again
        if self._held():
            with self._pending_lock:
                self._ray = (frozenset(alive_node_ids), now)
            return
        with self._db() as db:
            db.execute("UPDATE nodes SET ray_alive = id IN (SELECT value FROM json_each(?)), ray_checked_at=?",
                       (json.dumps(sorted(alive_node_ids)), now))

    @property
    def ray_cluster_id(self) -> str:
        """The Ray cluster the head's Ray head runs now, as the last membership said (nodes
        learn it with their heartbeat: a PC whose worker joined another cluster restarts it)."""
        return self._ray_cluster_id

    def revoke(self, node_id: str) -> NodeRow:
        with self._db() as db:
            db.execute("UPDATE nodes SET revoked_at=COALESCE(revoked_at, ?) WHERE id=?", (time.time(), node_id))
        return self.node(node_id)

    def active_peers(self) -> list[NodeRow]:
        """The rows the hub needs (not revoked), without their reports: the head asks every
        couple of seconds, and decoding a thousand reports each time cost the heartbeats'
        latency (the reports are the one large column). `report` is {} in these rows."""
        with self._reader() as db:
            rows = db.execute("SELECT id, name, region, wg_public_key, overlay_ip, enrolled_at, last_seen, revoked_at,"
                              " '{}' AS report, ray_alive, ray_checked_at, confirmed_at FROM nodes"
                              " WHERE revoked_at IS NULL ORDER BY enrolled_at").fetchall()
        return [_node_row(r) for r in rows]


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    return db


def _node_row(row: sqlite3.Row) -> NodeRow:
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


def _migrate(db: sqlite3.Connection) -> None:
    # In one write transaction: the server and a CLI command may open an old registry at once.
    db.execute("BEGIN IMMEDIATE")
    try:
        have = {r[1] for r in db.execute("PRAGMA table_info(nodes)")}
        for column, kind, backfill in MIGRATIONS:
            if column not in have:
                db.execute(f"ALTER TABLE nodes ADD COLUMN {column} {kind}")
                if backfill:
                    db.execute(backfill)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
