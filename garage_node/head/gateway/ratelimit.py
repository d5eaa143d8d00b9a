"""Per-key request and token rates (`--rpm`, `--tpm`), with the `limits` library's sliding
window counters in memory: a head restart forgets the last minute, which a rate limit may."""

from __future__ import annotations

import time

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from garage_node.head.gateway.keys import ApiKey


class RateLimits:
    def __init__(self) -> None:
        self._limiter = SlidingWindowCounterRateLimiter(MemoryStorage())

    def take_request(self, key: ApiKey) -> float | None:
        """Counts one request; None if within the key's rpm, else seconds until one is allowed."""
        if key.rpm is None:
            return None
        item = RateLimitItemPerMinute(key.rpm)
        if self._limiter.hit(item, "rpm", key.name):
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
        item = RateLimitItemPerMinute(key.tpm)
        # A request may overshoot what is left (its size is known only at its end): take what
        # fits, so the window shows the key as used up until it slides on.
        cost = min(tokens, key.tpm)
        if not self._limiter.hit(item, "tpm", key.name, cost=cost):
            while cost > 1 and not self._limiter.hit(item, "tpm", key.name, cost=cost):
                cost //= 2

    def _wait(self, item: RateLimitItemPerMinute, *ids: str) -> float:
        stats = self._limiter.get_window_stats(item, *ids)
        return max(1.0, stats.reset_time - time.time())
