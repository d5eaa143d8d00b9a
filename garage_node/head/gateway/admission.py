"""Refuse, don't collapse: the gateway's admission limit.

Past its ceiling a gateway that takes every request serves none of them well: each new request
adds work to a loop already behind, every answer waits behind the queue, latency climbs to
seconds and stays there after the load stops (issue #22 measured p50 10-28 s at 500 req/s).
So two bounds, checked before anything else is done for a request (no key lookup, no body
read, no JSON), and past either a 503 `overloaded` with Retry-After, at once:

- in flight: at most `max_in_flight` requests being handled at a time (streams included, until
  their last byte). It bounds what the gateway holds open (connections to the PCs, memory);
- queue age: the event loop's lag, measured by a timer every LAG_EVERY_S that notes how late it
  ran. A request that arrives while the loop runs late waits that long before it is even read:
  when the lag is over `max_queue_age_s` twice in a row, new requests are refused until it
  falls again. This is the bound that follows the CPU (in-flight requests mostly wait on the
  engines, and a busy engine is not the gateway's overload). Twice in a row: on a shared machine
  the process is sometimes not scheduled for a moment, and one late timer is not an overload.

A refusal costs a few microseconds, so refusing keeps the admitted requests' latency bounded
and the gateway recovers as soon as the overload ends. A pure ASGI wrapper (not Starlette
middleware): nothing per request beyond a counter and a comparison."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

LAG_EVERY_S = 0.05  # how often the loop's lag is measured while requests arrive
LAG_IDLE_AFTER_S = 2.0  # no request for this long: the timer stops (an idle gateway wakes nobody)
RETRY_AFTER_S = 1

_BODY = json.dumps({"error": {
    "message": "the gateway is over its capacity right now; send the request again after Retry-After seconds",
    "type": "server_error", "param": None, "code": "overloaded"}}).encode()
_START = {"type": "http.response.start", "status": 503,
          "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(_BODY)).encode()),
                      (b"retry-after", str(RETRY_AFTER_S).encode())]}
_END = {"type": "http.response.body", "body": _BODY}


class LoopLag:
    """How late the event loop runs its timers: the age of work queued on it now. A timer
    re-armed every LAG_EVERY_S while requests come; `lag_s` is the lesser of how late the last
    two were (the last one counting as late as it is overdue now, if it is)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._last_lag = 0.0
        self._lag_before = 0.0
        self._last_use = 0.0

    def lag_s(self) -> float:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._last_use = now
        if self._timer is None or loop is not self._loop:
            self._loop = loop
            self._arm(now)
            return 0.0
        if now > self._due:  # the timer is overdue: the sample under way is at least this late
            return min(self._last_lag, now - self._due)
        return min(self._lag_before, self._last_lag)

    def _arm(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + LAG_EVERY_S
        self._timer = self._loop.call_at(self._due, self._fired)

    def _fired(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self._lag_before, self._last_lag = self._last_lag, now - self._due
        if now - self._last_use > LAG_IDLE_AFTER_S:
            self._timer = None
            self._lag_before = self._last_lag = 0.0
            return
        self._arm(now)


class Admission:
    """The limit around the gateway's app (see the module's docstring). `refused(reason)` is
    called for each refusal (the metrics); `paths`: the endpoints it guards (others pass)."""

    def __init__(self, app: ASGIApp, max_in_flight: int, max_queue_age_s: float,
                 refused: Callable[[str], None], paths: tuple[str, ...]) -> None:
        self.app, self.max_in_flight, self.max_queue_age_s = app, max_in_flight, max_queue_age_s
        self.refused, self.paths = refused, frozenset(paths)
        self.in_flight = 0
        self.lag = LoopLag()

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        reason = None
        if self.in_flight >= self.max_in_flight:
            reason = "in_flight"
        elif self.lag.lag_s() > self.max_queue_age_s:
            reason = "queue_age"
        if reason is not None:
            self.refused(reason)
            await send(_START)
            await send(_END)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
