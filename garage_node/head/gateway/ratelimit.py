"""Per-key request and token rates (`--rpm`, `--tpm`), with the `limits` library's sliding
window counters in memory: a head restart forgets the last minute, which a rate limit may.

With several gateway workers ([gateway] workers, workers.py) each process keeps its own
counters: what one spends is told to the others through the head every fraction of a second
(`spent` out, `spent_elsewhere` in), so a key's limit holds across all of them, give or take
what the workers admit within one such interval."""

from __future__ import annotations

import time
from typing import Callable

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from garage_node.head.gateway.keys import ApiKey


# What a process spent of a key's limit: ("rpm" or "tpm", the key's name, its limit, how much).
Spent = Callable[[str, str, int, int], None]


class RateLimits:
    def __init__(self) -> None:
        self._limiter = SlidingWindowCounterRateLimiter(MemoryStorage())
        self.spent: Spent | None = None  # set where other processes must hear of it (workers.py)

    def take_request(self, key: ApiKey) -> float | None:
        """Counts one request; None if within the key's rpm, else seconds until one is allowed."""
        if key.rpm is None:
            return None
        item = RateLimitItemPerMinute(key.rpm)
        if self._limiter.hit(item, "rpm", key.name):
            if self.spent is not None:
                self.spent("rpm", key.name, key.rpm, 1)
            return None
        return self._wait(item, "rpm", key.name)

    def tokens_left(self, key: ApiKey) -> float | None:
        """None if the key may use more tokens this minute, else seconds until it may."""
        if key.tpm is None:
            return None
        item = RateLimitItemPerMinute(key.tpm)
        if self._limiter.test(item, "tpm", key.name):
            return None
        return self._wait(item, "tpm", key.name)

    def spend_tokens(self, key: ApiKey, tokens: int) -> None:
        if key.tpm is None or tokens <= 0:
            return
        self._take("tpm", key.name, key.tpm, tokens)
        if self.spent is not None:
            self.spent("tpm", key.name, key.tpm, tokens)

    def spent_elsewhere(self, kind: str, key_name: str, limit: int, cost: int) -> None:
        """Count what another worker spent of a key's limit (requests or tokens)."""
        if kind in ("rpm", "tpm") and limit > 0 and cost > 0:
            self._take(kind, key_name, limit, cost)

    def _take(self, kind: str, key_name: str, limit: int, cost: int) -> None:
        item = RateLimitItemPerMinute(limit)
        # A request may overshoot what is left (its size is known only at its end): take what
        # fits, so the window shows the key as used up until it slides on.
        cost = min(cost, limit)
        if not self._limiter.hit(item, kind, key_name, cost=cost):
            while cost > 1 and not self._limiter.hit(item, kind, key_name, cost=cost):
                cost //= 2

    def _wait(self, item: RateLimitItemPerMinute, *ids: str) -> float:
        stats = self._limiter.get_window_stats(item, *ids)
        return max(1.0, stats.reset_time - time.time())
