"""The routing policy: least outstanding requests, with prefix affinity.

Requests that share a prompt prefix go to the PC that served that prefix last, so vLLM's
prefix cache answers the shared part without computing it again — unless that PC is
overloaded compared with the least loaded one (by more than `balance_abs` requests *and*
`balance_rel` times), when the least loaded PC wins. The thresholds are vllm-router's
(affinity 0.3, 1.5×) but for the absolute skew: 2 requests, not 64. A gaming PC runs a few
requests at a time, not a datacenter GPU's hundreds, so a skew of 64 is never reached and
affinity alone decides: a prompt group that first landed on a slow PC stays there. With 2,
a group spills to the less busy PC, which then holds it (`served` remembers the last PC), so
groups drift to the PCs that answer fastest (bench/routing_policy.py: 2.0× the requests of
round robin on two PCs of unequal speed, where 64 made 0.87×).

Prefixes are remembered as hashes of the prompt cut into fixed-size blocks of characters
(the first `max_blocks` of them), in a bounded LRU map from block-chain hash to PC. Pure: no
I/O and no clock; `choose` runs under the endpoint table's lock.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, TypeVar


class Target(Protocol):
    node_id: str

    @property
    def load(self) -> int: ...

    kv_cache_usage_pct: float


# The router hands `usable` and `lookup` only the targets it was given: generic over their
# type, so a caller's predicate may read its own type's fields.
T = TypeVar("T", bound=Target)


@dataclass(frozen=True)
class Decision:
    node_id: str
    reason: str  # "affinity", "least-load", "balance" (affinity overruled by skew)
    match: float  # share of the prompt's blocks that matched a known prefix


SMALL = 16  # up to this many candidates the least loaded is found exactly
SAMPLES = 2  # above it, the less loaded of this many random eligible PCs (power of two choices)


POLICIES = ("least-load-affinity", "round-robin")


class Router:
    def __init__(self, affinity_threshold: float = 0.3, balance_abs: int = 2, balance_rel: float = 1.5,
                 block_chars: int = 128, max_blocks: int = 32, max_entries: int = 200_000,
                 rng: random.Random | None = None, policy: str = "least-load-affinity") -> None:
        """`policy` "round-robin" takes the usable PCs in turn, blind to load and prefixes: the
        baseline bench/routing_policy.py compares against."""
        self.policy = policy
        self._turn = 0
        self.affinity_threshold = affinity_threshold
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.block_chars = block_chars
        self.max_blocks = max_blocks
        self.max_entries = max_entries
        self._prefixes: OrderedDict[int, str] = OrderedDict()
        self._rng = rng or random.Random()

    def blocks(self, prompt: str) -> list[int]:
        """Hashes of the prompt's leading blocks, each covering everything before it."""
        out: list[int] = []
        h = 0
        for start in range(0, min(len(prompt), self.block_chars * self.max_blocks), self.block_chars):
            h = hash((h, prompt[start:start + self.block_chars]))
            out.append(h)
        return out

    def choose(self, targets: Sequence[T], blocks: Sequence[int],
               usable: Callable[[T], bool] = lambda _: True,
               lookup: Callable[[str], T | None] | None = None) -> Decision | None:
        """The PC for a request among `targets` (those `usable` says may take it).

        Cost does not grow with the region: above SMALL targets the least loaded is estimated
        from SAMPLES random usable ones (within a request or two of the true minimum for a
        thousand PCs, at a constant cost), and the prefix's PC is found by `lookup` (node id ->
        target), not by a walk of the list."""
        if self.policy == "round-robin":
            return self._round_robin(targets, usable)
        least = self._least(targets, usable)
        if least is None:
            return None
        matched, share = self._affinity(blocks, usable, lookup or {t.node_id: t for t in targets}.get)
        if matched is None or share < self.affinity_threshold or matched.node_id == least.node_id:
            return Decision(least.node_id, "least-load", share)
        if matched.load - least.load > self.balance_abs and matched.load > self.balance_rel * least.load:
            return Decision(least.node_id, "balance", share)
        return Decision(matched.node_id, "affinity", share)

    def _round_robin(self, targets: Sequence[T], usable: Callable[[T], bool]) -> Decision | None:
        n = len(targets)
        for i in range(n):
            t = targets[(self._turn + i) % n]
            if usable(t):
                self._turn = (self._turn + i + 1) % n
                return Decision(t.node_id, "round-robin", 0.0)
        return None

    def _least(self, targets: Sequence[T], usable: Callable[[T], bool]) -> T | None:
        n = len(targets)
        if n > SMALL:
            picked = []
            for _ in range(8 * SAMPLES):
                t = targets[self._rng.randrange(n)]
                if usable(t) and t not in picked:
                    picked.append(t)
                    if len(picked) == SAMPLES:
                        break
            if picked:
                return min(picked, key=lambda t: (t.load, t.kv_cache_usage_pct))
            # Most PCs are unusable (starting, draining, failed): look at every one.
        offset = self._rng.randrange(n) if n else 0  # ties go round, not always to the first
        best: T | None = None
        for i in range(n):
            t = targets[(offset + i) % n]
            if usable(t) and (best is None or (t.load, t.kv_cache_usage_pct) < (best.load, best.kv_cache_usage_pct)):
                best = t
        return best

    def _affinity(self, blocks: Sequence[int], usable: Callable[[T], bool],
                  lookup: Callable[[str], T | None]) -> tuple[T | None, float]:
        matched: T | None = None
        count = 0
        for i, h in enumerate(blocks):
            node = self._prefixes.get(h)
            t = lookup(node) if node is not None else None
            if t is None or not usable(t):
                break
            matched, count = t, i + 1
        return matched, (count / len(blocks) if blocks else 0.0)

    def served(self, blocks: Sequence[int], node_id: str) -> None:
        """Remember that this PC now holds these blocks in its prefix cache."""
        for h in blocks:
            self._prefixes[h] = node_id
            self._prefixes.move_to_end(h)
        while len(self._prefixes) > self.max_entries:
            self._prefixes.popitem(last=False)

    def forget_node(self, node_id: str) -> None:
        for h in [h for h, n in self._prefixes.items() if n == node_id]:
            del self._prefixes[h]
