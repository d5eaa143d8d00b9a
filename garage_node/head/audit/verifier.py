"""The verifier: a trusted engine (vLLM's OpenAI server, the image and model the PCs run)
re-scores a sample teacher-forced, in one prefill:

1. `POST /tokenize` the prompt as the PC's engine did (chat: the messages with the generation
   prompt; completion: the prompt text), and the completion text without special tokens;
2. `POST /v1/completions` with the token ids of both, `prompt_logprobs` = K (the verifier's
   distribution at every position, the PC's tokens among them), `max_tokens` 1 at temperature 0
   with `logprobs` = K: the one token the verifier would put after the completion and the top-K
   there, where a natural stop put EOS. The EOS ids are learned from the verifier's own stops.

Raw logprobs (vLLM's default), before any temperature: score.py applies the request's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

from garage_node.head.audit import score as sc

K = 20  # top-K logprobs per position (vLLM's max_logprobs default is 20)
TOKEN_ID_PREFIX = "token_id:"  # return_tokens_as_token_ids


class VerifierError(Exception):
    """The verifier could not score this sample (unreachable, refused, too long, odd answer)."""


@dataclass
class Sample:
    """A completed request kept for re-scoring (what the gateway captured; never the key)."""

    at: float  # when the PC answered (unix time)
    node_id: str
    model: str
    path: str  # /v1/chat/completions or /v1/completions
    request: dict[str, Any]  # the request body as the PC received it
    text: str  # choice 0's completion text
    finish_reason: str | None
    completion_tokens: int | None  # the PC's reported usage (None: none)
    kind: str = "customer"  # customer | canary | recheck
    engine: str = ""  # the PC's agent version when it answered
    precision: str = ""  # "gpu" or "cpu" (the PC's device), for the honest rates

    @property
    def sampling(self) -> sc.Sampling:
        return sc.Sampling.of(self.request)

    @property
    def answer(self) -> sc.Answer:
        body = self.request
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        return sc.Answer(finish_reason=self.finish_reason,
                         max_tokens=max_tokens if isinstance(max_tokens, int) else None,
                         has_stop_strings=bool(body.get("stop") or body.get("stop_token_ids")),
                         tokens_reported=self.completion_tokens)


@dataclass
class Engine:
    """One verifier engine: a trusted PC's (named by its node id) or [audit] verifier_url."""

    name: str
    url: str  # http://host:port (no /v1)
    key: str
    eos: dict[str, set[str]] = field(default_factory=dict)  # model -> "token_id:N" the verifier stopped on

    async def check(self, http: httpx.AsyncClient, s: Sample, timeout_s: float = 120.0) -> sc.Score:
        """The sample's score. Raises VerifierError."""
        prompt_ids = await self._tokenize(http, s, prompt=True, timeout_s=timeout_s)
        completion_ids = await self._tokenize(http, s, prompt=False, timeout_s=timeout_s)
        ids = prompt_ids + completion_ids
        body = {"model": s.model, "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": K,
                "logprobs": K, "return_tokens_as_token_ids": True}
        data = await self._post(http, "/v1/completions", body, timeout_s)
        try:
            choice = data["choices"][0]
            pl = choice["prompt_logprobs"]
            pos = sc.positions(pl, ids, len(prompt_ids), K)
            end = self._end(s.model, choice)
        except (KeyError, IndexError, TypeError) as e:
            raise VerifierError(f"{self.name}'s answer is not vLLM's shape (missing {e})") from None
        except sc.ScoreError as e:
            raise VerifierError(f"{self.name}: {e}") from None
        return sc.score(pos, s.sampling, s.answer, tokens_counted=len(completion_ids), end=end)

    def _end(self, model: str, choice: dict[str, Any]) -> sc.End:
        lp = choice.get("logprobs") or {}
        tops = lp.get("top_logprobs") or [None]
        top = tops[0] if isinstance(tops[0], dict) and tops[0] else {}
        tokens = lp.get("tokens") or []
        stopped = choice.get("finish_reason") == "stop"
        learned = self.eos.setdefault(model, set())
        if stopped and tokens and isinstance(tokens[0], str) and tokens[0].startswith(TOKEN_ID_PREFIX):
            learned.add(tokens[0])
        values = [float(v) for v in top.values()] or [0.0]
        eos = max((float(top[t]) for t in learned if t in top), default=None)
        return sc.End(stopped=stopped, top=max(values), kth=min(values), eos=eos, eos_known=bool(learned))

    async def _tokenize(self, http: httpx.AsyncClient, s: Sample, prompt: bool, timeout_s: float) -> list[int]:
        body: dict[str, Any]
        if not prompt:
            body = {"model": s.model, "prompt": s.text, "add_special_tokens": False}
        elif s.path == "/v1/chat/completions":
            body = {"model": s.model, "messages": s.request["messages"],
                    "add_generation_prompt": s.request.get("add_generation_prompt", True)}
            for k in ("continue_final_message", "chat_template_kwargs", "add_special_tokens"):
                if k in s.request:
                    body[k] = s.request[k]
        else:
            body = {"model": s.model, "prompt": s.request["prompt"]}
        data = await self._post(http, "/tokenize", body, timeout_s)
        ids = data.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise VerifierError(f"{self.name}'s /tokenize answer has no token ids")
        return ids

    async def _post(self, http: httpx.AsyncClient, path: str, body: dict[str, Any], timeout_s: float) -> Any:
        try:
            r = await http.post(self.url + path, json=body, timeout=timeout_s, headers=self._headers)
        except httpx.HTTPError as e:
            raise VerifierError(f"{self.name} could not be reached ({type(e).__name__})") from None
        if r.status_code != 200:
            # vLLM's error message says why (too long for its context, unknown model); never the key.
            try:
                err = r.json()
                why = str(err.get("error", {}).get("message") or err.get("message") or "")[:200]
            except (ValueError, AttributeError):
                why = ""
            raise VerifierError(f"{self.name} answered {path} with HTTP {r.status_code}" + (f": {why}" if why else ""))
        try:
            return r.json()
        except ValueError:
            raise VerifierError(f"{self.name}'s {path} answer is not JSON") from None

    @property
    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}"} if self.key else {}

    async def models(self, http: httpx.AsyncClient, timeout_s: float = 5.0) -> list[str]:
        """The models it serves (GET /v1/models)."""
        try:
            r = await http.get(self.url + "/v1/models", timeout=timeout_s, headers=self._headers)
            r.raise_for_status()
            return [str(m["id"]) for m in r.json().get("data", [])]
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise VerifierError(f"{self.name} did not list its models ({type(e).__name__})") from None
