"""What a gateway worker process (worker.py) tells the head about the requests it served, and
how the head counts it: metrics, demand and keys' rate limits, as events batched every
RELAY_EVERY_S over the worker's pipe (workers.py).

Events rather than totals, so that the head's own objects stay the one place these are kept:
its /metrics shows every worker's requests in the same series (a counter's increments and a
histogram's observations add up across processes; prometheus-client's multiprocess mode would
have done the same with files, but not for the collectors that read the head's tables), and
the placement reads one demand for the region."""

from __future__ import annotations

from collections import Counter, deque
from typing import Any, Callable, Iterable

RELAY_EVERY_S = 0.2
# GatewayMetrics' series that the request path touches (app.py, proxy.py, admission).
RELAYED_METRICS = ("requests", "ttft", "latency", "tokens", "retries", "stream_errors", "refused")

Event = tuple[Any, ...]


class Events:
    """Appended to by the worker's event loop, taken by its flusher thread (deque: both ends
    are safe from two threads without a lock)."""

    def __init__(self) -> None:
        self._queue: deque[Event] = deque()

    def add(self, event: Event) -> None:
        self._queue.append(event)

    def take(self) -> list[Event]:
        out = []
        while True:
            try:
                out.append(self._queue.popleft())
            except IndexError:
                return out


class _Series:
    __slots__ = ("_events", "_name", "_labels")

    def __init__(self, events: Events, name: str, labels: tuple[str, ...]) -> None:
        self._events, self._name, self._labels = events, name, labels

    def inc(self, amount: float = 1) -> None:
        self._events.add(("metric", self._name, self._labels, "inc", amount))

    def observe(self, value: float) -> None:
        self._events.add(("metric", self._name, self._labels, "observe", value))


class RelayedMetric:
    """Stands in for a prometheus Counter or Histogram with labels: what it is given goes to
    the head."""

    def __init__(self, events: Events, name: str) -> None:
        self._events, self._name = events, name

    def labels(self, *labels: str) -> _Series:
        return _Series(self._events, self._name, tuple(str(v) for v in labels))


class RelayedDemand:
    """Stands in for demand.Demand in a worker: the head's Demand counts the region's."""

    def __init__(self, events: Events) -> None:
        self._events = events

    def arrived(self, model: str, body_bytes: int, max_tokens: object) -> None:
        # Only a number is worth sending: Demand uses max_tokens only when it is an int.
        self._events.add(("demand", "arrived", model, body_bytes, max_tokens if isinstance(max_tokens, int) else None))

    def unserved(self, model: str) -> None:
        self._events.add(("demand", "unserved", model))

    def opened(self, model: str, held: bool = False) -> None:
        self._events.add(("demand", "opened", model, held))

    def closed(self, model: str, held: bool = False) -> None:
        self._events.add(("demand", "closed", model, held))


def relay_from(gateway: Any, events: Events, urgent: Callable[[], None]) -> None:
    """Make a worker's gateway send its metrics, demand and rate-limit spending as events.
    The proxy and the app read these attributes on each use, so replacing them is enough.
    Spending is sent at once (`urgent`), not at the next batch: a key's limit then holds
    across the workers for requests more than a few milliseconds apart, where waiting for
    the batch let a key with --rpm 1 through twice."""
    for name in RELAYED_METRICS:
        setattr(gateway.metrics, name, RelayedMetric(events, name))
    gateway.demand = RelayedDemand(events)

    def spent(kind: str, key: str, limit: int, cost: int) -> None:
        events.add(("spent", kind, key, limit, cost))
        urgent()

    gateway.limits.spent = spent


class Applier:
    """The head's side for one worker: applies its events to the head's gateway, and keeps what
    it opened and has not closed, so that a worker that dies does not leave the region's demand
    counting its requests forever."""

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway
        self._open: Counter[tuple[str, bool]] = Counter()

    def apply(self, events: Iterable[Event]) -> list[Event]:
        """Apply `events`; returns the rate-limit spending, for the other workers to hear."""
        spent = []
        gw = self.gateway
        for event in events:
            kind = event[0]
            if kind == "metric":
                _, name, labels, op, value = event
                if name in RELAYED_METRICS and op in ("inc", "observe"):
                    getattr(getattr(gw.metrics, name).labels(*labels), op)(value)
            elif kind == "demand":
                self._demand(event[1], event[2:])
            elif kind == "spent":
                gw.limits.spent_elsewhere(*event[1:])
                spent.append(event)
        return spent

    def _demand(self, call: str, args: tuple[Any, ...]) -> None:
        demand = self.gateway.demand
        if call == "arrived":
            demand.arrived(*args)
        elif call == "unserved":
            demand.unserved(*args)
        elif call in ("opened", "closed"):
            model, held = args
            if call == "opened":
                self._open[(model, held)] += 1
                demand.opened(model, held)
            elif self._open[(model, held)] > 0:
                self._open[(model, held)] -= 1
                demand.closed(model, held)

    def close_all(self) -> None:
        """The worker is gone: what it had open is closed."""
        for (model, held), count in self._open.items():
            for _ in range(count):
                self.gateway.demand.closed(model, held)
        self._open.clear()
