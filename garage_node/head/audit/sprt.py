"""The decision per PC: Wald's sequential probability ratio test over its audits. Pure.

Four tests run side by side on each PC, each over its own evidence, each weighing honest
(H0) against cheating (H1):
- "tokens": the PC's tokens under the verifier. A greedy audit is one Bernoulli trial: "bad"
  if any of its tokens is more than delta below the verifier's top choice, at rate eps0 for an
  honest PC (calibrated per model and precision on honest runs: the share of honest greedy
  audits with a bad token) against eps1 = max(EPS1_MIN, EPS1_FACTOR * eps0). Not k bad of n
  tokens as a binomial: an honest engine's rare near-ties come in clusters (a batch's numerics
  flip a few close calls in one answer), and weighed token by token they quarantined 17 of
  2,000 honest PCs within 10,000 requests in A2's replay of measured audits; weighed per answer,
  none of 1,000 (highest sum 5.4 of 10.6), at a small cost in speed. Sampled audits: z ~ N(0, 1)
  against z ~ N(±mu, 1), mu = effect * sqrt(n) (another model shifts each token's
  log-likelihood either way);
- "partial": the same evidence against "it cheats on a share of its answers" (below);
- "stops": an implausible natural end, or "length" short of max_tokens (answers cut early);
- "usage": completion tokens reported above the count (tokens billed that were not made).

"partial"'s H1 is "the PC cheats on a share `share` (a tenth) of its answers": an audit's LLR
is ln((1 - share) + share * LR), LR the "tokens" ratio of the answer. An honest answer then
costs a cheater little (about ln 0.9 = -0.1), so one that cheats on a tenth of its requests
climbs (about +4 every ten audits), where "tokens" sees its many honest answers and stays at
its floor; "tokens" in turn adds up moderate evidence from a PC that always cheats faster.
E_H0[ratio] is 1 for both: Wald's bound holds.

Each audit adds its log-likelihood ratio (LLR) to the PC's sum per test. Two guards:
- an audit's LLR is capped at `cap` (0.6 of the threshold), so one answer never decides
  (greedy audits add at most ln(eps1/eps0), 5.0 at the floor rate, so three or four bad
  answers are needed), and a single odd answer (a prompt the model is unsure of, a
  numerical tie) cannot quarantine a PC. Capping from above keeps Wald's bound: E_H0[exp(min(L,
  c))] <= 1, so an honest PC's sum reaches the threshold with probability <= e^-threshold;
- the sum is floored at `floor` (-0.2 of the threshold): a long honest record cannot bank
  unlimited credit, so a PC that turns to cheating late is caught as fast as a new one (two
  capped audits). Each climb from the floor to the threshold is an honest PC's false alarm
  with probability <= e^-1.2 threshold.

The threshold is ln(tests / false_quarantine) ([audit] false_quarantine, split over the four
tests: Bonferroni)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from garage_node.head.audit.score import Score

TESTS = ("tokens", "partial", "stops", "usage")
# An audit adds at most CAP thresholds (< 1: never one answer), a sum stays above -FLOOR
# thresholds: two capped audits decide from 0 (a new PC) and from the floor (an established PC
# that turns: 1.2 thresholds), and each climb from the floor is an honest false alarm with
# probability <= e^-1.2 threshold.
CAP = 0.6
FLOOR = 0.2
# Measured (A2, vLLM CPU image, trained tiny Llama, concurrency 1-32): greedy audits with a
# token more than 1 nat below the verifier's top-1: honest 0.3-0.4 %, another model's 45.5 %,
# 4-bit weights' 3.9 %. H1 at 5x the honest rate and at least 30 %.
EPS0_MIN = 0.002  # honest bad-audit rate floor: a rate of 0 would make one bad answer decide
EPS0_DEFAULT = 0.02  # for a model nobody calibrated yet (5x the share measured on one CPU type)
EPS1_MIN = 0.3
EPS1_FACTOR = 5.0
# Sampled audits: the standardized per-token shift a substitute model makes, and honest z's
# spread (above 1 where the verifier's view of honest tokens is noisier than the model says).
EFFECT = 0.3
# Honest z's sd measured 0.75-1.84 by concurrency (tails from re-tokenized text). Replaying
# A2's measured audits (1,500 simulated PCs): at 1.5 an honest PC's highest sum was 4.1 and
# 99.3 % of PCs serving other weights were caught within 250 requests; at 2.0, 1.9 and 98.4 %;
# at 1.75, 2.8 and 99.2 %.
Z_SPREAD = 1.75
Z_MAX = 6.0  # a sampled audit's |z| counts at most this (one re-tokenized answer cannot run away)
MU_MAX = 8.0
# Flags (one per audit): how often an honest answer raises one, and a cheater's answer.
# Measured: no honest early stop in 600 answers (under 0.5 % at 95 %); a PC that cuts answers
# at half max_tokens and says "stop" is flagged in 18.7 % of its audits (most answers end
# before the cut). Replayed (1,000 PCs), such a new PC is quarantined within 250 requests 90.5 %
# of the time at STOP0 0.01, 94 % at 0.005; but at 0.005, honest PCs whose true rate is 2 %
# (GPUs are not measured) were quarantined (6 of 500 over 200 audits), at 0.01 none.
STOP0, STOP1 = 0.01, 0.15
USAGE0, USAGE1 = 0.01, 0.5
SHARE = 0.1  # H1: the share of its answers a cheater cheats on, at least


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
        return cls(upper=upper, cap=CAP * upper, floor=-FLOOR * upper)


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
    share: float = SHARE

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
    tokens = _tokens(s, h)
    llr = {"tokens": tokens, "partial": _mixed(tokens, h.share), "stops": 0.0, "usage": 0.0}
    if s.eos_checked or s.early_stop:
        llr["stops"] = _flag(s.early_stop, h.stop0, h.stop1)
    if s.tokens_reported >= 0:
        llr["usage"] = _flag(s.usage_inflated, h.usage0, h.usage1)
    return {k: min(cap, v) for k, v in llr.items()}


def _mixed(llr: float, share: float) -> float:
    """ln((1 - share) + share * e^llr), without overflow."""
    if share >= 1.0:
        return llr
    if llr > 0:
        return llr + math.log(share + (1 - share) * math.exp(-llr))
    return math.log((1 - share) + share * math.exp(llr))


def _tokens(s: Score, h: Hypotheses) -> float:
    if s.n == 0:
        return 0.0
    if s.greedy:  # one trial per answer (see the module's docstring)
        return math.log(h.eps1 / h.eps0) if s.bad > 0 else math.log((1 - h.eps1) / (1 - h.eps0))
    # ln( (N(z-mu) + N(z+mu)) / 2 / N(z) ) = -mu^2/2 + ln cosh(mu z), on z scaled by its honest spread.
    mu = min(MU_MAX, h.effect * math.sqrt(s.n))
    x = abs(mu * max(-Z_MAX, min(Z_MAX, s.z)) / h.z_spread)
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
    crossed = next((k for k in TESTS if sums[k] >= t.upper - 1e-9), None)  # two capped audits from the floor: equal
    return Step(replace(record, audits=record.audits + 1, sums=sums), llr, crossed)


def why(test: str, record: Record) -> str:
    """The words a quarantine gives (owner and operator read them)."""
    words = {"tokens": "its answers' tokens are not what the model gives (another model, other weights, or made-up "
                       "text)",
             "partial": "some of its answers' tokens are not what the model gives (it cheats on a share of "
                        "its requests)",
             "stops": "its answers end early (cut short, or 'length' before max_tokens)",
             "usage": "it reports more tokens than its answers hold"}
    return f"audits: {words[test]}; {record.audits} audits, evidence {record.sums[test]:.1f}"
