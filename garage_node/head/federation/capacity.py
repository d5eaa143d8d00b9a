"""Capacity across regions: what this region can serve now (from the gateway's endpoint
table), what the others said they can (their summaries, every 1-2 s), the round trip to each,
and the choice where a request goes.

The rule (Fly.io's): serve locally unless every local PC of the model is unhealthy or
saturated, or none exists; then the nearest region whose round trip plus its time to first
token (p50) fits [federation] budget_ms and that has a free slot; else none (429)."""

from __future__ import annotations

import statistics
import threading
from collections import deque
from dataclasses import dataclass

from garage_node.head.federation.records import ModelCapacity, Summary
from garage_node.head.gateway.table import EndpointTable

RTT_SAMPLES = 10  # the round trip to a region: the median of its last samples
TTFT_SAMPLES = 64


def local_capacity(table: EndpointTable, pc_slots: int, ttft: TtftWindow) -> dict[str, ModelCapacity]:
    """Per model served here: healthy PCs, free slots, engines' queues, TTFT p50."""
    out: dict[str, list[int]] = {}
    takes = table.usable(table.clock.monotonic())
    for ep in table.snapshot():  # copies, taken under the table's lock
        c = out.setdefault(ep.model, [0, 0, 0])
        c[2] += ep.requests_waiting
        if takes(ep):
            c[0] += 1
            if not _saturated(ep.inflight, ep.requests_waiting, pc_slots):
                c[1] += pc_slots - ep.inflight
    return {m: ModelCapacity(healthy=c[0], free_slots=c[1], queue=c[2], ttft_p50_ms=ttft.p50(m)) for m, c in out.items()}


def _saturated(inflight: int, waiting: int, pc_slots: int) -> bool:
    return waiting > 0 or inflight >= pc_slots


def serves_locally(table: EndpointTable, model: str, pc_slots: int) -> bool:
    """Some PC of this region takes requests for `model` now and is not saturated."""
    with table.lock:
        takes = table.usable(table.clock.monotonic())
        return any(takes(ep) and not _saturated(ep.inflight, ep.requests_waiting, pc_slots) for ep in table.pool(model))


class MedianWindow:
    """The last `size` samples per name, and their median; one lock (written and read by
    different threads)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._samples: dict[str, deque[float]] = {}

    def add(self, name: str, value: float) -> None:
        with self._lock:
            self._samples.setdefault(name, deque(maxlen=self._size)).append(value)

    def median(self, name: str) -> float | None:
        with self._lock:
            s = self._samples.get(name)
            return statistics.median(s) if s else None

    def names(self) -> set[str]:
        with self._lock:
            return set(self._samples)


class TtftWindow(MedianWindow):
    """The last TTFT_SAMPLES times to first byte per model, measured at this gateway."""

    def __init__(self) -> None:
        super().__init__(TTFT_SAMPLES)

    def p50(self, model: str) -> float | None:
        m = self.median(model)
        return None if m is None else round(m, 1)


@dataclass(frozen=True)
class Choice:
    region: str
    rtt_ms: float
    ttft_ms: float

    @property
    def expected_ms(self) -> float:
        return self.rtt_ms + self.ttft_ms


class PeerView:
    """The other regions as this head last heard them: summaries (with when they arrived) and
    round trips. Written by the federation's loop, read by the gateway's: one lock."""

    def __init__(self, stale_after_s: float, default_ttft_ms: float) -> None:
        self.stale_after_s, self.default_ttft_ms = stale_after_s, default_ttft_ms
        self._lock = threading.Lock()
        self._summaries: dict[str, tuple[float, Summary]] = {}
        self._rtts = MedianWindow(RTT_SAMPLES)

    def summary(self, s: Summary, arrived: float) -> None:
        with self._lock:
            self._summaries[s.region] = (arrived, s)

    def rtt(self, region: str, ms: float) -> None:
        self._rtts.add(region, ms)

    def rtt_ms(self, region: str) -> float | None:
        return self._rtts.median(region)

    def fresh(self, now: float) -> dict[str, Summary]:
        with self._lock:
            return {r: s for r, (t, s) in self._summaries.items() if now - t <= self.stale_after_s}

    def choose(self, model: str, budget_ms: float, now: float, exclude: frozenset[str] = frozenset()) -> list[Choice]:
        """The regions that could take a request for `model` within the budget, nearest first."""
        out = []
        for region, s in self.fresh(now).items():
            cap = s.models.get(model)
            rtt = self.rtt_ms(region)
            if region in exclude or cap is None or rtt is None or cap.healthy == 0 or cap.free_slots <= 0:
                continue
            ttft = cap.ttft_p50_ms if cap.ttft_p50_ms is not None else self.default_ttft_ms
            if rtt + ttft <= budget_ms:
                out.append(Choice(region, rtt, ttft))
        return sorted(out, key=lambda c: (c.rtt_ms, c.ttft_ms))

    def known_elsewhere(self, model: str, now: float) -> bool:
        """Some fresh region reports PCs for `model` (busy or not)."""
        return any(model in s.models for s in self.fresh(now).values())

    def status(self, now: float) -> dict[str, dict[str, object]]:
        with self._lock:
            summaries = dict(self._summaries)
        out: dict[str, dict[str, object]] = {}
        for region in set(summaries) | self._rtts.names():
            arrived = summaries.get(region, (None, None))[0]
            rtt = self.rtt_ms(region)
            out[region] = {"summary_age_s": None if arrived is None else round(now - arrived, 1),
                           "rtt_ms": None if rtt is None else round(rtt, 1),
                           "models": sorted(summaries[region][1].models) if region in summaries else []}
        return out
