"""A vLLM stand-in small enough for unit tests, and the verifier client against it.

ToyEngine speaks the parts of vLLM's OpenAI server the gateway and the verifier use
(/v1/completions and /v1/chat/completions, whole and streamed with the usage chunk;
/tokenize; prompt_logprobs in vLLM's shape; logprobs with return_tokens_as_token_ids;
/v1/models) over a real HTTP server, with a real (if tiny) model: a character bigram whose
weights come from a seed. Another seed is another model; `cut` ends answers early saying
"stop"; `inflate` reports more completion tokens than it made. The integration test
(tests/integration/test_audit.py) does the same against vLLM itself."""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import threading
import time
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from garage_node.head.audit.verifier import Engine, Sample, VerifierError

MODEL = "toy"
ALPHABET = " abcdefghijklmnopqrstuvwxyz"
EOS = 0
VOCAB = len(ALPHABET) + 1


def encode(text: str) -> list[int]:
    return [ALPHABET.index(c) + 1 for c in text.lower() if c in ALPHABET]


def decode(ids: list[int]) -> str:
    return "".join(ALPHABET[i - 1] for i in ids if i != EOS)


def chat_template(messages: list[dict[str, Any]]) -> str:
    return "".join(f"{m['role']} {m['content']} " for m in messages) + "assistant "


