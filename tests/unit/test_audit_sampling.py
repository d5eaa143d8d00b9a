"""Which requests are audited (head/audit/sampling.py): the rates per PC, eligibility, the
canaries' budget."""

from __future__ import annotations

import random

from garage_node.head.audit.sampling import CanaryBudget, Rates, Sampler, eligible


class Draws:
    """random() returning a fixed value, counting its calls."""

    def __init__(self, value: float) -> None:
        self.value, self.calls = value, 0

    def __call__(self) -> float:
        self.calls += 1
        return self.value


def test_new_established_and_suspect_pcs_are_drawn_at_their_rates() -> None:
    draws = Draws(0.05)  # under new_rate (0.10 here), over rate (0.02)
    s = Sampler(Rates(rate=0.02, new_rate=0.10, new_requests=3, suspect_rate=0.25), draws)
    assert [s.take("n1") for _ in range(5)] == [True, True, True, False, False]
    assert draws.calls == 5  # one draw a request
    s.suspects = frozenset({"n1"})
    assert s.take("n1")
    s.seed({"n2": 10})  # known from the audits table: established at once
    assert not s.take("n2") and s.seen["n2"] == 11


def test_the_rate_holds_over_many_requests() -> None:
    s = Sampler(Rates(rate=0.02, new_requests=0), random.Random(1).random)
    taken = sum(s.take("n1") for _ in range(50_000))
    assert 850 < taken < 1150


def test_eligible() -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert eligible("/v1/chat/completions", chat)
    assert eligible("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]})
    assert eligible("/v1/completions", {"model": "m", "prompt": "once"})
    assert eligible("/v1/completions", {"model": "m", "prompt": "once", "repetition_penalty": 1.0, "temperature": 0.7})
    for path, body in [("/v1/embeddings", {"model": "m", "input": "x"}),
                       ("/v1/chat/completions", {**chat, "n": 2}),
                       ("/v1/chat/completions", {**chat, "tools": [{"type": "function"}]}),
                       ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                       ("/v1/chat/completions", {**chat, "messages": []}),
                       ("/v1/completions", {"model": "m", "prompt": [1, 2, 3]}),
                       ("/v1/completions", {"model": "m", "prompt": "x", "echo": True}),
                       ("/v1/completions", {"model": "m", "prompt": "x", "best_of": 3}),
                       ("/v1/completions", {"model": "m", "prompt": "x", "presence_penalty": 0.5}),
                       ("/v1/completions", {"model": "m", "prompt": "x", "repetition_penalty": 1.2}),
                       ("/v1/completions", {"model": "m", "prompt": "x", "logit_bias": {"5": 10}})]:
        assert not eligible(path, body), body


def test_canaries_owed_per_model() -> None:
    b = CanaryBudget(0.25)
    for _ in range(9):
        b.requested("a")
    b.requested("b")
    assert b.due() == ["a", "a"]
    assert b.due() == []
    for _ in range(3):
        b.requested("b")
    assert b.due() == ["b"]
    off = CanaryBudget(0.0)
    off.requested("a")
    assert off.due() == []
