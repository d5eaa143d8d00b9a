"""Time, from one place that tests replace.

The agent, the engine manager and the supervisor read time only through a Clock: scheduling
uses `monotonic()` (immune to the PC's clock being set at boot), and `time()` is only for
timestamps a person reads. A test hands in a clock it moves by hand (testing/fakes.py), so
backoff, timeouts and staleness are decided the same way whatever the machine's speed.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Generic, Protocol, TypeVar

T = TypeVar("T")


class Clock(Protocol):
    def time(self) -> float: ...

    def monotonic(self) -> float: ...

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Wait for `event` up to `timeout` seconds; True if it was set."""
        ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        return event.wait(timeout)


SYSTEM = SystemClock()


class Refreshed(Generic[T]):
    """A value read again at most every `every_s` seconds, whoever asks: one read of the
    database for a whole region's heartbeats or requests, not one per caller. Thread-safe;
    `stale()` makes the next `get()` read again (after a write the caller made itself)."""

    def __init__(self, read: Callable[[], T], every_s: float, clock: Clock = SYSTEM) -> None:
        self._read, self.every_s, self.clock = read, every_s, clock
        self._lock = threading.Lock()
        self._value: T | None = None
        self._at = float("-inf")

    def get(self) -> T:
        with self._lock:
            now = self.clock.monotonic()
            if self._value is None or now - self._at >= self.every_s:
                self._value = self._read()
                self._at = now
            return self._value

    def stale(self) -> None:
        with self._lock:
            self._at = float("-inf")
