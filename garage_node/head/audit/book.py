"""The audits' book in the gateway's database (tables of migration v3, head/gateway/store.py):
every scored audit, each PC's standing in the sequential test, the honest rates per model and
precision, and the audit loop's state for `head audit status` (another process reads it)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from garage_node.head.audit import sprt
from garage_node.head.audit.score import Score
from garage_node.head.gateway.store import Store

# `head audit calibrate`: at least this many greedy audits of trusted PCs (none bad in 150:
# a 99 % bound of 3.5 %, which is conservative: honest PCs drift down, cheaters are caught a
# little later).
CALIBRATE_MIN_AUDITS = 150


class CalibrationError(ValueError):
    pass


@dataclass(frozen=True)
class Rate:
    model: str
    precision: str
    eps0: float  # the honest share of greedy audits with a bad token (a 99 % upper bound)
    tokens: int  # the greedy tokens those audits held
    bad: int  # greedy audits with a bad token
    audits: int  # greedy audits
    calibrated_at: float


@dataclass(frozen=True)
class NodeLine:
    """One PC's line of `head audit status`."""

    node_id: str
    requests: int
    audits: int
    sums: dict[str, float]
    updated_at: float | None


class Book:
    def __init__(self, store: Store) -> None:
        self.store = store

    # -- the sequential test's standing

    def records(self) -> dict[str, sprt.Record]:
        return {r["node_id"]: _record(r) for r in self.store.query("SELECT * FROM audit_nodes")}

    def nodes(self) -> list[NodeLine]:
        return [NodeLine(r["node_id"], r["requests"], r["audits"], _record(r).sums, r["updated_at"])
                for r in self.store.query("SELECT * FROM audit_nodes ORDER BY node_id")]

    def requests(self) -> dict[str, int]:
        return {r["node_id"]: r["requests"] for r in self.store.query("SELECT node_id, requests FROM audit_nodes")}

    def add_requests(self, counts: dict[str, int], now: float) -> None:
        """Each PC's request count (the sampler's, which only grows)."""
        with self.store.transaction() as db:
            for node_id, n in counts.items():
                db.execute("INSERT INTO audit_nodes (node_id, requests, updated_at) VALUES (?, ?, ?) "
                           "ON CONFLICT (node_id) DO UPDATE SET requests = MAX(requests, excluded.requests)",
                           (node_id, n, now))

    def record(self, at: float, scored_at: float, node_id: str, model: str, precision: str, kind: str,
               s: Score, llr: dict[str, float], verifier: str, engine: str, standing: sprt.Record | None) -> None:
        """One scored audit; `standing`: the PC's record after it (None: a re-check's audit,
        which does not count in the PC's record)."""
        with self.store.transaction() as db:
            db.execute("INSERT INTO audits (at, scored_at, node_id, model, precision, kind, greedy, n, bad, z, "
                       "mean_gap, early_stop, usage_inflated, tokens_counted, tokens_reported, llr_tokens, "
                       "llr_partial, llr_stops, llr_usage, verifier, engine) "
                       "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       (at, scored_at, node_id, model, precision, kind, int(s.greedy), s.n, s.bad, _finite(s.z),
                        _finite(s.mean_gap), int(s.early_stop), int(s.usage_inflated), s.tokens_counted,
                        s.tokens_reported, llr["tokens"], llr["partial"], llr["stops"], llr["usage"], verifier,
                        engine))
            if standing is not None:
                _put_standing(db, node_id, standing, scored_at)

    def reset(self, node_id: str, now: float) -> None:
        """A fresh record (after a release): the evidence that quarantined it is spent."""
        with self.store.transaction() as db:
            _put_standing(db, node_id, sprt.Record(audits=0), now)

    def recent(self, node_id: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        where, args = ("WHERE node_id = ?", (node_id,)) if node_id else ("", ())
        return [dict(r) for r in self.store.query(f"SELECT * FROM audits {where} ORDER BY id DESC LIMIT ?",
                                                  (*args, limit))]

    def last_models(self) -> dict[str, tuple[str, str]]:
        """Each PC's model and precision in its latest audit (one query for the region)."""
        return {r["node_id"]: (r["model"], r["precision"]) for r in self.store.query(
            "SELECT node_id, model, precision FROM audits WHERE id IN (SELECT MAX(id) FROM audits GROUP BY node_id)")}

    def prune(self, before: float) -> None:
        with self.store.transaction() as db:
            db.execute("DELETE FROM audits WHERE scored_at < ?", (before,))

    # -- honest rates

    def rates(self) -> dict[tuple[str, str], Rate]:
        return {(r["model"], r["precision"]): Rate(**dict(r)) for r in self.store.query("SELECT * FROM audit_rates")}

    def calibrate(self, model: str, precision: str | None, nodes: frozenset[str], now: float,
                  since: float = 0.0) -> list[Rate]:
        """Honest rates of `model` from the greedy audits of `nodes` (the PCs the operator
        trusts), per precision (or one): a 99 % upper bound on the share of their greedy
        audits with a bad token (sprt.py weighs each greedy audit as one trial), so an
        honest PC at its true rate drifts the test down, not up. Raises CalibrationError when
        there is too little to go on."""
        if not nodes:
            raise CalibrationError("no PC is marked trusted: mark the PCs whose answers are honest with "
                                   "`garage-node head node trust NODE` first (their audits are the honest sample)")
        marks = ",".join("?" * len(nodes))
        args: list[Any] = [model, since, *sorted(nodes)]
        extra = ""
        if precision is not None:
            extra, args = " AND precision = ?", [*args, precision]
        rows = self.store.query(f"SELECT precision, SUM(n) AS tokens, SUM(bad > 0) AS bad, COUNT(*) AS audits "
                                f"FROM audits WHERE model = ? AND greedy = 1 AND n > 0 AND at >= ? "
                                f"AND node_id IN ({marks}){extra} GROUP BY precision", args)
        found = [r for r in rows if (r["audits"] or 0) >= CALIBRATE_MIN_AUDITS]
        if not found:
            have = sum(r["audits"] or 0 for r in rows)
            raise CalibrationError(f"only {have} greedy audits of trusted PCs' answers of {model} (at least "
                                   f"{CALIBRATE_MIN_AUDITS} are needed): let the trusted PCs serve it longer, with "
                                   "temperature-0 requests or canaries, then calibrate again")
        out = []
        with self.store.transaction() as db:
            for r in found:
                rate = Rate(model, r["precision"], upper_rate(r["bad"], r["audits"]), r["tokens"], r["bad"],
                            r["audits"], now)
                db.execute("INSERT OR REPLACE INTO audit_rates VALUES (?,?,?,?,?,?,?)",
                           (rate.model, rate.precision, rate.eps0, rate.tokens, rate.bad, rate.audits, now))
                out.append(rate)
        return out

    # -- the loop's state, for `head audit status`

    def set_state(self, values: dict[str, Any], now: float) -> None:
        with self.store.transaction() as db:
            for name, value in values.items():
                db.execute("INSERT OR REPLACE INTO audit_state VALUES (?, ?, ?)", (name, json.dumps(value), now))

    def state(self) -> dict[str, tuple[Any, float]]:
        return {r["name"]: (json.loads(r["value"]), r["at"]) for r in self.store.query("SELECT * FROM audit_state")}


def upper_rate(bad: int, tokens: int) -> float:
    """A one-sided 99 % upper bound on a binomial rate (Wilson score, z = 2.33)."""
    if tokens <= 0:
        return 1.0
    z = 2.326
    p = bad / tokens
    centre = p + z * z / (2 * tokens)
    spread = z * math.sqrt(p * (1 - p) / tokens + z * z / (4 * tokens * tokens))
    return min(1.0, (centre + spread) / (1 + z * z / tokens))


def _put_standing(db: Any, node_id: str, rec: sprt.Record, now: float) -> None:
    db.execute("INSERT INTO audit_nodes (node_id, audits, sum_tokens, sum_partial, sum_stops, sum_usage, updated_at) "
               "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET audits = excluded.audits, "
               "sum_tokens = excluded.sum_tokens, sum_partial = excluded.sum_partial, sum_stops = excluded.sum_stops, "
               "sum_usage = excluded.sum_usage, updated_at = excluded.updated_at",
               (node_id, rec.audits, rec.sums["tokens"], rec.sums["partial"], rec.sums["stops"], rec.sums["usage"],
                now))


def _record(r: Any) -> sprt.Record:
    return sprt.Record(audits=r["audits"], sums={"tokens": r["sum_tokens"], "partial": r["sum_partial"],
                                                 "stops": r["sum_stops"], "usage": r["sum_usage"]})


def _finite(x: float) -> float:
    return x if math.isfinite(x) else math.copysign(1e9, x)
