"""Each PC's recent history for the fleet page, in memory and bounded: state changes (with the
node's own message), and per time bucket its hottest GPU, throughput and load.

Fed by the head's report fan-out (`Reports.subscribe(history.record)`), so it costs the
heartbeat path one dictionary update and no database work. A PC going silent sends nothing, so
"offline" is inferred: by `record()` when a report arrives after a gap longer than the head's
`offline_after_s`, and by `observe()`, which the page calls with what the registry says. The
change is dated when the head began to call the PC offline (last report + offline_after_s),
not when someone happened to look.

Bounds: samples and changes older than the window are dropped as new ones arrive; a bucket
merges the reports within it (`window / MAX_SAMPLES` seconds wide, at least `MIN_BUCKET_S`), so
a PC holds at most MAX_SAMPLES samples whatever its heartbeat period; at most `max_changes`
changes per PC; at most `max_nodes` PCs (the longest-silent go first). Nothing is persisted: a
head restart starts an empty history (the registry still has each PC's last report).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from garage_node.core.wire import NodeReport

MAX_SAMPLES = 360
MIN_BUCKET_S = 5.0


def tokens_per_s(report: NodeReport) -> float | None:
    """The engine's generation throughput, where the node reports it (an EngineReport without
    the field, from the current wire format or an older node, gives None)."""
    value = getattr(report.engine, "generation_tokens_per_s", None)
    return float(value) if isinstance(value, (int, float)) else None


def state_label(report: NodeReport) -> str:
    """What a state change is about: the node's state and its engine's (a drain or a crashing
    engine is a change worth a line even while the node stays joined)."""
    engine = report.engine.state.value
    if report.engine.draining and engine not in ("draining", "drained"):
        engine += ", draining"
    return f"{report.state.value} · engine {engine}"


class _Sample:
    __slots__ = ("t", "temp_c", "tps_sum", "tps_n", "running", "waiting", "util_pct")

    def __init__(self, t: float) -> None:
        self.t = t
        self.temp_c: int | None = None
        self.tps_sum = 0.0
        self.tps_n = 0
        self.running: int | None = None
        self.waiting: int | None = None
        self.util_pct: int | None = None

    def add(self, report: NodeReport) -> None:
        temps = [g.temperature_c for g in report.gpus if g.temperature_c is not None]
        if temps:
            self.temp_c = max(temps + ([self.temp_c] if self.temp_c is not None else []))
        utils = [g.utilization_pct for g in report.gpus if g.utilization_pct is not None]
        if utils:
            self.util_pct = round(sum(utils) / len(utils))
        tps = tokens_per_s(report)
        if tps is not None:
            self.tps_sum += tps
            self.tps_n += 1
        # The busiest moment of the bucket: a queue that formed and drained is worth seeing.
        for attr in ("running", "waiting"):
            v = getattr(report.engine, f"requests_{attr}")
            if v is not None:
                old = getattr(self, attr)
                setattr(self, attr, v if old is None else max(old, v))

    def as_list(self) -> list[Any]:
        tps = round(self.tps_sum / self.tps_n, 1) if self.tps_n else None
        return [round(self.t, 1), self.temp_c, tps, self.running, self.waiting, self.util_pct]


SAMPLE_FIELDS = ["t", "temp_c", "tokens_per_s", "running", "waiting", "util_pct"]


@dataclass(frozen=True)
class Change:
    t: float
    state: str  # "offline", "revoked", or state_label()
    message: str


class _Node:
    __slots__ = ("last_report_at", "report", "samples", "changes", "label")

    def __init__(self, max_changes: int) -> None:
        self.last_report_at = 0.0
        self.report: NodeReport | None = None
        self.samples: deque[_Sample] = deque()
        self.changes: deque[Change] = deque(maxlen=max_changes)
        self.label: str | None = None

    def change(self, t: float, state: str, message: str) -> None:
        if state != self.label:
            self.changes.append(Change(t, state, message))
            self.label = state


class History:
    def __init__(self, offline_after_s: float, window_s: float = 6 * 3600, max_changes: int = 200,
                 max_nodes: int = 10000, clock: Callable[[], float] = time.time) -> None:
        self.offline_after_s = offline_after_s
        self.window_s = window_s
        self.bucket_s = max(MIN_BUCKET_S, window_s / MAX_SAMPLES)
        self.max_changes = max_changes
        self.max_nodes = max_nodes
        self.clock = clock
        self._nodes: dict[str, _Node] = {}
        self._lock = threading.Lock()

    # -- writing (the control API's threads, through Reports)

    def record(self, node_id: str, report: NodeReport) -> None:
        now = self.clock()
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None:
                node = self._nodes[node_id] = _Node(self.max_changes)
            elif node.report is not None and now - node.last_report_at > self.offline_after_s:
                node.change(node.last_report_at + self.offline_after_s, "offline", "no heartbeat")
            node.change(now, state_label(report), report.message)
            node.last_report_at = now
            node.report = report
            bucket = now - now % self.bucket_s
            if not node.samples or node.samples[-1].t != bucket:
                node.samples.append(_Sample(bucket))
            node.samples[-1].add(report)
            self._prune(node, now)
            self._evict()

    def observe(self, node_id: str, status: str, last_seen: float | None, revoked_at: float | None) -> None:
        """What the registry says now: an offline or revoked PC gets its change (once), dated
        when it happened."""
        if status not in ("offline", "revoked"):
            return
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None:
                # Silent since before this head started: one line, so its page is not empty.
                node = self._nodes[node_id] = _Node(self.max_changes)
                self._evict()
            if status == "revoked":
                node.change(revoked_at or self.clock(), "revoked", "revoked by the operator")
            else:
                since = max(last_seen or 0.0, node.last_report_at) + self.offline_after_s
                node.change(since if since > self.offline_after_s else self.clock(), "offline", "no heartbeat")

    # -- reading (the page)

    def latest(self, node_id: str) -> tuple[float, NodeReport] | None:
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None or node.report is None:
                return None
            return node.last_report_at, node.report

    def node_history(self, node_id: str) -> dict[str, Any]:
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None:
                return {"samples": [], "changes": []}
            self._prune(node, self.clock())
            return {"samples": [s.as_list() for s in node.samples],
                    "changes": [{"t": round(c.t, 1), "state": c.state, "message": c.message} for c in node.changes]}

    def forget_missing(self, node_ids: set[str]) -> None:
        """Drop PCs the registry no longer holds (a reclaimed enrollment)."""
        with self._lock:
            for gone in set(self._nodes) - node_ids:
                del self._nodes[gone]

    def __len__(self) -> int:
        with self._lock:
            return len(self._nodes)

    # -- bounds (under the lock)

    def _prune(self, node: _Node, now: float) -> None:
        cutoff = now - self.window_s
        while node.samples and node.samples[0].t < cutoff:
            node.samples.popleft()
        # Changes older than the window go too, but the last one stays: it is the current state.
        while len(node.changes) > 1 and node.changes[0].t < cutoff:
            node.changes.popleft()

    def _evict(self) -> None:
        # Rare (more PCs than max_nodes), so a linear scan is fine.
        while len(self._nodes) > self.max_nodes:
            oldest = min(self._nodes, key=lambda k: self._nodes[k].last_report_at)
            del self._nodes[oldest]
