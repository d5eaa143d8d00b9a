"""An audit's scores (head/audit/score.py) on positions shaped as vLLM's prompt_logprobs, and
the sequential test over them (head/audit/sprt.py)."""

from __future__ import annotations

import math
import random

import pytest

from garage_node.head.audit import score as sc
from garage_node.head.audit import sprt
from garage_node.head.audit.score import Answer, Position, Sampling

VOCAB = 50
K = 20


def softmax(logits: list[float]) -> list[float]:
    m = max(logits)
    e = [math.exp(x - m) for x in logits]
    s = sum(e)
    return [x / s for x in e]


def vllm_entry(probs: list[float], token: int, k: int = K) -> dict[str, dict]:
    """One position of vLLM's prompt_logprobs: the top-k and the token itself."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    rank = {t: r + 1 for r, t in enumerate(order)}
    out = {str(t): {"logprob": math.log(probs[t]), "rank": rank[t], "decoded_token": f"t{t}"} for t in order[:k]}
    out[str(token)] = {"logprob": math.log(probs[token]), "rank": rank[token], "decoded_token": f"t{token}"}
    return out


def model_probs(rng: random.Random, n: int, sharp: float = 3.0) -> list[list[float]]:
    return [softmax([rng.gauss(0, sharp) for _ in range(VOCAB)]) for _ in range(n)]


def temper(p: list[float], t: float) -> list[float]:
    return softmax([math.log(x) / t for x in p])


def audit(probs: list[list[float]], tokens: list[int], sampling: Sampling, answer: Answer | None = None) -> sc.Score:
    prompt = [1, 2, 3]
    ids = prompt + tokens
    flat = softmax([0.0] * VOCAB)
    pl = ([None] + [vllm_entry(flat, t) for t in prompt[1:]]
          + [vllm_entry(p, t) for p, t in zip(probs, tokens, strict=True)])
    pos = sc.positions(pl, ids, len(prompt), K)
    answer = answer or Answer(finish_reason="length", max_tokens=len(tokens), has_stop_strings=False,
                              tokens_reported=len(tokens))
    return sc.score(pos, sampling, answer, tokens_counted=len(tokens))


def test_positions_read_vllm_shape_with_the_token_inside_and_outside_the_top_k() -> None:
    probs = softmax([float(-i) for i in range(VOCAB)])
    pl = [None, vllm_entry(probs, 0), vllm_entry(probs, 30)]
    pos = sc.positions(pl, [7, 0, 30], 1, K)
    assert [p.rank for p in pos] == [1, 31]
    assert len(pos[1].top) == K and pos[1].top[0] == pytest.approx(math.log(probs[0]))
    assert pos[1].logprob == pytest.approx(math.log(probs[30]))


@pytest.mark.parametrize("bad", [
    ([None, {}], "no logprobs"),
    ([None, {"5": {"rank": 1}}], "not vLLM's shape"),
    ([None], "scored 1 positions for 2"),
])
def test_positions_refuse_another_shape(bad: tuple) -> None:
    pl, words = bad
    with pytest.raises(sc.ScoreError, match=words):
        sc.positions(pl, [1, 5], 1, K)


def test_greedy_counts_tokens_well_below_the_top() -> None:
    rng = random.Random(1)
    probs = model_probs(rng, 40)
    honest = [max(range(VOCAB), key=p.__getitem__) for p in probs]
    s = audit(probs, honest, Sampling(temperature=0))
    assert s.greedy and s.n == 40 and s.bad == 0 and s.mean_gap == pytest.approx(0.0)
    other = model_probs(random.Random(2), 40)  # another model's greedy picks
    cheat = [max(range(VOCAB), key=p.__getitem__) for p in other]
    c = audit(probs, cheat, Sampling(temperature=0))
    assert c.bad >= 30


def sample(rng: random.Random, p: list[float]) -> int:
    return rng.choices(range(len(p)), weights=p)[0]


@pytest.mark.parametrize("sampling", [Sampling(1.0), Sampling(0.7), Sampling(1.0, top_p=0.9), Sampling(0.8, top_k=10)])
def test_sampled_z_of_honest_answers_is_standard_normal(sampling: Sampling) -> None:
    """An honest PC samples from the same distribution the verifier sees: z ~ N(0, 1)."""
    rng = random.Random(3)
    zs = []
    for _ in range(300):
        probs = model_probs(rng, 30, sharp=2.0)
        tokens = []
        for p in probs:
            q, _ = sc.distribution(Position(0, 0.0, 1, tuple(sorted((math.log(x) for x in p), reverse=True))), sampling)
            # Sample as vLLM would: tempered and truncated over the whole vocabulary.
            order = sorted(range(VOCAB), key=lambda i: -p[i])
            tp = temper(p, sampling.temperature)
            allowed = order[:sampling.top_k] if sampling.top_k > 0 else order
            if sampling.top_p < 1:
                kept, cum = [], 0.0
                for t in allowed:
                    if kept and cum >= sampling.top_p:
                        break
                    kept.append(t)
                    cum += tp[t]
                allowed = kept
            tokens.append(rng.choices(allowed, weights=[tp[t] for t in allowed])[0])
        zs.append(audit(probs, tokens, sampling).z)
    mean = sum(zs) / len(zs)
    sd = math.sqrt(sum((z - mean) ** 2 for z in zs) / len(zs))
    assert abs(mean) < 0.25 and 0.7 < sd < 1.5, (mean, sd)


def test_sampled_z_of_another_model_is_far_from_zero() -> None:
    rng = random.Random(4)
    zs = []
    for _ in range(30):
        probs = model_probs(rng, 60, sharp=2.0)
        other = model_probs(rng, 60, sharp=2.0)
        zs.append(audit(probs, [sample(rng, q) for q in other], Sampling(1.0)).z)
    assert sum(abs(z) > 4 for z in zs) >= 27


def test_distribution_applies_top_k_and_top_p_and_places_the_token() -> None:
    top = tuple(math.log(x) for x in (0.5, 0.3, 0.1, 0.05))  # rest 0.05
    q, hit = sc.distribution(Position(9, math.log(0.3), 2, top), Sampling(1.0))
    assert q == pytest.approx([0.5, 0.3, 0.1, 0.05, 0.05]) and hit == 1
    q, hit = sc.distribution(Position(9, math.log(0.01), 9, top), Sampling(1.0))
    assert hit == 4  # the rest bucket
    q, hit = sc.distribution(Position(9, math.log(0.1), 3, top), Sampling(1.0, top_k=2))
    assert q == pytest.approx([0.5 / 0.8, 0.3 / 0.8]) and hit is None
    q, hit = sc.distribution(Position(9, math.log(0.3), 2, top), Sampling(1.0, top_p=0.75))
    assert q == pytest.approx([0.5 / 0.8, 0.3 / 0.8]) and hit == 1
    q, _ = sc.distribution(Position(9, math.log(0.3), 2, top), Sampling(0.5))
    assert q[0] / q[1] == pytest.approx((0.5 / 0.3) ** 2)


def test_end_and_usage_checks() -> None:
    rng = random.Random(5)
    probs = model_probs(rng, 10)
    greedy = [max(range(VOCAB), key=p.__getitem__) for p in probs]
    natural = Answer("stop", 100, has_stop_strings=False, tokens_reported=10)

    greedy_sampling = Sampling(0)

    def judged(end: sc.End, sampling: Sampling = greedy_sampling, answer: Answer = natural) -> sc.Score:
        pl = [None] + [vllm_entry(p, t) for p, t in zip(probs, greedy, strict=True)]
        return sc.score(sc.positions(pl, [1] + greedy, 1, K), sampling, answer, 10, end)

    stopped = sc.End(stopped=True, top=-0.1, kth=-9.0, eos=-0.1, eos_known=True)
    s = judged(stopped)
    assert s.eos_checked and not s.early_stop
    cut = sc.End(stopped=False, top=-0.05, kth=-9.0, eos=-6.0, eos_known=True)  # EOS 6 nats below the top
    assert judged(cut).early_stop
    assert not judged(sc.End(False, -0.6, -9.0, -1.0, True)).early_stop  # a near tie: honest
    assert judged(sc.End(False, -0.05, -9.0, None, False)).early_stop  # greedy, EOS id not learned yet
    # Sampled: a natural end on an EOS under 1e-5 is implausible; unknown without EOS's id.
    assert judged(sc.End(False, -0.05, -20.0, -15.0, True), Sampling(1.0)).early_stop
    assert not judged(sc.End(False, -0.05, -20.0, -3.0, True), Sampling(1.0)).early_stop
    assert not judged(sc.End(False, -0.05, -20.0, None, False), Sampling(1.0)).eos_checked
    assert not judged(cut, answer=Answer("stop", 100, True, 10)).eos_checked  # stop strings: unknown
    assert not judged(cut, answer=Answer("length", 10, False, 10)).early_stop
    assert judged(stopped, answer=Answer("length", 100, False, 10)).early_stop  # "length" after 10 of 100 tokens
    assert not judged(stopped, answer=Answer("length", 11, False, 10)).early_stop
    assert judged(stopped, answer=Answer("length", 10, False, 30)).usage_inflated
    assert not judged(stopped, answer=Answer("length", 10, False, 12)).usage_inflated
    # A stop string's tokens are counted by the engine but cut from the text.
    assert not judged(stopped, answer=Answer("stop", 100, True, 22)).usage_inflated
    assert judged(stopped, answer=Answer("stop", 100, True, 40)).usage_inflated
    assert judged(stopped, answer=Answer("length", 10, False, None)).tokens_reported == -1


def test_sampling_of_a_request_body() -> None:
    assert Sampling.of({}) == Sampling(1.0, 1.0, -1)
    assert Sampling.of({"temperature": 0, "top_p": 0.9, "top_k": 40}) == Sampling(0.0, 0.9, 40)
    assert Sampling.of({"temperature": "hot", "top_p": True}) == Sampling(1.0, 1.0, -1)
    assert Sampling.of({"temperature": 0}).greedy


# -- the sequential test


def greedy_score(n: int, bad: int, **kw) -> sc.Score:
    base = dict(greedy=True, n=n, bad=bad, z=0.0, mean_gap=0.0, eos_checked=False, early_stop=False,
                tokens_counted=n, tokens_reported=n, usage_inflated=False)
    return sc.Score(**{**base, **kw})


T = sprt.Thresholds.of(1e-4)


def test_thresholds() -> None:
    assert T.upper == pytest.approx(math.log(4e4)) and T.cap == 0.6 * T.upper and T.floor == -0.2 * T.upper
    with pytest.raises(ValueError, match="between 0 and 0.5"):
        sprt.Thresholds.of(0.0)


def test_one_answer_never_decides_a_few_do() -> None:
    """A greedy audit is one trial, whatever its number of bad tokens: even an answer that is
    wrong everywhere adds ln(eps1/eps0), and a few such answers decide."""
    h = sprt.Hypotheses.of(0.01)
    step = sprt.weigh(sprt.Record(), greedy_score(200, 200), h, T)
    assert step.quarantine is None and step.llr["tokens"] == pytest.approx(math.log(h.eps1 / h.eps0))
    assert step.llr["tokens"] < T.cap
    assert sprt.weigh(sprt.Record(), greedy_score(200, 1), h, T).llr["tokens"] == step.llr["tokens"]
    audits = 1
    while step.quarantine is None:
        step = sprt.weigh(step.record, greedy_score(200, 200), h, T)
        audits += 1
    assert step.quarantine == "tokens" and audits == 4 and step.record.audits == 4
    assert "not what the model gives" in sprt.why("tokens", step.record)


def test_the_floor_bounds_an_honest_record_credit() -> None:
    h = sprt.Hypotheses.of(0.01)
    rec = sprt.Record()
    for _ in range(1000):
        rec = sprt.weigh(rec, greedy_score(100, 0), h, T).record
    assert rec.sums["tokens"] == T.floor
    audits = 0
    while True:  # turns to cheating: caught by as many bad answers as a new PC, and one more
        audits += 1
        step = sprt.weigh(rec, greedy_score(100, 60), h, T)
        rec = step.record
        if step.quarantine:
            break
    assert audits == 4


def honest_greedy(rng: random.Random, eps: float, n: int) -> sc.Score:
    """A greedy answer of n tokens that has a bad token with probability eps (then a few)."""
    return greedy_score(n, rng.randint(1, 3) if rng.random() < eps else 0)


def test_honest_pcs_at_their_calibrated_rate_are_not_quarantined() -> None:
    """500 honest PCs x 200 audits each at exactly the calibrated rate, greedy and sampled
    mixed, with honest end and usage flags at their rates: none crosses."""
    rng = random.Random(6)
    h = sprt.Hypotheses.of(0.01)
    crossed = 0
    for _ in range(500):
        rec = sprt.Record()
        for _ in range(200):
            if rng.random() < 0.5:
                s = honest_greedy(rng, 0.01, rng.randint(5, 300))
            else:
                n = rng.randint(5, 300)
                s = greedy_score(n, 0, greedy=False, z=rng.gauss(0, 1))
            # Each flag at its honest rate (STOP0, USAGE0): Wald's bound holds only where the
            # honest rate is at most H0's (an engine stopping early more often needs its own STOP0).
            s = sc.Score(**{**s.__dict__, "eos_checked": True, "early_stop": rng.random() < sprt.STOP0,
                            "usage_inflated": rng.random() < 0.01})
            step = sprt.weigh(rec, s, h, T)
            rec = step.record
            if step.quarantine:
                crossed += 1
                break
    assert crossed == 0


def test_cheaters_are_caught_quickly() -> None:
    rng = random.Random(7)
    h = sprt.Hypotheses.of(0.01)
    for make in (lambda: honest_greedy(rng, 0.4, 50),  # another model, greedy
                 lambda: greedy_score(50, 0, greedy=False, z=rng.gauss(3.0, 1)),  # another model, sampled
                 lambda: greedy_score(50, 0, eos_checked=True, early_stop=rng.random() < 0.9),  # cut short
                 lambda: greedy_score(50, 0, usage_inflated=True)):  # inflated usage
        rec, audits = sprt.Record(), 0
        while audits < 20:
            audits += 1
            step = sprt.weigh(rec, make(), h, T)
            rec = step.record
            if step.quarantine:
                break
        assert step.quarantine is not None and audits <= 12, (audits, rec)


def partial_cheater_audits(seed: int) -> list[dict[str, int]]:
    """Per PC (200), the audit at which each test first crossed (greedy audits of 100 tokens,
    honest at the calibrated rate, one in ten from another model), within 400 audits."""
    rng = random.Random(seed)
    h = sprt.Hypotheses.of(0.01)
    out = []
    for _ in range(200):
        sums = dict.fromkeys(sprt.TESTS, 0.0)
        first: dict[str, int] = {}
        for audit in range(1, 401):
            llr = sprt.audit_llr(honest_greedy(rng, 0.4 if rng.random() < 0.1 else 0.01, 100), h, T.cap)
            for k in sums:
                sums[k] = max(T.floor, sums[k] + llr[k])
                if sums[k] >= T.upper:
                    first.setdefault(k, audit)
        out.append(first)
    return out


def test_a_pc_cheating_on_a_tenth_of_its_answers_is_caught_by_partial() -> None:
    """"partial" catches most such PCs within 400 audits (20,000 requests at 2 %; 169 of 200
    here, 92 % in A2's replay of measured audits), where "tokens" sees mostly honest answers."""
    runs = partial_cheater_audits(8)
    partial = sum("partial" in r for r in runs)
    assert partial >= 0.8 * len(runs) and partial > sum("tokens" in r for r in runs), partial


def test_hypotheses_from_a_calibrated_rate() -> None:
    assert sprt.Hypotheses.of(None).eps0 == sprt.EPS0_DEFAULT
    assert sprt.Hypotheses.of(0.0).eps0 == sprt.EPS0_MIN  # never 0: one bad token would decide
    assert sprt.Hypotheses.of(0.1).eps1 == pytest.approx(0.5)
    assert sprt.Hypotheses.of(0.01).eps1 == sprt.EPS1_MIN


def test_suspect_and_worst() -> None:
    rec = sprt.Record(audits=3, sums={"tokens": -1.0, "partial": 0.1, "stops": 0.5, "usage": 0.0})
    assert rec.suspect and rec.worst == ("stops", 0.5)
    assert not sprt.Record().suspect