class ToyModel:
    def __init__(self, seed: int, sharp: float = 3.0) -> None:
        self.seed, self.sharp = seed, sharp
        self._cache: dict[int, list[float]] = {}

    def logprobs(self, prev: int) -> list[float]:
        if prev not in self._cache:
            rng = random.Random(self.seed * 1000 + prev)
            logits = [rng.gauss(0, self.sharp) for _ in range(VOCAB)]
            logits[EOS] -= 2.0  # answers of some length
            m = max(logits)
            z = math.log(sum(math.exp(x - m) for x in logits)) + m
            self._cache[prev] = [x - z for x in logits]
        return self._cache[prev]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ToyEngine:
    def __init__(self, seed: int = 1, cut: bool = False, inflate: bool = False) -> None:
        self.model = ToyModel(seed)
        self.cut, self.inflate = cut, inflate
        self.bodies: list[bytes] = []  # what generation requests brought, byte for byte
        self.scored = 0  # teacher-forced scoring requests served
        self.rng = random.Random(seed + 7)
        app = FastAPI()
        app.post("/v1/completions")(self._completions)
        app.post("/v1/chat/completions")(self._chat)
        app.post("/tokenize")(self._tokenize)
        app.get("/v1/models")(lambda: {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)

    # -- generation

    def generate(self, ids: list[int], body: dict[str, Any]) -> tuple[list[int], str]:
        t = body.get("temperature", 1.0)
        max_tokens = body.get("max_tokens") or 16
        out: list[int] = []
        prev = ids[-1] if ids else 1
        finish = "length"
        for _ in range(max_tokens):
            lp = self.model.logprobs(prev)
            if t == 0:
                tok = max(range(VOCAB), key=lp.__getitem__)
            else:
                w = [math.exp(x / t) for x in lp]
                tok = self.rng.choices(range(VOCAB), weights=w)[0]
            if tok == EOS:
                finish = "stop"
                break
            out.append(tok)
            prev = tok
        if self.cut and len(out) >= 4:
            out, finish = out[:len(out) // 2], "stop"
        return out, finish

    async def _completions(self, request: Request) -> Any:
        raw = await request.body()
        body = json.loads(raw)
        if isinstance(body.get("prompt"), list):
            return self._score(body)
        self.bodies.append(raw)
        return self._answer(body, encode(body["prompt"]), chat=False)

    async def _chat(self, request: Request) -> Any:
        raw = await request.body()
        self.bodies.append(raw)
        body = json.loads(raw)
        return self._answer(body, encode(chat_template(body["messages"])), chat=True)

    def _answer(self, body: dict[str, Any], ids: list[int], chat: bool) -> Any:
        out, finish = self.generate(ids, body)
        text = decode(out)
        reported = len(out) * 3 + 5 if self.inflate else len(out)
        usage = {"prompt_tokens": len(ids), "completion_tokens": reported, "total_tokens": len(ids) + reported}
        obj = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            return {"id": "x", "object": obj, "model": MODEL, "choices": [choice], "usage": usage}

        def chunk(piece: str | None, finish_reason: str | None) -> str:
            c: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
            if chat:
                c["delta"] = {"content": piece} if piece is not None else {}
            else:
                c["text"] = piece or ""
            return "data: " + json.dumps({"id": "x", "object": obj + ".chunk", "model": MODEL, "choices": [c],
                                          "usage": None}, separators=(",", ":")) + "\n\n"

        def events():
            if chat:
                yield chunk(None, None)
            for tok in out:
                yield chunk(decode([tok]), None)
            yield chunk("", finish)
            if (body.get("stream_options") or {}).get("include_usage"):
                yield "data: " + json.dumps({"id": "x", "object": obj + ".chunk", "choices": [], "usage": usage},
                                            separators=(",", ":")) + "\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    # -- the verifier's side

    async def _tokenize(self, request: Request) -> Any:
        body = await request.json()
        text = chat_template(body["messages"]) if "messages" in body else body["prompt"]
        ids = encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": 4096}

    def _score(self, body: dict[str, Any]) -> Any:
        self.scored += 1
        ids: list[int] = body["prompt"]
        k = int(body["prompt_logprobs"])
        if k > 20:
            return JSONResponse({"error": {"message": "prompt_logprobs over 20"}}, status_code=400)
        pl: list[Any] = [None]
        for i in range(1, len(ids)):
            pl.append(self._entry(self.model.logprobs(ids[i - 1]), ids[i], k))
        lp = self.model.logprobs(ids[-1])
        order = sorted(range(VOCAB), key=lambda t: -lp[t])
        nxt = order[0]
        top = {f"token_id:{t}": lp[t] for t in order[:int(body.get("logprobs") or 1)]}
        return {"id": "s", "object": "text_completion", "model": MODEL,
                "choices": [{"index": 0, "text": "" if nxt == EOS else decode([nxt]),
                             "finish_reason": "stop" if nxt == EOS else "length",
                             "logprobs": {"tokens": [f"token_id:{nxt}"], "token_logprobs": [lp[nxt]],
                                          "top_logprobs": [top], "text_offset": [0]},
                             "prompt_logprobs": pl}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}}

    @staticmethod
    def _entry(lp: list[float], own: int, k: int) -> dict[str, Any]:
        order = sorted(range(VOCAB), key=lambda t: -lp[t])
        rank = {t: r + 1 for r, t in enumerate(order)}
        keep = [*order[:k], own]
        return {str(t): {"logprob": lp[t], "rank": rank[t], "decoded_token": decode([t])} for t in keep}


@pytest.fixture
def engines():
    made: list[ToyEngine] = []

    def make(**kw: Any) -> ToyEngine:
        e = ToyEngine(**kw)
        made.append(e)
        return e
    yield make
    for e in made:
        e.stop()


def answer(engine: ToyEngine, path: str, body: dict[str, Any]) -> Sample:
    """A sample of `engine`'s answer to `body`, as the gateway would keep it."""
    r = httpx.post(engine.url + path, json=body, timeout=10).json()
    c = r["choices"][0]
    text = c["message"]["content"] if "message" in c else c["text"]
    return Sample(at=time.time(), node_id="n1", model=MODEL, path=path, request=body, text=text,
                  finish_reason=c["finish_reason"], completion_tokens=r["usage"]["completion_tokens"])


def check(verifier: ToyEngine, s: Sample) -> Any:
    async def go() -> Any:
        async with httpx.AsyncClient() as http:
            return await Engine("v", verifier.url, "k").check(http, s)
    return asyncio.run(go())


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_honest_greedy_answers_score_clean_and_another_model_does_not(engines, path) -> None:
    verifier, honest, other = engines(seed=1), engines(seed=1), engines(seed=2)
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 40, "temperature": 0}
    body.update({"messages": [{"role": "user", "content": "tell me a story"}]} if "chat" in path
                else {"prompt": "once upon a time"})
    s = check(verifier, answer(honest, path, body))
    assert s.greedy and s.n > 0 and s.bad == 0 and not s.usage_inflated
    if s.eos_checked:
        assert not s.early_stop
    c = check(verifier, answer(other, path, body))
    assert c.bad >= c.n // 3, c


def test_cut_answers_and_inflated_usage_are_seen(engines) -> None:
    verifier = engines(seed=1)
    body = {"model": MODEL, "max_tokens": 60, "temperature": 0, "prompt": "the"}
    cut = check(verifier, answer(engines(seed=1, cut=True), "/v1/completions", body))
    assert cut.bad == 0 and cut.eos_checked and cut.early_stop
    inflated = check(verifier, answer(engines(seed=1, inflate=True), "/v1/completions", body))
    assert inflated.usage_inflated and not inflated.early_stop


def test_sampled_answers_z(engines) -> None:
    verifier, honest, other = engines(seed=1), engines(seed=1), engines(seed=3)
    zs, zo = [], []
    for i in range(12):
        body = {"model": MODEL, "max_tokens": 40, "temperature": 0.8, "prompt": f"word {ALPHABET[i + 1]}"}
        zs.append((check(verifier, answer(honest, "/v1/completions", body))).z)
        zo.append((check(verifier, answer(other, "/v1/completions", body))).z)
    assert sum(abs(z) < 3 for z in zs) >= 11, zs
    assert sum(abs(z) > 3 for z in zo) >= 10, zo


def test_verifier_errors_say_why(engines) -> None:
    asyncio.run(_errors(engines(seed=1)))


async def _errors(v: ToyEngine) -> None:
    s = Sample(at=0.0, node_id="n1", model=MODEL, path="/v1/completions", request={"prompt": "a"}, text="b",
               finish_reason="length", completion_tokens=1)
    async with httpx.AsyncClient() as http:
        with pytest.raises(VerifierError, match="could not be reached"):
            await Engine("gone", f"http://127.0.0.1:{free_port()}", "").check(http, s)
        e = Engine("v", v.url, "")
        with pytest.raises(VerifierError, match="HTTP 404"):
            await Engine("v", v.url + "/nothing", "").check(http, s)
        assert await e.models(http) == [MODEL]
