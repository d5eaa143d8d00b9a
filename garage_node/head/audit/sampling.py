"""Which completed requests are audited, decided on the request path after the PC is chosen.

Cheap by design (issue #22 measured every microsecond there): one dict update and one
`random()` per request; eligibility and capture are looked at only for the few drawn. Nothing
here changes what is sent to the PC: the decision is the gateway's alone.

Also the canaries' budget: [audit] canary_rate of each model's customer requests, owed as
requests come and paid by the audit loop."""

from __future__ import annotations

import random as _random
from dataclasses import dataclass
from typing import Any, Callable

AUDITED_PATHS = ("/v1/chat/completions", "/v1/completions")


@dataclass(frozen=True)
class Rates:
    rate: float = 0.02  # an established PC
    new_rate: float = 0.15  # its first `new_requests` requests
    new_requests: int = 500
    suspect_rate: float = 0.25  # while its record leans towards cheating

    @classmethod
    def of(cls, section: Any) -> Rates:
        """From the head's [audit] section."""
        return cls(rate=section.rate, new_rate=section.new_rate, new_requests=section.new_requests,
                   suspect_rate=section.suspect_rate)


class Sampler:
    """Draws, per request, whether it is audited; counts each PC's requests (seeded from the
    audits table, so a restart does not make every PC new again)."""

    def __init__(self, rates: Rates, random: Callable[[], float] = _random.random) -> None:
        self.rates = rates
        self._random = random
        self.seen: dict[str, int] = {}  # node id -> requests sent to it (all, audited or not)
        # PCs audited at suspect_rate; replaced whole by the audit loop (read without a lock).
        self.suspects: frozenset[str] = frozenset()

    def take(self, node_id: str) -> bool:
        """Whether this request, sent to `node_id`, is audited."""
        n = self.seen.get(node_id, 0) + 1
        self.seen[node_id] = n
        r = self.rates
        rate = r.suspect_rate if node_id in self.suspects else (r.new_rate if n <= r.new_requests else r.rate)
        return self._random() < rate

    def seed(self, counts: dict[str, int]) -> None:
        for node_id, n in counts.items():
            self.seen[node_id] = max(self.seen.get(node_id, 0), n)


# Parameters that change the distribution the PC sampled from in ways the verifier's raw
# logprobs do not show (penalties, biases, constrained decoding): such requests are not scored.
_SHAPING = ("tools", "functions", "echo", "response_format", "logit_bias", "guided_json", "guided_regex",
            "guided_choice", "guided_grammar", "structured_outputs", "bad_words", "allowed_token_ids",
            "min_tokens", "min_p", "presence_penalty", "frequency_penalty")


def eligible(path: str, body: dict[str, Any]) -> bool:
    """Whether a request can be re-scored: a text completion or chat, one choice, nothing that
    shapes the sampling beyond temperature, top_p and top_k (tools, penalties, biases, guided
    decoding), no echo (the prompt in the answer)."""
    if path not in AUDITED_PATHS:
        return False
    n = body.get("n", 1)
    if n not in (1, None) or body.get("best_of") not in (1, None):
        return False
    if any(body.get(k) for k in _SHAPING) or body.get("repetition_penalty") not in (None, 1, 1.0):
        return False
    if path == "/v1/chat/completions":
        messages = body.get("messages")
        return isinstance(messages, list) and bool(messages) and all(_text_message(m) for m in messages)
    prompt = body.get("prompt")
    return isinstance(prompt, str) and bool(prompt)


def _text_message(m: Any) -> bool:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        return False
    content = m.get("content")
    if isinstance(content, str):
        return True
    return isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content)


class CanaryBudget:
    """Canaries owed per model: `canary_rate` per customer request, paid one at a time.

    Without a lock: `requested` runs on the gateway's loop only (a dict update), `due` on the
    audit loop's thread only (it reads the counts, a copy made at once, and keeps what it paid)."""

    def __init__(self, canary_rate: float) -> None:
        self.canary_rate = canary_rate
        self._count: dict[str, int] = {}  # written by the gateway's loop
        self._paid: dict[str, int] = {}  # written by the audit loop

    def requested(self, model: str) -> None:
        self._count[model] = self._count.get(model, 0) + 1

    def due(self) -> list[str]:
        """A model for each whole canary owed now (and no longer owed)."""
        out: list[str] = []
        for model, n in list(self._count.items()):
            whole = int(n * self.canary_rate) - self._paid.get(model, 0)
            if whole > 0:
                out += [model] * whole
                self._paid[model] = self._paid.get(model, 0) + whole
        return out
