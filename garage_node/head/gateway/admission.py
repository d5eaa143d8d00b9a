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
  when it no longer binds. The lag alone shows a queue late: each request takes several turns
  of the loop, so at an overload's onset hundreds pile up in flight while the lag swings
  0-40 ms. So requests in flight count too (those still waiting for their answer: a stream
  whose first event is relayed is no queue, `Admission.relaying`):
  - to start: two windows in a row that each end with over MIN_IN_FLIGHT more in flight (a
    queue building), the loop a tenth of the bound late in either, start a limit once
    QUEUE_IN_FLIGHT are in flight (late by a tenth with a queue building also counts as late);
    the rate starts at DECREASE of what completed, and what completed is a first estimate of
    the gateway's capacity;
  - while limiting: a queue that stands and grows (over MIN_IN_FLIGHT more in flight than the
    fewest of the last QUEUE_MEMORY samples) cuts the rate below what completed, and the rate
    climbs only once the onset's backlog is worked off;
  - capacity: learnt while limiting (requests completed a second while a backlog is worked
    off); once the onset's backlog is gone the rate returns to 0.9 of it at once, and climbs
    1.01x a sample through it, 1.1x elsewhere.
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
from collections import deque
from typing import Any, Awaitable, Callable

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

LAG_EVERY_S = 0.05  # how often the loop's lag is measured while requests arrive
LAG_IDLE_AFTER_S = 2.0  # no request for this long: the timer stops (an idle gateway wakes nobody)
RETRY_AFTER_S = 1
DECREASE = 0.8  # the admitted rate, cut to this share of what got through, per late sample
INCREASE = 1.1  # and raised by this factor per sample on time (under half the bound) ...
GENTLE_INCREASE = 1.01  # ... or by this one once within CAPACITY_SHARE of what the gateway completes
CAPACITY_SHARE = 0.9
CAPACITY_AFTER_S = 0.1  # learnt from at least this long busy (one window can be a stalled loop)
FLOOR_RPS = 50.0  # never admit fewer than this per second
BURST_S = 0.1  # the bucket holds this many seconds of the rate (at least one request)
RATE_MEMORY_S = 1.0  # the arrival rate, averaged over about this long
MIN_IN_FLIGHT = 16  # fewer in flight than this: a late loop is not the gateway's doing
QUEUE_LAG_SHARE = 0.1  # late by this share of the bound, with a queue building, counts as behind
QUEUE_IN_FLIGHT = 4 * MIN_IN_FLIGHT  # a queue building twice starts a limit with this many in flight
QUEUE_MEMORY = 10  # samples: a queue is what is in flight over the fewest of the last this many

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
    """The admitted rate, from the loop's lag and the requests in flight (see the module's
    docstring). One event loop: no locking. `admit()` per request; the samples come from
    LoopLag's timer. `in_flight()`: how many requests the gateway is handling now."""

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
        self._grew_before = False  # the last window ended with a queue building ...
        self._lag_before = 0.0  # ... and its sample was this late
        self._window_at: float | None = None
        self._admitted = 0  # in this sample's window
        self._arrived = 0
        self.admitted_rps = 0.0  # over the last window
        self.completed_rps = 0.0  # over the last window (admitted less what it added to in flight)
        self.arrived_rps = 0.0  # averaged over about RATE_MEMORY_S
        self.capacity_rps = float("inf")  # completed a second while busy (learnt while limiting)
        self._in_flight_at = self._in_flight_before = 0  # at the start of this window, of the last
        self._in_flight_seen: deque[int] = deque(maxlen=QUEUE_MEMORY)  # at the last samples
        self._completed_seen: deque[float] = deque(maxlen=QUEUE_MEMORY)  # a second, the last windows
        self._resumed = False  # back to near capacity once, after this overload's onset
        self._baseline = 0  # in flight before this overload began, or the fewest since
        self._calm_in_flight = 0  # at the last sample with no queue building, not limiting
        self._busy_completed = 0.0  # completed over the busy windows of this overload ...
        self._busy_s = 0.0  # ... and their length: one window alone can be a stalled loop (0 done)

    def admit(self) -> bool:
        return self.decide(self.lag.touch())

    def decide(self, now: float) -> bool:
        """Whether a request arriving at `now` (the loop's clock) is admitted."""
        self._arrived += 1
        if not self.limiting and (self._late_before or self._grew_before):  # the window under way too: seen early
            if self._overloaded(self.lag.overdue_s(now), self.in_flight() - self._in_flight_at):
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
            completed_rps = self.completed_rps = max(0.0, self._admitted + self._in_flight_at - in_flight) / span
            self._completed_seen.append(completed_rps)
            weight = 1.0 - math.exp(-span / RATE_MEMORY_S)
            self.arrived_rps += weight * (self._arrived / span - self.arrived_rps)
        self._in_flight_before = self._in_flight_at
        self._window_at, self._admitted, self._arrived, self._in_flight_at = now, 0, 0, in_flight
        grown = in_flight - self._in_flight_before
        self._in_flight_seen.append(in_flight)
        self._baseline = min(self._baseline, in_flight)
        if not self.limiting and grown <= MIN_IN_FLIGHT:
            self._calm_in_flight = in_flight
        starting = not self.limiting and self._overloaded(lag_s, grown)
        # Learnt only from windows with work of its own waiting at both ends (the gateway was
        # busy all window, so what it completed is what it can), and only while it works a
        # backlog off, completing more than it was handed: with long streams open, what
        # completes is bounded by their length, not by the CPU.
        busy = min(in_flight, self._in_flight_before) >= MIN_IN_FLIGHT
        if (completed_rps is not None and busy and completed_rps > self.admitted_rps
                and (self.limiting or starting)):
            self._learn_capacity(completed_rps * span, span)
        if starting:
            if self.capacity_rps == float("inf") and busy and self.completed_rps > self.floor_rps:
                # Busy all the window the queue built in: what it completed is a first estimate
                # (a drain can be too short to learn from: then it climbed back from the floor).
                # Not a stalled window's nothing: the climb back would never know where to slow.
                self.capacity_rps = self.completed_rps
            self._limit(now)
        elif self.limiting:
            self._follow(lag_s, grown, completed_rps)
        self._late_before = self._behind(lag_s, grown)
        self._grew_before, self._lag_before = grown > MIN_IN_FLIGHT, lag_s

    def _follow(self, lag_s: float, grown: int, completed_rps: float | None) -> None:
        """While limiting: the admitted rate after one sample."""
        if lag_s > self.target_s:
            self.rate = max(self.floor_rps, DECREASE * min(self.rate, self.admitted_rps, self.capacity_rps))
        elif completed_rps is not None and grown > 0 and self._queued() > MIN_IN_FLIGHT:
            # On time, but a queue stands and grows: admitted faster than it completes, which the
            # lag shows only once it is a hundred requests long. Cut below what completes, so it
            # drains (held at what completes, it stood: 80-160 in flight, 100-500 ms, at 40 % of
            # a core). What completes over the last windows: one alone can be a throttled or
            # collecting loop (at 20 % of a core a window of 208/s cut 528/s to 166/s).
            completed = sum(self._completed_seen) / len(self._completed_seen)
            self.rate = max(self.floor_rps, DECREASE * min(self.rate, completed))
        elif lag_s < self.target_s / 2:
            # Up only once what queued at the onset is worked off: a backlog that stands still
            # (admitted as fast as it completes) shows neither in the lag nor in growth. Lifted
            # even so once it no longer binds: streams admitted during the overload stay in
            # flight for as long as they last, and must not hold a limit after the load is gone.
            if not self._backlog():
                self._climb()
            self._lift_if_unbound()

    def _climb(self) -> None:
        """On time: the rate up, fast to near capacity, gently through it, fast again past it
        (the estimate was low then, learnt from a short drain; the standing queue's cut bounds
        the overshoot)."""
        near = CAPACITY_SHARE * self.capacity_rps <= self.rate <= self.capacity_rps / CAPACITY_SHARE
        below = self.rate < CAPACITY_SHARE * self.capacity_rps
        self.rate *= GENTLE_INCREASE if near else INCREASE
        if below and not self._resumed and self.capacity_rps < float("inf"):
            # The onset's backlog is worked off and what it can carry is known: back to near that
            # at once (climbing 1.1x a sample from the floor took 1.5 s at a third of it). Once:
            # after later cuts, at once back up was a queue again every 0.2 s.
            self.rate, self._resumed = CAPACITY_SHARE * self.capacity_rps, True

    def _lift_if_unbound(self) -> None:
        if self.rate > 2 * self.arrived_rps:  # the bound no longer binds: lifted
            self.limiting, self.rate, self._resumed = False, float("inf"), False
            self.capacity_rps, self._busy_completed, self._busy_s = float("inf"), 0.0, 0.0  # learnt afresh

    def _backlog(self) -> bool:
        """Over MIN_IN_FLIGHT more in flight than before this overload (or since, at the fewest):
        streams open all along are in both, so they are not a backlog."""
        return self._in_flight_at - self._baseline > MIN_IN_FLIGHT

    def _queued(self) -> int:
        """Requests in flight over the fewest in flight at the last QUEUE_MEMORY samples: the
        queue that built up since then (streams open for long are in both, so they are not)."""
        return self._in_flight_seen[-1] - min(self._in_flight_seen)

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
        """Late; or a little late (QUEUE_LAG_SHARE of the bound) with a queue building (over
        MIN_IN_FLIGHT more in flight than the window began with): at an overload's onset the lag
        stays under the bound for a few samples while hundreds of requests pile up."""
        return lag_s > self.target_s or (lag_s > QUEUE_LAG_SHARE * self.target_s and grown > MIN_IN_FLIGHT)

    def _overloaded(self, lag_s: float, grown: int) -> bool:
        """Behind now and at the sample before, with more than a trickle arriving, and enough in
        flight for the lateness to be the gateway's own."""
        if self.arrived_rps <= self.floor_rps:
            return False
        in_flight = self.in_flight()
        if self._behind(lag_s, grown) and self._late_before:
            return in_flight >= MIN_IN_FLIGHT
        return in_flight >= QUEUE_IN_FLIGHT and self._growing(lag_s, grown)

    def _growing(self, lag_s: float, grown: int) -> bool:
        """A queue building in this window and the last (over MIN_IN_FLIGHT more in flight than
        each began with), the loop a little late in either. At an onset the lag swings 0-40 ms
        from one sample to the next while each request needs several turns of the loop, so
        requests queue for hundreds of ms before it is late twice in a row (bench/gateway_load.py
        at 40 % of a core: 200-390 in flight when that started a limit; 100-180 this way)."""
        return (grown > MIN_IN_FLIGHT and self._grew_before
                and max(lag_s, self._lag_before) > QUEUE_LAG_SHARE * self.target_s)

    def _limit(self, now: float) -> None:
        """Over capacity: from now on at most DECREASE of what got through and completed in the
        last window, the bucket empty. (Of what got through only, it started at 1,000-1,500 a
        second with a queue of a hundred already waiting.)"""
        self.limiting = True
        self._baseline = self._calm_in_flight
        self.rate = max(self.floor_rps, DECREASE * min(self.admitted_rps, self.completed_rps))
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
        # Streams whose answer has begun (set by the app): they are relayed, not queued, so the
        # governor does not count them. 400 streams arriving over a second grew "in flight" by
        # 20 a window, which read as a queue building: the limit started and refused most of
        # them (bench/seed_scale.py --streams 400: 603 streams served in 10 s, 2,000 straight).
        self.relaying = 0
        self.governor = Governor(max_queue_age_s, in_flight=lambda: self.in_flight - self.relaying)
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
