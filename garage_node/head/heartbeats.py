"""The heartbeats and Ray membership the head has taken but not yet written to the registry.

Built for a thousand PCs beating every 5 s: with an fsync'd transaction per heartbeat the head
capped near 150 heartbeats/s (#10). With `batch_s` (the server), a heartbeat and Ray's
membership are held in memory and acknowledged at once; a flusher writes them in one
transaction every `batch_s` (synchronous=NORMAL: a lost batch costs only a "last seen"), and
`close()` writes what is left. A crash loses at most the last batch, which the next heartbeat or
Ray answer brings back. Without `batch_s` (the CLI) each is written at once.

Reads never see the file alone: `Held.lay_over` lays what memory holds over a row read from the
file, the newest by its own timestamp winning, so the head itself never answers with an older
value than it took. The registry builds every node row it returns through that one call.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from garage_node.head.sqlite import Database
from garage_node.head.writebehind import WriteBehind

if TYPE_CHECKING:
    from garage_node.head.registry import NodeRow


@dataclass(frozen=True)
class Beat:
    last_seen: float
    report: dict[str, Any]
    confirmed_at: float | None  # the first authenticated heartbeat among those not yet written


@dataclass(frozen=True)
class Membership:
    alive: frozenset[str]  # node ids the Ray head holds alive
    checked_at: float


@dataclass
class Batch:
    beats: dict[str, Beat] = field(default_factory=dict)
    ray: Membership | None = None

    def __bool__(self) -> bool:
        return bool(self.beats) or self.ray is not None


def fold(acc: Batch, newer: Batch) -> None:
    """Only a node's latest heartbeat is kept, with the first confirmation among them."""
    for node_id, beat in newer.beats.items():
        old = acc.beats.get(node_id)
        if old is not None and old.confirmed_at is not None:
            beat = Beat(beat.last_seen, beat.report, old.confirmed_at)  # not replace(): the slowest call here, once per heartbeat
        acc.beats[node_id] = beat
    if newer.ray is not None:
        acc.ray = newer.ray


@dataclass(frozen=True)
class Held:
    """What memory held (pending and in flight) at some moment, for one node or for all."""

    beats: dict[str, list[Beat]]
    rays: list[Membership]

    def then(self, later: Held) -> Held:
        beats = {i: self.beats.get(i, []) + later.beats.get(i, []) for i in self.beats.keys() | later.beats.keys()}
        return Held(beats, self.rays + later.rays)

    def lay_over(self, node: NodeRow, reports: bool = True) -> NodeRow:
        """The row with what memory holds newer than the file laid over it. `reports`: False
        for rows read without their report (it stays as read)."""
        changes: dict[str, Any] = {}  # one replace() per row: it is the costliest step of a read
        beats = self.beats.get(node.id, [])
        if beats:
            beat = max(beats, key=lambda b: b.last_seen)
            if node.last_seen is None or beat.last_seen >= node.last_seen:
                changes["last_seen"] = beat.last_seen
                if reports:
                    changes["report"] = beat.report
            if node.confirmed_at is None:
                changes["confirmed_at"] = min((b.confirmed_at for b in beats if b.confirmed_at is not None), default=None)
        if self.rays:
            ray = max(self.rays, key=lambda r: r.checked_at)
            if node.ray_checked_at is None or ray.checked_at >= node.ray_checked_at:
                changes["ray_alive"] = node.id in ray.alive
                changes["ray_checked_at"] = ray.checked_at
        return replace(node, **changes) if changes else node


class HeartbeatBuffer:
    def __init__(self, db: Database, batch_s: float | None) -> None:
        """`db`: the connection batches are written with (its own, so a batch's commit never
        holds up an enrollment's)."""
        self._db = db
        self.batch_s = batch_s
        self._buffer: WriteBehind[Batch] = WriteBehind("registry-flush", Batch, fold, self._write)

    @property
    def thread(self) -> threading.Thread | None:
        return self._buffer.thread

    def beat(self, node_id: str, report: dict[str, Any], now: float, confirm: bool) -> None:
        """`confirm`: the heartbeat came with the node's credential."""
        self._take(Batch(beats={node_id: Beat(now, report, now if confirm else None)}))

    def membership(self, alive: set[str], now: float) -> None:
        self._take(Batch(ray=Membership(frozenset(alive), now)))

    def _take(self, batch: Batch) -> None:
        self._buffer.add(batch)
        if self.batch_s is None or self._buffer.stopped:
            self._buffer.flush()
        else:
            self._buffer.start(self.batch_s)

    def held(self, node_id: str | None = None) -> Held:
        return self._buffer.view(lambda pending, in_flight: _copy(node_id, pending, in_flight))

    def flush(self) -> int:
        """Write what memory holds now, in one transaction; returns how many heartbeats."""
        return len(self._buffer.flush().beats)

    def close(self) -> None:
        """Stop the flusher and write what is left; afterwards each write goes at once."""
        self.batch_s = None
        self._buffer.stop()

    def _write(self, batch: Batch) -> None:
        with self._db.transaction() as db:
            if batch.beats:
                db.executemany(
                    "UPDATE nodes SET last_seen=?, report=?, confirmed_at=COALESCE(confirmed_at, ?) WHERE id=?",
                    [(b.last_seen, json.dumps(b.report), b.confirmed_at, i) for i, b in batch.beats.items()])
            if batch.ray is not None:
                db.execute("UPDATE nodes SET ray_alive = id IN (SELECT value FROM json_each(?)), ray_checked_at=?",
                           (json.dumps(sorted(batch.ray.alive)), batch.ray.checked_at))


def _copy(node_id: str | None, *batches: Batch) -> Held:
    beats: dict[str, list[Beat]] = {}
    if node_id is not None:  # a heartbeat's own read: one lookup, not a copy of every node's
        got = [b.beats[node_id] for b in batches if node_id in b.beats]
        if got:
            beats[node_id] = got
    else:
        for batch in batches:
            for i, beat in batch.beats.items():
                beats.setdefault(i, []).append(beat)
    return Held(beats, [b.ray for b in batches if b.ray is not None])
