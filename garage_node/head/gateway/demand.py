"""Demand per model, as the gateway sees it, for the head's placement (head/placement.py):
requested tokens per second, requests open now (in flight and held), and requests that found
no PC (refused, or held waiting for one), each over a sliding window.

Every request calls this a few times, on the gateway's event loop, and the gateway's CPU is
its scarcest resource: a request costs a lock, a dict lookup and a few integer additions, no
allocation (a model's ring of buckets is made once, when the model is first seen). Only models
the gateway knows (served by a PC, or in the region's catalog) are counted, so requests naming
made-up models cannot grow the table.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from garage_node.core.clock import SYSTEM, Clock

WINDOW_S = 60
BUCKET_S = 1.0
# A request without max_tokens is counted at this many completion tokens (vLLM's own default is
# the context's rest, which says nothing about what the caller will really use).
DEFAULT_MAX_TOKENS = 256
# Request bodies are JSON: about 4 bytes per prompt token in English text, counting the
# envelope. Cheaper than tokenizing, and the placer needs the rate, not the exact count.
BYTES_PER_TOKEN = 4


@dataclass(frozen=True)
class ModelDemand:
    """One model's demand over the window."""

    tokens_per_s: float  # prompt estimate + max_tokens of the requests that arrived, per second
    queue_depth: int  # requests open now: sent to a PC and not yet answered, or held
    unserved_per_s: float  # requests per second that found no PC (refused, or held)
    requests_per_s: float
    held: int  # of queue_depth, the requests held for want of a PC


class _Ring:
    """Counts per bucket of BUCKET_S over the window: slot = second % size, reset when reused."""

    __slots__ = ("stamp", "tokens", "requests", "unserved", "inflight", "held")

    def __init__(self, size: int) -> None:
        self.stamp = [-1] * size  # the bucket number each slot holds now
        self.tokens = [0] * size
        self.requests = [0] * size
        self.unserved = [0] * size
        self.inflight = 0
        self.held = 0

    def slot(self, bucket: int) -> int:
        i = bucket % len(self.stamp)
        if self.stamp[i] != bucket:
            self.stamp[i] = bucket
            self.tokens[i] = self.requests[i] = self.unserved[i] = 0
        return i


class Demand:
    def __init__(self, window_s: int = WINDOW_S, clock: Clock = SYSTEM, max_models: int = 1024) -> None:
        self.window_s = window_s
        self.clock = clock
        self.max_models = max_models
        self._rings: dict[str, _Ring] = {}
        self._lock = threading.Lock()

    def _ring(self, model: str) -> _Ring | None:
        ring = self._rings.get(model)
        if ring is None and len(self._rings) < self.max_models:
            ring = self._rings[model] = _Ring(self.window_s)
        return ring

    def _bucket(self) -> int:
        return int(self.clock.monotonic() / BUCKET_S)

    def arrived(self, model: str, body_bytes: int, max_tokens: object) -> None:
        """A request for `model` arrived: its tokens count towards the model's rate."""
        completion = max_tokens if isinstance(max_tokens, int) and 0 < max_tokens < 1 << 20 else DEFAULT_MAX_TOKENS
        tokens = body_bytes // BYTES_PER_TOKEN + completion
        with self._lock:
            ring = self._ring(model)
            if ring is not None:
                i = ring.slot(self._bucket())
                ring.tokens[i] += tokens
                ring.requests[i] += 1

    def unserved(self, model: str) -> None:
        """A request found no PC: held for one, or refused (503) for want of one."""
        with self._lock:
            ring = self._ring(model)
            if ring is not None:
                ring.unserved[ring.slot(self._bucket())] += 1

    def opened(self, model: str, held: bool = False) -> None:
        with self._lock:
            ring = self._ring(model)
            if ring is not None:
                if held:
                    ring.held += 1
                else:
                    ring.inflight += 1

    def closed(self, model: str, held: bool = False) -> None:
        with self._lock:
            ring = self._rings.get(model)
            if ring is not None:
                if held:
                    ring.held = max(0, ring.held - 1)
                else:
                    ring.inflight = max(0, ring.inflight - 1)

    def snapshot(self) -> dict[str, ModelDemand]:
        """Every model's demand over the window; models with nothing in it and nothing open
        are dropped from the table (so it holds only the models asked for lately)."""
        now = self._bucket()
        first = now - self.window_s + 1
        out: dict[str, ModelDemand] = {}
        with self._lock:
            for model, ring in list(self._rings.items()):
                live = [i for i, b in enumerate(ring.stamp) if first <= b <= now]
                tokens = sum(ring.tokens[i] for i in live)
                requests = sum(ring.requests[i] for i in live)
                unserved = sum(ring.unserved[i] for i in live)
                if not (tokens or requests or unserved or ring.inflight or ring.held):
                    del self._rings[model]
                    continue
                out[model] = ModelDemand(tokens / self.window_s, ring.inflight + ring.held,
                                         unserved / self.window_s, requests / self.window_s, ring.held)
        return out
