"""How many PCs each wanted model should have: its share of the region by demand, within the
operator's min/max and the PCs that can serve it at all.

Counts are in typical PCs: a model's unit is the mean decode rate of the PCs that can serve it
(bandwidth.py: memory bandwidth over the GB of weights a token reads, in the precision each PC
would use), so ten RTX 4090s on a model count for more than ten RTX 4060s. A model's pressure is
weight x requested tokens/s / that mean rate: a PC serves about ten times fewer tokens of a 19 GB
32B AWQ than of a 1 GB 0.5B, and tokens/s alone would starve big models. Requests that found no PC count
at least TOKENS_PER_UNSERVED tokens each. With no demand anywhere, the region is spread by weight
alone, ready for whatever comes.

The ideal counts are fractional: ideal_m = clamp(lambda x pressure_m, floor_m, cap_m), with lambda
found so that they add up to the PCs available (floors and caps never break, even when that
leaves PCs over or short). Models share PCs, and big ones only big PCs: when the models that
only a set of PCs can serve (the 14B and 32B models, on the PCs with 12 GB or more) would get
more than that set holds, they share it with a lambda of their own, and the others share the
rest (water-filling over the sets, tightest first). Rounding to whole PCs, and hysteresis, are
decide.py's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# A request that found no PC stands for at least this many tokens (the gateway counts a request
# without max_tokens as 256 completion tokens, plus its prompt).
TOKENS_PER_UNSERVED = 512.0
_BISECTIONS = 50


@dataclass(frozen=True)
class ModelNeed:
    model: str
    weight: float
    tokens_per_s: float
    unserved_per_s: float
    has_demand: bool  # any tokens, open requests or unserved requests
    rate: float  # decode rate of a typical PC that can serve it (relative, bandwidth.py)
    min_replicas: int
    max_replicas: int | None
    eligible: int  # PCs that could serve it now
    # Which kinds of PC (decide.py's groups of PCs alike) can serve it; empty: not known.
    groups: frozenset[int] = frozenset()

    @property
    def pressure(self) -> float:
        tokens = max(self.tokens_per_s, TOKENS_PER_UNSERVED * self.unserved_per_s)
        return self.weight * tokens / self.rate if self.rate > 0 else 0.0

    @property
    def cap(self) -> int:
        limit = self.eligible if self.max_replicas is None else min(self.max_replicas, self.eligible)
        return max(0, limit)

    @property
    def floor(self) -> int:
        """Replicas it has a claim on before any share: the operator's minimum, and one for a
        model with demand (a request nobody can serve is the worst outcome)."""
        return min(self.cap, max(self.min_replicas, 1 if self.has_demand else 0))


@dataclass(frozen=True)
class Target:
    model: str
    ideal: float
    floor: int
    cap: int
    pressure: float
    share: float  # of the region's pressure (by weight when there is no demand)
    has_demand: bool = False


def targets(needs: list[ModelNeed], pool: int, sizes: Mapping[int, int] | None = None) -> dict[str, Target]:
    """Ideal PC counts per model for `pool` PCs; `sizes`: PCs per group (ModelNeed.groups)."""
    pressures = {n.model: n.pressure for n in needs}
    demand = sum(pressures.values())
    weights = pressures if demand > 0 else {n.model: n.weight for n in needs}
    total = sum(weights.values())
    ideal: dict[str, float] = {}
    left, room = list(needs), float(pool)
    while left:
        fill = _fill(left, room, weights)
        tight = _tightest(left, fill, sizes or {}, ideal, needs) if sizes else None
        if tight is None:
            ideal.update(fill)
            break
        inside, capacity = tight
        fixed = _fill(inside, capacity, weights)
        ideal.update(fixed)
        room -= sum(fixed.values())
        left = [n for n in left if n.model not in fixed]
    return {n.model: Target(n.model, ideal[n.model], n.floor, n.cap, pressures[n.model],
                            weights[n.model] / total if total > 0 else 0.0, n.has_demand)
            for n in needs}


def _fill(needs: list[ModelNeed], pool: float, weights: Mapping[str, float]) -> dict[str, float]:
    """clamp(lambda x weight, floor, cap) per model, adding up to `pool` where floors and caps allow."""
    w = [weights[n.model] for n in needs]
    floors = [n.floor for n in needs]
    caps = [n.cap for n in needs]

    def counts(lam: float) -> list[float]:
        return [min(c, max(f, lam * x)) for f, c, x in zip(floors, caps, w, strict=True)]

    lam = 0.0
    if sum(w) > 0:
        # counts(lam) grows with lam; past pool / min positive weight every model is at its cap.
        lo, hi = 0.0, max(pool, 0.0) / min(x for x in w if x > 0) + 1.0
        for _ in range(_BISECTIONS):
            mid = (lo + hi) / 2
            if sum(counts(mid)) < pool:
                lo = mid
            else:
                hi = mid
        lam = hi
    return {n.model: c for n, c in zip(needs, counts(lam), strict=True)}


def _tightest(left: list[ModelNeed], fill: Mapping[str, float], sizes: Mapping[int, int],
              done: Mapping[str, float], needs: list[ModelNeed]) -> tuple[list[ModelNeed], float] | None:
    """The set of PCs most overdrawn by the models that only it can serve: (those models, the PCs
    left to them), or None when every set holds what its models get."""
    worst: tuple[float, list[ModelNeed], float] | None = None
    for groups in {n.groups for n in left if n.groups}:
        inside = [n for n in left if n.groups and n.groups <= groups]
        # What models placed already took of these PCs (those that could only use them).
        taken = sum(done[n.model] for n in needs if n.model in done and n.groups and n.groups <= groups)
        capacity = sum(sizes.get(g, 0) for g in groups) - taken
        want = sum(fill[n.model] for n in inside)
        if want > capacity + 1e-9 and len(inside) < len(left):
            ratio = want / max(capacity, 1e-9)
            if worst is None or ratio > worst[0]:
                worst = (ratio, inside, max(capacity, 0.0))
    return (worst[1], worst[2]) if worst else None
