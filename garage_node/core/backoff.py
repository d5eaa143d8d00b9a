"""Exponential backoff with full jitter: retries spread out and never become a tight loop."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    initial_s: float = 1.0
    max_s: float = 60.0
    attempts: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self) -> float:
        ceiling = min(self.max_s, self.initial_s * (2 ** self.attempts))
        self.attempts += 1
        # Half fixed, half random: a fleet rebooting together does not retry in lockstep,
        # and a single node still waits a predictable minimum.
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.attempts = 0
