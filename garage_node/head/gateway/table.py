"""The endpoint table: which PC serves which model now, and how busy it is.

Fed by every accepted heartbeat (head/reports.py), read by the router on every request; in
memory, behind one lock. A PC takes new requests only while its engine is healthy, it is not
draining, its last heartbeat is fresher than `stale_after_s`, and the gateway has not just
failed to reach it. The gateway's own count of requests in flight is the load (only the
gateway may call an engine, so it is exact and current); the engine's reported queue and KV
cache use break ties."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

from garage_node.core.clock import SYSTEM, Clock
from garage_node.core.wire import EngineState, NodeReport

SUSPEND_S = 10.0  # after a failed connection, before the PC is tried again


@dataclass
class Endpoint:
    node_id: str
    model: str
    url: str
    state: EngineState
    draining: bool
    seen_at: float  # monotonic time of the last heartbeat
    requests_running: int = 0
    requests_waiting: int = 0
    kv_cache_usage_pct: float = 0.0
    inflight: int = 0  # requests the gateway has open on this PC now
    suspended_until: float = 0.0
    # Its last report measured the engine holding no request (none running, none waiting);
    # False while that is not measured. A request sent well before such a report and still
    # without its first byte is lost on the PC (proxy.py: `silent_first_byte_s`).
    engine_idle: bool = False
    report: NodeReport | None = field(default=None, repr=False)

    @property
    def load(self) -> int:
        return self.inflight + self.requests_waiting


@dataclass(frozen=True)
class ModelInfo:
    model: str
    pcs_serving: int  # PCs that take requests for it now
    pcs_known: int  # PCs reporting it, in any state


class EndpointTable:
    def __init__(self, stale_after_s: float = 15.0, clock: Clock = SYSTEM) -> None:
        self.stale_after_s = stale_after_s
        self.clock = clock
        self._by_node: dict[str, Endpoint] = {}
        self._by_model: dict[str, list[Endpoint]] = {}  # every PC reporting the model, in any state
        self._reports: dict[str, tuple[float, NodeReport]] = {}
        self.lock = threading.Lock()
        # The PCs that must get no customer traffic (quarantined by the audits, issue #20);
        # set by the gateway to its trust store's cached view.
        self.excluded: Callable[[], frozenset[str]] = frozenset

    def update(self, node_id: str, report: NodeReport) -> None:
        now = self.clock.monotonic()
        e = report.engine
        with self.lock:
            self._reports[node_id] = (now, report)
            if not e.model or not e.endpoint:
                self._drop(node_id)
                return
            cur = self._by_node.get(node_id)
            if cur is None or cur.model != e.model or cur.url != e.endpoint:
                self._drop(node_id)
                cur = Endpoint(node_id=node_id, model=e.model, url=e.endpoint, state=e.state,
                               draining=bool(e.draining), seen_at=now)
                self._by_node[node_id] = cur
                self._by_model.setdefault(cur.model, []).append(cur)
            cur.state, cur.draining, cur.seen_at = e.state, bool(e.draining), now
            cur.requests_running = e.requests_running or 0
            cur.requests_waiting = e.requests_waiting or 0
            cur.kv_cache_usage_pct = e.kv_cache_usage_pct or 0.0
            cur.engine_idle = e.requests_running == 0 and e.requests_waiting == 0
            cur.report = report

    def forget_silent(self, for_s: float, only: Callable[[str], bool] = lambda _: True) -> list[str]:
        """Forget the PCs not heard from for longer than `for_s` (those `only` names) and say
        which; checked and dropped under one hold of the lock, so a PC that reports meanwhile stays."""
        now = self.clock.monotonic()
        with self.lock:
            gone = [n for n, (t, _) in self._reports.items() if now - t > for_s and only(n)]
            for node_id in gone:
                self._drop(node_id)
                del self._reports[node_id]
        return gone

    def is_stale(self, ep: Endpoint, now: float) -> bool:
        return now - ep.seen_at > self.stale_after_s

    def live(self, ep: Endpoint, now: float) -> bool:
        """Whether the PC's engine is healthy and its report fresh (draining, suspended or
        quarantined aside): what a re-check's canary and a verifier's sample need."""
        return ep.state == EngineState.HEALTHY and not self.is_stale(ep, now)

    def given_up(self, ep: Endpoint, now: float) -> bool:
        """Whether the head has given this PC up (under `lock`): silent past stale_after_s, or
        no longer in the table as this endpoint (dropped, forgotten, or serving something else
        now). What the gateway still has open on it cannot be answered, or not as asked."""
        return self._by_node.get(ep.node_id) is not ep or now - ep.seen_at > self.stale_after_s

    def _drop(self, node_id: str) -> None:
        old = self._by_node.pop(node_id, None)
        if old is not None:
            pool = self._by_model.get(old.model, [])
            pool.remove(old)
            if not pool:
                del self._by_model[old.model]

    def pool(self, model: str) -> list[Endpoint]:
        """Every PC reporting this model, usable or not (read and use under `lock`)."""
        return self._by_model.get(model, [])

    def get(self, node_id: str) -> Endpoint | None:
        return self._by_node.get(node_id)

    def usable(self, now: float) -> Callable[[Endpoint], bool]:
        """Whether a PC takes new customers' requests now (for the router, under `lock`)."""
        excluded = self.excluded()
        return lambda ep: self._takes_requests(ep, now) and ep.node_id not in excluded

    def _takes_requests(self, ep: Endpoint, now: float) -> bool:
        """Whether the PC itself can answer now. A quarantined PC can (its re-check's canaries,
        pinned to it through `get`, reach it), so `excluded` is checked by the callers that
        choose for customers: `usable`, `serving`, `models`."""
        return self.live(ep, now) and not ep.draining and now >= ep.suspended_until

    def serving(self, model: str) -> list[Endpoint]:
        """The PCs that take new customers' requests for this model now (live objects: read
        under `lock`); not those quarantined by the audits."""
        takes = self.usable(self.clock.monotonic())
        with self.lock:
            return [ep for ep in self._by_model.get(model, []) if takes(ep)]

    def models(self) -> list[ModelInfo]:
        """Each model with the PCs that take customers' requests for it (a quarantined PC is
        known but does not serve) and the PCs reporting it."""
        now = self.clock.monotonic()
        counts: dict[str, list[int]] = {}
        takes = self.usable(now)
        with self.lock:
            for ep in self._by_node.values():
                if now - ep.seen_at > self.stale_after_s:
                    continue
                c = counts.setdefault(ep.model, [0, 0])
                c[1] += 1
                if takes(ep):
                    c[0] += 1
        return [ModelInfo(m, c[0], c[1]) for m, c in sorted(counts.items())]

    def suspend(self, node_id: str, seconds: float = SUSPEND_S) -> None:
        with self.lock:
            ep = self._by_node.get(node_id)
            if ep is not None:
                ep.suspended_until = self.clock.monotonic() + seconds

    def begin(self, ep: Endpoint) -> None:
        with self.lock:
            ep.inflight += 1

    def end(self, ep: Endpoint) -> None:
        with self.lock:
            ep.inflight = max(0, ep.inflight - 1)

    def fresh_reports(self) -> list[tuple[str, NodeReport]]:
        """The last report of each PC heard from within stale_after_s (for the metrics)."""
        now = self.clock.monotonic()
        with self.lock:
            return [(n, r) for n, (t, r) in self._reports.items() if now - t <= self.stale_after_s]

    def snapshot(self) -> list[Endpoint]:
        with self.lock:
            return [Endpoint(**{**ep.__dict__}) for ep in self._by_node.values()]
