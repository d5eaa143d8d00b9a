"""The usage ledger: tokens in and out per key × PC × model, in hourly rows.

Requests add to an in-memory batch; a flusher writes it every second (and at shutdown), one
transaction per batch (`head/writebehind.py`), so the gateway's request path never waits on a
disk write. A crash loses at most the last second of counts. Totals read the database plus the
counts not yet written (waiting, or in the batch being written)."""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from garage_node.core.clock import SYSTEM, Clock
from garage_node.head.audit.trust import NodeTrust
from garage_node.head.gateway.store import Store
from garage_node.head.writebehind import WriteBehind

BY = ("key", "node", "model")
_COLUMN = {"key": "key", "node": "node_id", "model": "model"}


@dataclass(frozen=True)
class UsageRow:
    group: str  # the key name, node id or model, as asked
    requests: int
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Totals:
    today: int  # since 00:00 UTC
    total: int


@dataclass(frozen=True)
class Earnings:
    """A PC's credited tokens (prompt + completion) by what may be paid for (issue #20).

    - earned: credited more than `[audit] hold_days` ago, and not frozen or forfeited;
    - held: credited since, waiting out the hold (what a quarantine would freeze);
    - frozen: not yet earned when the PC was quarantined, and whatever it was credited while
      quarantined; held again if the operator releases it, kept if the operator forfeits it;
    - forfeited: what the operator kept (`head node forfeit`).

    The ledger's rows are hourly, so an hour counts as credited at its end: an hour is earned
    once all of it is older than the hold, and the hour in which a quarantine began is frozen
    whole."""

    node_id: str
    earned: int = 0
    held: int = 0
    frozen: int = 0
    forfeited: int = 0

    @property
    def total(self) -> int:
        return self.earned + self.held + self.frozen + self.forfeited


EARNINGS = ("earned", "held", "frozen", "forfeited")


def standing(hour: int, now: float, hold_s: float, trust: NodeTrust | None) -> str:
    """Which of EARNINGS an hourly row (its hour's index since the epoch) of a PC counts in."""
    start, end = hour * 3600, (hour + 1) * 3600
    if trust is not None:
        # Every forfeit is in `forfeits` (node_forfeits: forfeited_before is only the last one's).
        if any(start < cut and end > cut - hold_s for cut in trust.forfeits):  # not yet earned at a forfeited freeze
            return "forfeited"
        if trust.frozen_at is not None and end > trust.frozen_at - hold_s:
            return "frozen"
    return "earned" if end <= now - hold_s else "held"


Bucket = tuple[int, str, str, str]  # hour, key, node_id, model


Usage = dict[Bucket, list[int]]  # requests, prompt tokens, completion tokens


def _fold(acc: Usage, newer: Usage) -> None:
    for bucket, counts in newer.items():
        row = acc.setdefault(bucket, [0, 0, 0])
        for i in range(3):
            row[i] += counts[i]


