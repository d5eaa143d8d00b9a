"""What one audit finds: the verifier's view of the PC's own tokens (teacher-forced), reduced
to a few numbers the sequential test weighs (sprt.py). Pure: no I/O.

A verifier ran one prefill over prompt + the PC's completion with `prompt_logprobs` = K and
returned, for every completion position, the logprob and rank of the PC's token and the top-K
logprobs. From that:
- greedy requests (temperature 0): a PC that ran the model picked the top-1 at every position,
  up to numerical noise (batch size, kernels, GPU type: hundredths of a nat). A token more than
  `delta` nats below the verifier's top-1 is "bad"; honest PCs have a small calibrated rate of
  them (ties broken the other way), a PC serving other weights a large one;
- sampled requests: the PC's token's log-probability under the request's sampling distribution
  (temperature, top_k, top_p applied to the verifier's top-K), minus its expectation, summed and
  divided by the summed standard deviation: z is about N(0, 1) for an honest PC; another model
  moves it either way (two-sided);
- the end: an answer that says it stopped naturally ("stop", no stop strings) must end where
  the model puts EOS plausibly (`End`: the verifier's own next-token view after the completion);
  "length" must mean max_tokens tokens; the usage the PC reported must match the completion's
  token count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

DELTA_NATS = 1.0  # greedy: a token this far below the verifier's top-1 is bad
# Sampled: a token outside the request's sampling support (or past the verifier's top-K and
# the rest's mass) counts as this probability, so one such token weighs but cannot be -inf.
FLOOR_PROB = 1e-4
# The end of a sampled answer is implausible when the verifier gives EOS less than this: an
# honest PC that samples over n positions ends on so unlikely an EOS with probability < n * this.
EOS_FLOOR_PROB = 1e-5
# Usage: the reported completion tokens may exceed the re-tokenized count by this share plus
# USAGE_SLACK_TOKENS (a text tokenized again need not split as it was generated).
USAGE_SLACK_SHARE = 0.10
USAGE_SLACK_TOKENS = 2
# A stop string's tokens were generated (and counted) but are not in the text.
STOP_SLACK_TOKENS = 16
# "length" with this many tokens fewer than max_tokens (share, at least 2) is an early stop.
LENGTH_SLACK_SHARE = 0.10


class ScoreError(ValueError):
    """The verifier's answer cannot be scored (its shape is not vLLM's)."""


@dataclass(frozen=True)
class Position:
    """The verifier's view of one completion position."""

    token: int  # the PC's token id here
    logprob: float  # the verifier's logprob of it
    rank: int  # its rank in the verifier's distribution (1: the top)
    top: tuple[float, ...]  # the verifier's top-K logprobs, best first (K >= 1)


@dataclass(frozen=True)
class Sampling:
    """The request's sampling parameters that matter for scoring."""

    temperature: float = 1.0  # vLLM's default when the request names none
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no limit

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @classmethod
    def of(cls, body: dict[str, Any]) -> Sampling:
        """From an OpenAI request body (missing or odd values: vLLM's defaults)."""
        def num(name: str, default: float) -> float:
            v = body.get(name)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default
        return cls(temperature=max(0.0, num("temperature", 1.0)), top_p=min(1.0, max(0.0, num("top_p", 1.0))),
                   top_k=int(num("top_k", -1)))


@dataclass(frozen=True)
class Score:
    """One audit's findings (what sprt.audit_llr weighs and the audits table keeps)."""

    greedy: bool
    n: int  # completion positions scored (the appended EOS included)
    bad: int  # greedy: positions more than delta below the verifier's top-1
    z: float  # sampled: the standardized log-likelihood sum (0.0 for greedy)
    mean_gap: float  # the mean of (top-1 - the PC token's logprob), nats: for people
    eos_checked: bool  # the answer said "stop" without stop strings: its end was scored
    early_stop: bool  # an implausible natural end, or "length" short of max_tokens
    tokens_counted: int  # the completion re-tokenized by the verifier
    tokens_reported: int  # what the PC's usage said (-1: none)
    usage_inflated: bool


@dataclass(frozen=True)
class Answer:
    """What the audit checks besides the tokens: how the answer said it ended."""

    finish_reason: str | None
    max_tokens: int | None
    has_stop_strings: bool
    tokens_reported: int | None  # the PC's usage.completion_tokens

    @property
    def natural_stop(self) -> bool:
        """It says the model ended it (EOS): where it ended is checked (an early stop)."""
        return self.finish_reason == "stop" and not self.has_stop_strings


@dataclass(frozen=True)
class End:
    """The verifier's view of the position right after the completion, where a natural stop
    put EOS (from its one generated token, asked with logprobs)."""

    stopped: bool  # the verifier's own greedy choice there ends the answer (EOS or a stop token)
    top: float  # its top-1 logprob there
    kth: float  # its K-th logprob there (an EOS not in the top-K is below it)
    eos: float | None  # EOS's logprob there, if among the top-K; None: not there, or EOS's id unknown
    eos_known: bool  # the verifier's EOS ids are known (learned from its own stops)


def ended_early(end: End, sampling: Sampling, delta: float = DELTA_NATS) -> bool | None:
    """Whether a natural stop there is implausible; None: cannot tell."""
    if end.stopped:
        return False
    if sampling.greedy:
        if end.eos is not None:
            return end.top - end.eos > delta
        return True if not end.eos_known or end.top - end.kth > delta else None
    if not end.eos_known:
        return None
    floor = math.log(EOS_FLOOR_PROB)
    if end.eos is not None:
        return end.eos < floor
    return True if end.kth < floor else None


