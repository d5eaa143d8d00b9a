"""The decision per PC: Wald's sequential probability ratio test over its audits. Pure.

Three tests run side by side on each PC, each over its own evidence, each weighing honest
(H0) against cheating (H1):
- "tokens": the PC's tokens under the verifier. Greedy audits: k bad of n positions,
  binomial with rate eps0 (honest, calibrated per model and precision on honest runs) against
  eps1 = max(EPS1_MIN, EPS1_FACTOR * eps0). Sampled audits: z ~ N(0, 1) against z ~ N(±mu, 1),
  mu = effect * sqrt(n) (another model shifts each token's log-likelihood either way);
- "stops": an implausible natural end, or "length" short of max_tokens (answers cut early);
- "usage": completion tokens reported above the count (tokens billed that were not made).

Each audit adds its log-likelihood ratio (LLR) to the PC's sum per test. Two guards:
- an audit's LLR is capped at `cap` (half the threshold), so one answer never decides: at
  least two audits are needed, and a single odd answer (a prompt the model is unsure of, a
  numerical tie) cannot quarantine a PC. Capping from above keeps Wald's bound: E_H0[exp(min(L,
  c))] <= 1, so an honest PC's sum reaches the threshold with probability <= e^-threshold;
- the sum is floored at `floor` (minus half the threshold): a long honest record cannot bank
  unlimited credit, so a PC that turns to cheating late is caught as fast as a new one (after
  at most 1.5 thresholds of evidence). Each climb from the floor to the threshold is an honest
  PC's false alarm with probability <= e^-1.5 threshold.

The threshold is ln(tests / false_quarantine) ([audit] false_quarantine, split over the three
tests: Bonferroni)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from garage_node.head.audit.score import Score

TESTS = ("tokens", "stops", "usage")
EPS0_MIN = 0.002  # honest bad-token rate floor: a rate of 0 would make one bad token decide
EPS0_DEFAULT = 0.02  # for a model nobody calibrated yet (conservative: few honest alarms)
EPS1_MIN = 0.25
EPS1_FACTOR = 5.0
# Sampled audits: the standardized per-token shift a substitute model makes, and honest z's
# spread (above 1 where the verifier's view of honest tokens is noisier than the model says).
EFFECT = 0.3
Z_SPREAD = 1.5
MU_MAX = 8.0
# Flags (one per audit): how often an honest answer raises one, and a cheater's answer.
STOP0, STOP1 = 0.02, 0.5
USAGE0, USAGE1 = 0.01, 0.5


@dataclass(frozen=True)
class Thresholds:
    upper: float  # a sum at or above this quarantines
    cap: float  # an audit adds at most this
    floor: float  # a sum never goes below this

    @classmethod
    def of(cls, false_quarantine: float) -> Thresholds:
        if not 0.0 < false_quarantine < 0.5:
            raise ValueError(f"false_quarantine must be a probability between 0 and 0.5, not {false_quarantine}")
        upper = math.log(len(TESTS) / false_quarantine)
        return cls(upper=upper, cap=upper / 2, floor=-upper / 2)


@dataclass(frozen=True)
class Hypotheses:
    """Honest against cheating, for one model and precision."""

    eps0: float = EPS0_DEFAULT
    eps1: float = EPS1_MIN
    effect: float = EFFECT
    z_spread: float = Z_SPREAD
    stop0: float = STOP0
    stop1: float = STOP1
    usage0: float = USAGE0
    usage1: float = USAGE1

    @classmethod
    def of(cls, eps0: float | None, **kw: float) -> Hypotheses:
        """From a calibrated honest rate (None: not calibrated, EPS0_DEFAULT)."""
        e0 = max(EPS0_MIN, EPS0_DEFAULT if eps0 is None else eps0)
        e0 = min(e0, 0.5)
        return cls(eps0=e0, eps1=min(0.95, max(EPS1_MIN, EPS1_FACTOR * e0)), **kw)


@dataclass(frozen=True)
class Record:
    """A PC's standing: audits weighed, and the sum of each test."""

    audits: int = 0
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TESTS, 0.0))

    @property
    def worst(self) -> tuple[str, float]:
        """The test nearest its threshold, and its sum."""
        name = max(TESTS, key=lambda t: self.sums.get(t, 0.0))
        return name, self.sums.get(name, 0.0)

    @property
    def suspect(self) -> bool:
        """Its record leans towards cheating: audited more often ([audit] suspect_rate)."""
        return any(v > 0.0 for v in self.sums.values())


def audit_llr(s: Score, h: Hypotheses, cap: float) -> dict[str, float]:
    """Each test's LLR for one audit (ln P(audit | cheating) / P(audit | honest)), capped at `cap`."""
    llr = {"tokens": _tokens(s, h), "stops": 0.0, "usage": 0.0}
    if s.eos_checked or s.early_stop:
        llr["stops"] = _flag(s.early_stop, h.stop0, h.stop1)
    if s.tokens_reported >= 0:
        llr["usage"] = _flag(s.usage_inflated, h.usage0, h.usage1)
    return {k: min(cap, v) for k, v in llr.items()}


def _tokens(s: Score, h: Hypotheses) -> float:
    if s.n == 0:
        return 0.0
    if s.greedy:
        return s.bad * math.log(h.eps1 / h.eps0) + (s.n - s.bad) * math.log((1 - h.eps1) / (1 - h.eps0))
    # ln( (N(z-mu) + N(z+mu)) / 2 / N(z) ) = -mu^2/2 + ln cosh(mu z), on z scaled by its honest spread.
    mu = min(MU_MAX, h.effect * math.sqrt(s.n))
    x = abs(mu * s.z / h.z_spread)
    log_cosh = x + math.log1p(math.exp(-2 * x)) - math.log(2)
    return -mu * mu / 2 + log_cosh


def _flag(raised: bool, p0: float, p1: float) -> float:
    return math.log(p1 / p0) if raised else math.log((1 - p1) / (1 - p0))


@dataclass(frozen=True)
class Step:
    record: Record
    llr: dict[str, float]
    quarantine: str | None  # the test that crossed its threshold, None: none


def weigh(record: Record, s: Score, h: Hypotheses, t: Thresholds) -> Step:
    """The PC's record after one more audit, and whether it is to be quarantined."""
    llr = audit_llr(s, h, t.cap)
    sums = {k: max(t.floor, record.sums.get(k, 0.0) + llr[k]) for k in TESTS}
    crossed = next((k for k in TESTS if sums[k] >= t.upper), None)
    return Step(replace(record, audits=record.audits + 1, sums=sums), llr, crossed)


def why(test: str, record: Record) -> str:
    """The words a quarantine gives (owner and operator read them)."""
    words = {"tokens": "its answers' tokens are not what the model gives (another model, other weights, or made-up "
                       "text)",
             "stops": "its answers end early (cut short, or 'length' before max_tokens)",
             "usage": "it reports more tokens than its answers hold"}
    return f"audits: {words[test]}; {record.audits} audits, evidence {record.sums[test]:.1f}"
