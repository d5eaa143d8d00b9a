"""What the head trusts each PC with: the operator's mark (`head node trust`: a verifier) and
the audits' verdict (quarantine). Kept in the gateway's database, beside the ledger whose
earnings a quarantine freezes.

States:
- "ok": serves and earns (earnings held `[audit] hold_days` first);
- "quarantined": no traffic, no Ray work, its held earnings frozen; `why` says what the audits
  found;
- "rechecking": the operator asked for a release (`head node release`); still no customer
  traffic, the head sends it canaries and releases it (back to "ok") or quarantines it again.

Written by the audit loop and the control API's operator commands; read by the gateway's
table (who gets traffic), the heartbeat answer, `head nodes`, the fleet page and the ledger.
Reads are cached by `Trust.snapshot()` for the request path."""

from __future__ import annotations

from dataclasses import dataclass

from garage_node.core.clock import SYSTEM, Clock, Refreshed
from garage_node.core.wire import MESSAGE_MAX, QuarantineStatus, clip
from garage_node.head.gateway.store import Store

STATES = ("ok", "quarantined", "rechecking")
SNAPSHOT_TTL_S = 1.0


@dataclass(frozen=True)
class NodeTrust:
    node_id: str
    trusted: bool = False  # the operator's mark: its engine may verify others
    state: str = "ok"
    why: str = ""  # the audits' finding, for the owner and the operator
    since: float | None = None  # when the state last changed (unix time)
    # Earnings credited before this time (unix) and not yet earned are frozen by the
    # quarantine; None: nothing frozen.
    frozen_at: float | None = None
    forfeited: bool = False  # the operator forfeited what was frozen (`head node forfeit`)
    forfeited_before: float | None = None  # what was credited before this (unix) is forfeited
    # The freezes (their frozen_at) the operator forfeited, oldest first: each keeps what was
    # not yet earned at its time (node_forfeits; forfeited_before is only the last).
    forfeits: tuple[float, ...] = ()

    @property
    def serves(self) -> bool:
        """Whether customers' requests may go to it."""
        return self.state == "ok"