class Ledger:
    def __init__(self, store: Store, clock: Clock = SYSTEM, flush_every_s: float = 1.0) -> None:
        self.store = store
        self.clock = clock
        self.flush_every_s = flush_every_s
        self._buffer: WriteBehind[Usage] = WriteBehind("usage-ledger", dict, _fold, self._write)

    # -- writing

    def add(self, key: str, node_id: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        bucket = (int(self.clock.time() // 3600), key, node_id, model)
        self._buffer.add({bucket: [1, max(0, prompt_tokens), max(0, completion_tokens)]})

    def flush(self) -> int:
        return len(self._buffer.flush())

    def _write(self, batch: Usage) -> None:
        with self.store.transaction() as db:
            db.executemany(
                "INSERT INTO usage (hour, key, node_id, model, requests, prompt_tokens, completion_tokens)"
                " VALUES (?,?,?,?,?,?,?) ON CONFLICT (hour, key, node_id, model) DO UPDATE SET"
                " requests = requests + excluded.requests, prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
                " completion_tokens = completion_tokens + excluded.completion_tokens",
                [(*b, *v) for b, v in batch.items()])

    def start(self) -> None:
        self._buffer.start(self.flush_every_s)

    def stop(self) -> None:
        self._buffer.stop()

    # -- reading: the file plus what memory holds (waiting, or being written)

    def _since_hour(self, since: float) -> int:
        return int(since // 3600)

    def _read(self, sql: str, args: tuple[Any, ...]) -> tuple[list[sqlite3.Row], Usage]:
        """Rows from the file and the counts not yet written in it, each count in exactly one of
        the two: every read of usage goes through here (or flushes first, as `usage` does)."""
        with self._buffer.settled():  # nothing in flight meanwhile: pending is all the file lacks
            return self.store.query(sql, args), self._buffer.view(lambda pending, _: {b: list(v) for b, v in pending.items()})

    def node_totals(self, node_id: str) -> Totals:
        midnight = self.clock.time() // 86400 * 86400
        return Totals(today=self._tokens("node_id", node_id, self._since_hour(midnight), 2),
                      total=self._tokens("node_id", node_id, 0, 2))

    def key_tokens(self, key: str, since: float = 0.0) -> int:
        return self._tokens("key", key, self._since_hour(since), 1)

    def _tokens(self, column: str, value: str, since_hour: int, pending_index: int) -> int:
        rows, held = self._read(f"SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM usage"
                                f" WHERE {column} = ? AND hour >= ?", (value, since_hour))
        return int(rows[0][0]) + sum(v[1] + v[2] for b, v in held.items()
                                     if b[pending_index] == value and b[0] >= since_hour)

    def node_totals_all(self) -> dict[str, Totals]:
        """Every PC's totals in one query (for `head nodes` and the metrics)."""
        midnight_hour = self._since_hour(self.clock.time() // 86400 * 86400)
        out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        rows, held = self._read("SELECT node_id, hour >= ? AS today, SUM(prompt_tokens + completion_tokens)"
                                " FROM usage GROUP BY node_id, today", (midnight_hour,))
        for r in rows:
            out[r[0]][1] += r[2]
            if r[1]:
                out[r[0]][0] += r[2]
        for b, v in held.items():
            out[b[2]][1] += v[1] + v[2]
            if b[0] >= midnight_hour:
                out[b[2]][0] += v[1] + v[2]
        return {node: Totals(today=t[0], total=t[1]) for node, t in out.items()}

    def earnings(self, trust: dict[str, NodeTrust], hold_s: float, since: float = 0.0) -> dict[str, Earnings]:
        """Every PC's earned, held, frozen and forfeited tokens (`trust`: node id -> its trust
        record, as Trust.all() gives; `hold_s`: [audit] hold_days in seconds), of the rows
        since a time (to the hour, as `usage`). One query for
        the region, grouped by PC and by whether an hour is past the hold; hour by hour only
        for the PCs a quarantine or a forfeit touched."""
        now = self.clock.time()
        earned_cut = int((now - hold_s) // 3600)  # hours before this one are past the hold
        marked = {n for n, t in trust.items() if t.frozen_at is not None or t.forfeits}
        out: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(EARNINGS, 0))
        since_hour = self._since_hour(since)
        rows, pending = self._read("SELECT node_id, hour < ? AS past, SUM(prompt_tokens + completion_tokens)"
                                   " FROM usage WHERE hour >= ? GROUP BY node_id, past", (earned_cut, since_hour))
        pending = {b: v for b, v in pending.items() if b[0] >= since_hour}
        for node_id, past, tokens in rows:
            if node_id not in marked:
                out[node_id]["earned" if past else "held"] += tokens
        for (hour, _key, node_id, _model), v in pending.items():
            if node_id not in marked:
                out[node_id][standing(hour, now, hold_s, None)] += v[1] + v[2]
        for node_id in marked:
            hourly, held = self._read("SELECT hour, SUM(prompt_tokens + completion_tokens) FROM usage"
                                      " WHERE node_id = ? AND hour >= ? GROUP BY hour", (node_id, since_hour))
            per_hour = [(r[0], r[1]) for r in hourly] + [(b[0], v[1] + v[2]) for b, v in held.items()
                                                         if b[2] == node_id and b[0] >= since_hour]
            for hour, tokens in per_hour:
                out[node_id][standing(hour, now, hold_s, trust[node_id])] += tokens
        return {n: Earnings(n, **e) for n, e in out.items()}

    def usage(self, by: str, since: float = 0.0) -> list[UsageRow]:
        """Rows grouped by key, node or model since a time (to the hour: rows are hourly),
        biggest first."""
        if by not in BY:
            raise ValueError(f"usage is grouped by one of {', '.join(BY)}, not {by!r}")
        self.flush()  # a reader sees what was served up to now
        col = _COLUMN[by]
        rows = self.store.query(f"SELECT {col}, SUM(requests), SUM(prompt_tokens), SUM(completion_tokens) FROM usage"
                                f" WHERE hour >= ? GROUP BY {col} ORDER BY SUM(prompt_tokens + completion_tokens) DESC, {col}",
                                (self._since_hour(since),))
        return [UsageRow(group=r[0], requests=r[1], prompt_tokens=r[2], completion_tokens=r[3]) for r in rows]