def positions(prompt_logprobs: Sequence[Any], ids: Sequence[int], start: int, k: int) -> list[Position]:
    """The verifier's positions `start`.. of `ids` from vLLM's `prompt_logprobs` asked with K = `k`
    (a list as long as `ids`, None first, then {str(token_id): {"logprob", "rank",
    "decoded_token"}} holding the top-K and, when it ranks below them, the prompt's own token).
    Raises ScoreError on another shape."""
    if len(prompt_logprobs) != len(ids):
        raise ScoreError(f"the verifier scored {len(prompt_logprobs)} positions for {len(ids)} tokens")
    out = []
    for i in range(start, len(ids)):
        entry = prompt_logprobs[i]
        if not isinstance(entry, dict) or not entry:
            raise ScoreError(f"position {i} has no logprobs in the verifier's answer")
        try:
            ranked = [(int(v["rank"]), float(v["logprob"])) for v in entry.values()]
            own = entry[str(ids[i])]
            lp, rank = float(own["logprob"]), int(own["rank"])
        except (KeyError, TypeError, ValueError) as e:
            raise ScoreError(f"position {i} of the verifier's answer is not vLLM's shape (missing {e})") from None
        top = tuple(sorted((v for r, v in ranked if r <= k), reverse=True)) or (lp,)
        out.append(Position(token=ids[i], logprob=lp, rank=rank, top=top))
    return out


def score(pos: Sequence[Position], sampling: Sampling, answer: Answer, tokens_counted: int,
          end: End | None = None, delta: float = DELTA_NATS) -> Score:
    """The audit's findings. `pos`: the completion's positions; `end`: the verifier's view after
    it (needed to check a natural stop)."""
    gaps = [p.top[0] - p.logprob for p in pos]
    n = len(pos)
    bad = sum(1 for g in gaps if g > delta) if sampling.greedy else 0
    z = 0.0 if sampling.greedy else sampled_z(pos, sampling)
    judged = ended_early(end, sampling, delta) if answer.natural_stop and end is not None else None
    early = bool(judged)
    if answer.finish_reason == "length" and answer.max_tokens:
        early = early or tokens_counted < answer.max_tokens - max(2, int(LENGTH_SLACK_SHARE * answer.max_tokens))
    reported = answer.tokens_reported if answer.tokens_reported is not None else -1
    slack = USAGE_SLACK_TOKENS + (STOP_SLACK_TOKENS if answer.has_stop_strings else 0)
    inflated = reported > tokens_counted * (1 + USAGE_SLACK_SHARE) + slack
    return Score(greedy=sampling.greedy, n=n, bad=bad, z=z, mean_gap=(sum(gaps) / n if n else 0.0),
                 eos_checked=judged is not None, early_stop=early, tokens_counted=tokens_counted,
                 tokens_reported=reported, usage_inflated=inflated)


def sampled_z(pos: Sequence[Position], sampling: Sampling) -> float:
    """sum(log q(PC token) - E[log q]) / sqrt(sum Var[log q]) over the positions, q being the
    request's sampling distribution built from the verifier's top-K (see `distribution`)."""
    dev = var = 0.0
    for p in pos:
        q, hit = distribution(p, sampling)
        mean = sum(x * math.log(x) for x in q)
        second = sum(x * math.log(x) ** 2 for x in q)
        s = math.log(max(q[hit], FLOOR_PROB)) if hit is not None else math.log(FLOOR_PROB)
        dev += s - mean
        var += max(0.0, second - mean * mean)
    if var <= 1e-12:
        return 0.0 if abs(dev) < 1e-9 else math.copysign(50.0, dev)  # certain positions only
    return dev / math.sqrt(var)


def distribution(p: Position, sampling: Sampling) -> tuple[list[float], int | None]:
    """(the sampling distribution over the verifier's top-K plus one bucket for the rest of the
    vocabulary, normalised and truncated as vLLM samples: temperature, then top_k, then top_p;
    the index of the PC's token in it, None when outside its support).

    The rest's tempered mass is taken as (rest)^(1/T), as if it were one token: exact at T = 1,
    small for the usual T < 1, and the same for an honest PC and a cheater."""
    t = max(sampling.temperature, 1e-5)
    best = p.top[0]
    rest = max(0.0, 1.0 - sum(math.exp(lp) for lp in p.top))
    n_top = min(len(p.top), sampling.top_k) if sampling.top_k > 0 else len(p.top)
    weights = [math.exp((lp - best) / t) for lp in p.top[:n_top]]  # scaled by exp(-best/T): ratios kept
    # The rest is in the support unless top_k stops within the top-K.
    with_rest = (sampling.top_k <= 0 or sampling.top_k > len(p.top)) and rest > 1e-12
    if with_rest:
        weights.append(math.exp((math.log(rest) - best) / t))
    total = sum(weights)
    q = [w / total for w in weights]
    if sampling.top_p < 1.0:
        cut, cum = 0, 0.0
        while cut < len(q) and (cut == 0 or cum < sampling.top_p):
            cum += q[cut]
            cut += 1
        if cut < len(q):
            with_rest = with_rest and cut > n_top
            n_top = min(n_top, cut)
            q = [x / cum for x in q[:cut]]
    if p.rank <= len(p.top):
        hit = p.rank - 1 if p.rank - 1 < n_top else None
    else:
        hit = len(q) - 1 if with_rest else None
    return q, hit