class Trust:
    def __init__(self, store: Store, clock: Clock = SYSTEM) -> None:
        self.store, self.clock = store, clock
        self._view = Refreshed(self._read_view, SNAPSHOT_TTL_S, clock)

    # -- reading

    def get(self, node_id: str) -> NodeTrust:
        rows = self.store.query("SELECT * FROM node_trust WHERE node_id = ?", (node_id,))
        return _row(rows[0], self._forfeits(node_id).get(node_id, ())) if rows else NodeTrust(node_id)

    def all(self) -> dict[str, NodeTrust]:
        forfeits = self._forfeits()
        return {r["node_id"]: _row(r, forfeits.get(r["node_id"], ())) for r in self.store.query("SELECT * FROM node_trust")}

    def _forfeits(self, node_id: str | None = None) -> dict[str, tuple[float, ...]]:
        where, args = ("WHERE node_id = ?", (node_id,)) if node_id is not None else ("", ())
        out: dict[str, list[float]] = {}
        for r in self.store.query(f"SELECT node_id, frozen_at FROM node_forfeits {where} ORDER BY frozen_at", args):
            out.setdefault(r[0], []).append(r[1])
        return {n: tuple(v) for n, v in out.items()}

    def snapshot(self) -> dict[str, NodeTrust]:
        """Every PC with a row, read at most once a second (for the request path)."""
        return self._view.get()[0]

    def excluded(self) -> frozenset[str]:
        """The PCs that must get no customer traffic (quarantined or being rechecked); asked
        on every customer's request (the router), so made once per read, not per call."""
        return self._view.get()[1]

    def trusted(self) -> frozenset[str]:
        return self._view.get()[2]

    def _read_view(self) -> tuple[dict[str, NodeTrust], frozenset[str], frozenset[str]]:
        snap = self.all()
        return (snap, frozenset(n for n, t in snap.items() if not t.serves),
                frozenset(n for n, t in snap.items() if t.trusted and t.serves))

    def _written(self) -> None:
        """The next read goes to the database (this process's own writes are seen at once)."""
        self._view.stale()

    # -- writing

    def set_trusted(self, node_id: str, trusted: bool) -> NodeTrust:
        self._upsert(node_id, "trusted = ?", (int(trusted),), insert={"trusted": int(trusted)})
        return self.get(node_id)

    def quarantine(self, node_id: str, why: str) -> NodeTrust:
        """Quarantined now; what it earned and has not yet earned is frozen (a second
        quarantine keeps the first freeze's time)."""
        now = self.clock.time()
        self._upsert(node_id, "state = 'quarantined', why = ?, since = ?, frozen_at = COALESCE(frozen_at, ?),"
                     " trusted = 0", (why, now, now),
                     insert={"state": "quarantined", "why": why, "since": now, "frozen_at": now})
        return self.get(node_id)

    def start_recheck(self, node_id: str) -> NodeTrust:
        """The operator asks for a release: canaries decide. Raises ValueError if the PC is not
        quarantined."""
        current = self.get(node_id)
        if current.state != "quarantined":
            raise ValueError(f"{node_id} is not quarantined (it is {current.state})")
        self._upsert(node_id, "state = 'rechecking', since = ?", (self.clock.time(),), insert={})
        return self.get(node_id)

    def release(self, node_id: str) -> NodeTrust:
        """Back to "ok" after a passed re-check; frozen earnings are held again (unless forfeited)."""
        self._upsert(node_id, "state = 'ok', why = '', since = ?, frozen_at = NULL", (self.clock.time(),), insert={})
        return self.get(node_id)

    def forfeit(self, node_id: str) -> NodeTrust:
        """The operator keeps what a quarantined PC had not yet earned. Raises ValueError if
        nothing is frozen."""
        current = self.get(node_id)
        if current.frozen_at is None:
            raise ValueError(f"{node_id} has no frozen earnings (it is {current.state})")
        if current.frozen_at in current.forfeits:
            raise ValueError(f"{node_id}'s frozen earnings are forfeited already")
        # The freeze's time stays as the line: what was credited before it is forfeited; every
        # forfeit is kept, not only the last (node_forfeits), in the same transaction.
        with self.store.transaction() as db:
            db.execute("UPDATE node_trust SET forfeited = 1, forfeited_before = frozen_at WHERE node_id = ?", (node_id,))
            db.execute("INSERT OR IGNORE INTO node_forfeits (node_id, frozen_at, at) VALUES (?, ?, ?)",
                       (node_id, current.frozen_at, self.clock.time()))
        self._written()
        return self.get(node_id)

    def _upsert(self, node_id: str, assignments: str, args: tuple, insert: dict) -> None:
        with self.store.transaction() as db:
            db.execute("INSERT OR IGNORE INTO node_trust (node_id) VALUES (?)", (node_id,))
            db.execute(f"UPDATE node_trust SET {assignments} WHERE node_id = ?", (*args, node_id))
        self._written()


# What the owner of a quarantined PC can do, said on its `status` and screen.
OWNER_HINT = ("the region gives this PC no requests and no Ray work, and holds what it earned since "
              "the hold began, until the operator releases it after a re-check on test requests: serve "
              "the assigned model as the head sent it (no other weights, quantization or engine), then "
              "ask the region's operator for `garage-node head node release`")
RECHECK_HINT = ("the operator asked for a release: the head is sending this PC test requests; keep the "
                "engine running as it is, and it serves again once they pass")


def quarantine_status(t: NodeTrust | None) -> QuarantineStatus | None:
    """What a PC is told in its heartbeat's answer; None while it serves."""
    if t is None or t.serves:
        return None
    return QuarantineStatus(state=t.state, why=clip(t.why or "its answers failed the region's audits", MESSAGE_MAX),
                            since=t.since, hint=RECHECK_HINT if t.state == "rechecking" else OWNER_HINT)


def _row(r, forfeits: tuple[float, ...] = ()) -> NodeTrust:
    return NodeTrust(node_id=r["node_id"], trusted=bool(r["trusted"]), state=r["state"], why=r["why"],
                     since=r["since"], frozen_at=r["frozen_at"], forfeited=bool(r["forfeited"]),
                     forfeited_before=r["forfeited_before"], forfeits=forfeits)
