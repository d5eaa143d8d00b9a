"""What is wrong on this PC now: one entry per source, as each part of the agent sees it.

Each part (enrollment, the head session, the overlay, the firewall, the tunnel probe, Ray)
sets the problem of its own source and clears it when the cause is gone; no part can
overwrite another's. A problem is logged once when it starts and once when it is resolved,
not on every retry: a PC whose network is down for two minutes would otherwise write a
warning every few seconds (32 in 120 s before this tracker, flipping between two sources).
Status shows the worst problem as `last_error` and all of them as `problems`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from enum import Enum

from garage_node.core.clock import Clock
from garage_node.core.wire import ProblemStatus

log = logging.getLogger(__name__)


class Source(Enum):
    """Where a problem came from. The order is the order of precedence for `worst()`: a bug
    first, then the step that comes first on the way to serving (a PC that cannot reach its
    head has no use for a word about its tunnel), matching what node/state.py derives."""

    INTERNAL = "internal"
    ENROLL = "enroll"
    HEAD = "head"
    OVERLAY = "overlay"
    FIREWALL = "firewall"
    TUNNEL = "tunnel"  # the overlay carries nothing (pings to the hub go unanswered)
    RAY = "ray"
    PLACEMENT = "placement"  # the head's assignment refused, or its weights not fetched (node/assign.py)


_RANK = {s: i for i, s in enumerate(Source)}


@dataclass
class Problem:
    message: str
    hint: str
    source: Source
    at: float  # monotonic, when the problem started
    retry_at: float | None = None  # monotonic: when the agent tries again, if it will


class Health:
    """The problems of the agent's parts, keyed by source. Thread-safe: the local API reads it
    while the reconcile loop writes."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._problems: dict[Source, Problem] = {}
        self._lock = threading.Lock()

    def fail(self, source: Source, message: str, hint: str = "", retry_in: float | None = None) -> None:
        """Record `source`'s problem. A problem that goes on with new words (a count of missed
        pings, another reason the head cannot be reached) keeps its start time and is not
        logged again at warning level."""
        now = self.clock.monotonic()
        with self._lock:
            old = self._problems.get(source)
            if old is None:
                log.warning("%s", message)
                self._problems[source] = Problem(message, hint, source, at=now)
            elif old.message != message:
                log.debug("%s", message)
                old.message, old.hint = message, hint
            self._problems[source].retry_at = now + retry_in if retry_in is not None else None

    def clear(self, *sources: Source) -> None:
        with self._lock:
            for source in sources:
                gone = self._problems.pop(source, None)
                if gone is not None:
                    log.info("resolved (%s): %s", source.value, gone.message)

    def get(self, source: Source) -> Problem | None:
        with self._lock:
            return self._problems.get(source)

    def all(self) -> list[Problem]:
        """Every current problem, worst first."""
        with self._lock:
            return sorted(self._problems.values(), key=lambda p: _RANK[p.source])

    def worst(self) -> Problem | None:
        problems = self.all()
        return problems[0] if problems else None

    def statuses(self) -> list[ProblemStatus]:
        """Every current problem as status shows it, worst first."""
        return [self._status(p) for p in self.all()]

    def status(self, problem: Problem | None) -> ProblemStatus | None:
        return self._status(problem) if problem is not None else None

    def _status(self, problem: Problem) -> ProblemStatus:
        now = self.clock.monotonic()
        retry = round(max(0.0, problem.retry_at - now), 1) if problem.retry_at is not None else None
        return ProblemStatus(message=problem.message, hint=problem.hint, age_s=round(now - problem.at, 1),
                             retry_in_s=retry, source=problem.source.value)
