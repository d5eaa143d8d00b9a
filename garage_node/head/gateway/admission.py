"""Refuse, don't collapse: the gateway's admission limit.

Past its ceiling a gateway that takes every request serves none of them well: each new request
adds work to a loop already behind, every answer waits behind the queue, latency climbs to
seconds and stays there after the load stops (issue #22 measured p50 10-28 s at 500 req/s).
So two bounds, checked before anything else is done for a request (no key lookup, no body
read, no JSON), and past either a 503 `overloaded` with Retry-After, at once:

- in flight: at most `max_in_flight` requests being handled at a time (streams included, until
  their last byte). It bounds what the gateway holds open (connections to the PCs, memory);
- the admitted rate, when the CPU is spent (`Governor`): the event loop's lag, measured by a
  timer every LAG_EVERY_S that notes how late it ran, is the age of the work queued on it. Two
  late samples in a row (over `max_queue_age_s`; one is a blip on a shared machine) and new
  requests are admitted at a rate, a token bucket: cut to DECREASE of what the gateway managed
  while its loop stays late, raised by INCREASE each sample once it is on time again, and lifted
  when it no longer binds. Two things keep it near what the gateway can do rather than
  swinging around it: it learns the gateway's capacity (requests completed a second while it
  limits with work waiting) and climbs 1.1x a sample only up to 0.9 of that, then 1.01x; and a
  sample on time whose window ended with over MIN_IN_FLIGHT more requests in flight (a queue
  building, which the lag shows only once hundreds long) holds the rate at what completed,
  and counts as late for starting to limit when it is more than half late.
  A fixed in-flight bound cannot do this: at 2x the ceiling 64 short
  requests in flight still took the whole CPU and left none to refuse the rest, whose 503s
  waited seconds; and streams, mostly waiting on the engines, would need a bound of hundreds.
  The rate never goes below FLOOR_RPS, and nothing is limited while fewer than that arrive: a
  gateway that cannot serve that many is broken, not busy, and a busy shared machine's lag must
  not turn a trickle of requests away. Nor while fewer than MIN_IN_FLIGHT requests are in
  flight: a request costs the gateway about a millisecond of CPU, so a handful cannot make its
  loop 50 ms late; the lateness is the machine's (engines, Ray, a collection beside it) and a
  refusal frees nothing. The bound on a busy machine is the other way round: requests arriving
  at rate R into a loop L seconds late stay at least L each, so R*L of them are in flight (at
  1,000/s and 50 ms, 50). CI's region test (4 clients in a closed loop, two vLLM engines on
  2 CPUs) was turned away by a late loop with 4 in flight before this. (Only to start: once
  limiting, the admitted rate is low and its requests pass quickly, so few are in flight
  whatever the cause; the cuts go on while the loop is late.)

A refusal must cost far less than a served request, or refusing does not free the CPU: with
the head's listener the check runs in the HTTP protocol once the headers are parsed (connguard's
`shed` hook), and the 503 is written there, without uvicorn's request cycle, task or ASGI call
(which cost a third of a served request); the connection stays open. `Admission` also guards
the app itself (the in-flight count, and the rate where no protocol hook runs)."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any, Awaitable, Callable

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

LAG_EVERY_S = 0.05  # how often the loop's lag is measured while requests arrive
LAG_IDLE_AFTER_S = 2.0  # no request for this long: the timer stops (an idle gateway wakes nobody)
RETRY_AFTER_S = 1
DECREASE = 0.8  # the admitted rate, cut to this share of what got through, per late sample
INCREASE = 1.1  # and raised by this factor per sample on time (under half the bound) ...
GENTLE_INCREASE = 1.01  # ... or by this one once within CAPACITY_SHARE of what the gateway completes
CAPACITY_SHARE = 0.9
CAPACITY_AFTER_S = 0.2  # learnt from at least this long busy (one window can be a stalled loop)
FLOOR_RPS = 50.0  # never admit fewer than this per second
BURST_S = 0.1  # the bucket holds this many seconds of the rate (at least one request)
RATE_MEMORY_S = 1.0  # the arrival rate, averaged over about this long
MIN_IN_FLIGHT = 16  # fewer in flight than this: a late loop is not the gateway's doing

_BODY = json.dumps({"error": {
    "message": "the gateway is over its capacity right now; send the request again after Retry-After seconds",
    "type": "server_error", "param": None, "code": "overloaded"}}).encode()
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(_BODY)).encode()),
            (b"retry-after", str(RETRY_AFTER_S).encode())]
_START = {"type": "http.response.start", "status": 503, "headers": _HEADERS}
_END = {"type": "http.response.body", "body": _BODY}
# The same answer as bytes, for the protocol to write itself (HTTP/1.1, the connection kept).
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in _HEADERS)
           + b"\r\n" + _BODY)


class LoopLag:
    """How late the event loop runs its timers: the age of work queued on it now. A timer
    re-armed every LAG_EVERY_S while requests come; `on_sample(lag, now)` is called with how late
    each one fired. `touch()` on every request keeps it going; idle, it stops."""

    def __init__(self, on_sample: Callable[[float, float], None] = lambda lag, now: None) -> None:
        self.on_sample = on_sample
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._last_use = 0.0

    def touch(self) -> float:
        """Now, on the loop's clock, with the timer armed (it stops after LAG_IDLE_AFTER_S idle)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._last_use = now
        if self._timer is None or loop is not self._loop:
            self._loop = loop
            self._arm(now)
        return now

    def overdue_s(self, now: float) -> float:
        return max(0.0, now - self._due) if self._timer is not None else 0.0

    def _arm(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + LAG_EVERY_S
        self._timer = self._loop.call_at(self._due, self._fired)

    def _fired(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self.on_sample(now - self._due, now)
        if now - self._last_use > LAG_IDLE_AFTER_S:
            self._timer = None
            return
        self._arm(now)


class Governor:
    """The admitted rate, from the loop's lag (see the module's docstring). One event loop: no
    locking. `admit()` per request; the samples come from LoopLag's timer. `in_flight()`: how
    many requests the gateway is handling now."""

    def __init__(self, max_queue_age_s: float, in_flight: Callable[[], int],
                 floor_rps: float = FLOOR_RPS) -> None:
        self.target_s = max_queue_age_s
        self.in_flight = in_flight
        self.floor_rps = floor_rps
        self.lag = LoopLag(self.sample)
        self.limiting = False
        self.rate = float("inf")  # requests/s admitted while limiting
        self._tokens = 0.0
        self._tokens_at = 0.0
        self._late_before = False
        self._window_at: float | None = None
        self._admitted = 0  # in this sample's window
        self._arrived = 0
        self.admitted_rps = 0.0  # over the last window
        self.arrived_rps = 0.0  # averaged over about RATE_MEMORY_S
        self.capacity_rps = float("inf")  # completed a second while busy (learnt while limiting)
        self._in_flight_at = self._in_flight_before = 0  # at the start of this window, of the last
        self._busy_completed = 0.0  # completed over the busy windows of this overload ...
        self._busy_s = 0.0  # ... and their length: one window alone can be a stalled loop (0 done)

    def admit(self) -> bool:
        return self.decide(self.lag.touch())

    def decide(self, now: float) -> bool:
        """Whether a request arriving at `now` (the loop's clock) is admitted."""
        self._arrived += 1
        if not self.limiting and self._late_before:  # the sample under way behind too: twice in a row, seen early
            lag = self.lag.overdue_s(now)
            if lag > self.target_s / 2 and self._overloaded(lag, self.in_flight() - self._in_flight_at):
                self._limit(now)
        if self.limiting:
            self._tokens = min(max(1.0, self.rate * BURST_S), self._tokens + (now - self._tokens_at) * self.rate)
            self._tokens_at = now
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
        self._admitted += 1
        return True

    def sample(self, lag_s: float, now: float) -> None:
        """One lag sample: the rate follows it."""
        in_flight = self.in_flight()
        completed_rps = None
        span = 0.0
        if self._window_at is not None and now > self._window_at:
            span = now - self._window_at
            self.admitted_rps = self._admitted / span
            completed_rps = max(0.0, self._admitted + self._in_flight_at - in_flight) / span
            weight = 1.0 - math.exp(-span / RATE_MEMORY_S)
            self.arrived_rps += weight * (self._arrived / span - self.arrived_rps)
        self._in_flight_before = self._in_flight_at
        self._window_at, self._admitted, self._arrived, self._in_flight_at = now, 0, 0, in_flight
        grown = in_flight - self._in_flight_before
        starting = not self.limiting and self._overloaded(lag_s, grown)
        # Learnt only from windows with work of its own waiting at both ends (the gateway was
        # busy all window, so what it completed is what it can), and only while it works a
        # backlog off, completing more than it was handed: with long streams open, what
        # completes is bounded by their length, not by the CPU.
        if (completed_rps is not None and min(in_flight, self._in_flight_before) >= MIN_IN_FLIGHT
                and completed_rps > self.admitted_rps and (self.limiting or starting)):
            self._learn_capacity(completed_rps * span, span)
        if starting:
            self._limit(now)
        elif self.limiting:
            self._follow(lag_s, grown, completed_rps)
        self._late_before = self._behind(lag_s, grown)

    def _follow(self, lag_s: float, grown: int, completed_rps: float | None) -> None:
        """While limiting: the admitted rate after one sample."""
        if lag_s > self.target_s:
            self.rate = max(self.floor_rps, DECREASE * min(self.rate, self.admitted_rps, self.capacity_rps))
        elif completed_rps is not None and grown > MIN_IN_FLIGHT:
            # On time, but admitting faster than it completes: a queue is building, which the
            # lag shows only once it is hundreds of requests long. Held at what completes.
            self.rate = max(self.floor_rps, min(self.rate, completed_rps))
        elif lag_s < self.target_s / 2:
            near = self.rate >= CAPACITY_SHARE * self.capacity_rps
            self.rate *= GENTLE_INCREASE if near else INCREASE
            if self.rate > 2 * self.arrived_rps:  # the bound no longer binds: lifted
                self.limiting, self.rate = False, float("inf")
                self.capacity_rps, self._busy_completed, self._busy_s = float("inf"), 0.0, 0.0  # learnt afresh

    def _learn_capacity(self, completed: float, span: float) -> None:
        """Over its CPU with work waiting, what the gateway completes a second is what it can
        carry: admitting more only queues. The rate climbs back quickly to near it and gently
        past it (without this it climbed 1.1x a sample to twice the ceiling before the lag
        showed, then cut for half a second, and again: admitted p99 0.5-1 s at twice the load)."""
        self._busy_completed += completed
        self._busy_s += span
        if self._busy_s >= CAPACITY_AFTER_S:
            self.capacity_rps = self._busy_completed / self._busy_s

    def _behind(self, lag_s: float, grown: int) -> bool:
        """Late; or half late with a queue building (over MIN_IN_FLIGHT more in flight than the
        window began with): at an overload's onset the lag hovers near the bound for a few
        samples while hundreds of requests pile up (0.3 s more of admitting everything)."""
        return lag_s > self.target_s or (lag_s > self.target_s / 2 and grown > MIN_IN_FLIGHT)

    def _overloaded(self, lag_s: float, grown: int) -> bool:
        """Behind now and at the sample before, with more than a trickle arriving, and enough in
        flight for the lateness to be the gateway's own."""
        return (self._behind(lag_s, grown) and self._late_before and self.arrived_rps > self.floor_rps
                and self.in_flight() >= MIN_IN_FLIGHT)

    def _limit(self, now: float) -> None:
        """Over capacity: from now on at most DECREASE of what got through, the bucket empty."""
        self.limiting = True
        self.rate = max(self.floor_rps, DECREASE * self.admitted_rps)
        self._tokens, self._tokens_at = 0.0, now


class Admission:
    """The limit around the gateway's app (see the module's docstring). `refused(reason)` is
    called for each refusal (the metrics); `paths`: the endpoints it guards (others pass)."""

    def __init__(self, app: ASGIApp, max_in_flight: int, max_queue_age_s: float,
                 refused: Callable[[str], None], paths: tuple[str, ...]) -> None:
        self.app, self.max_in_flight = app, max_in_flight
        self.refused, self.paths = refused, frozenset(paths)
        self._raw_paths = frozenset(p.encode() for p in paths)
        self.in_flight = 0
        self.governor = Governor(max_queue_age_s, in_flight=lambda: self.in_flight)
        self._in_protocol = False  # the protocol asks the governor: the app must not ask again

    def protocol_hook(self) -> Callable[[bytes, bytes], bytes | None]:
        """For connguard.guarded_protocol(shed=...): asked once a request's headers are in; the
        503 to write when it is refused. From then on the app does not ask the governor again."""
        self._in_protocol = True
        return self.shed

    def shed(self, method: bytes, path: bytes) -> bytes | None:
        if method != b"POST" or path not in self._raw_paths:
            return None
        reason = self._over()
        if reason is None:
            return None
        self.refused(reason)
        return REFUSAL

    def _over(self, ask_governor: bool = True) -> str | None:
        if self.in_flight >= self.max_in_flight:
            return "in_flight"
        if ask_governor and not self.governor.admit():
            return "queue_age"
        return None

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        reason = self._over(ask_governor=not self._in_protocol)
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
