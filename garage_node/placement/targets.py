"""How many PCs each wanted model should have: its share of the region by demand, within the
operator's min/max and the PCs that can serve it at all.

A model's pressure is weight x requested tokens/s x its size in billions of parameters: decoding
is bound by reading the weights, so a PC serves roughly size-times fewer tokens of a 32B model
than of a 1B one, and tokens/s alone would starve big models. Requests that found no PC count
at least TOKENS_PER_UNSERVED tokens each. With no demand anywhere, the region is spread by weight
alone, ready for whatever comes.

The ideal counts are fractional: ideal_m = clamp(lambda x pressure_m, floor_m, cap_m), with lambda
found so that they add up to the PCs available (floors and caps never break, even when that
leaves PCs over or short). Rounding to whole PCs, and hysteresis, are decide.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

# A request that found no PC stands for at least this many tokens (the gateway counts a request
# without max_tokens as 256 completion tokens, plus its prompt).
TOKENS_PER_UNSERVED = 512.0
_BISECTIONS = 60


@dataclass(frozen=True)
class ModelNeed:
    model: str
    weight: float
    tokens_per_s: float
    unserved_per_s: float
    has_demand: bool  # any tokens, open requests or unserved requests
    size_b: float  # billions of parameters
    min_replicas: int
    max_replicas: int | None
    eligible: int  # PCs that could serve it now

    @property
    def pressure(self) -> float:
        tokens = max(self.tokens_per_s, TOKENS_PER_UNSERVED * self.unserved_per_s)
        return self.weight * tokens * max(self.size_b, 0.001)

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


def targets(needs: list[ModelNeed], pool: int) -> dict[str, Target]:
    """Ideal PC counts per model for `pool` PCs."""
    demand = sum(n.pressure for n in needs)
    weights = {n.model: (n.pressure if demand > 0 else n.weight) for n in needs}
    total = sum(weights.values())

    def counts(lam: float) -> dict[str, float]:
        return {n.model: min(n.cap, max(n.floor, lam * weights[n.model])) for n in needs}

    lo, hi = 0.0, 1.0
    if total > 0:
        # Grow hi until the counts reach the pool (or every model is at its cap).
        while sum(counts(hi).values()) < pool and hi < 1e18:
            hi *= 2
        for _ in range(_BISECTIONS):
            mid = (lo + hi) / 2
            if sum(counts(mid).values()) < pool:
                lo = mid
            else:
                hi = mid
    ideal = counts(hi if total > 0 else 0.0)
    return {n.model: Target(n.model, ideal[n.model], n.floor, n.cap, n.pressure,
                            weights[n.model] / total if total > 0 else 0.0, n.has_demand)
            for n in needs}
