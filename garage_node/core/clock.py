"""Time, from one place that tests replace.

The agent, the engine manager and the supervisor read time only through a Clock: scheduling
uses `monotonic()` (immune to the PC's clock being set at boot), and `time()` is only for
timestamps a person reads. A test hands in a clock it moves by hand (testing/fakes.py), so
backoff, timeouts and staleness are decided the same way whatever the machine's speed.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


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
