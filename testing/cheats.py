"""Cheating PCs, for the audit tests and bench (issue #20): small HTTP proxies a dishonest owner
could put in front of a real engine, on the address the head calls. They are adversaries, not
stand-ins for our code: what reaches them is exactly what the gateway sends a PC, and what
they answer is a real engine's answer, altered the way a cheater would.

- `Truncator`: does half the work. Each completion is asked of the engine with half the
  max_tokens the client asked for, and an answer cut by that limit is said to have ended by
  itself (finish_reason "length" becomes "stop"), whole or streamed. Usage is the engine's (the
  cut answer's): the gain is the compute saved, the loss the customer's.
- `Switcher`: serves `share` of the requests (10 % by default) from another engine (other
  weights under the same model name), the rest honestly: a PC that cheats now and then.

Each runs a uvicorn server on a thread: `start()` returns its URL, `stop()` ends it.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

COMPLETIONS = ("/v1/chat/completions", "/v1/completions")
HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive", "accept-encoding"}


@dataclass(frozen=True)
class Upstream:
    url: str  # http://host:port of a real engine
    key: str = ""  # its VLLM_API_KEY ("": the caller's Authorization is passed on)


class Shim:
    """The proxy. Subclasses decide where a request goes and how its body and answer change."""

    def __init__(self, upstream: Upstream, host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = upstream
        self.host = host
        self.port = port or _free_port(host)
        self.requests = 0  # completions relayed
        self.cheated = 0  # of them, altered
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._http: httpx.AsyncClient | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- what a cheater changes

    def choose(self, path: str, body: dict[str, Any] | None) -> tuple[Upstream, bool]:
        """(where this request goes, whether the answer is to be altered)."""
        return self.upstream, False

    def rewrite(self, body: dict[str, Any]) -> dict[str, Any]:
        return body

    def alter(self, choice: dict[str, Any]) -> None:
        """Change one answer choice (whole answer) or one streamed chunk's choice in place."""

    # -- the proxy

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = b""
        while True:
            msg = await receive()
            raw += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        path = scope["path"]
        body: dict[str, Any] | None = None
        if scope["method"] == "POST" and path in COMPLETIONS:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        up, cheat = self.choose(path, body if isinstance(body, dict) else None)
        if isinstance(body, dict):
            self.requests += 1
            if cheat:
                self.cheated += 1
                body = self.rewrite(dict(body))
            raw = json.dumps(body).encode()
        headers = {k.decode(): v.decode() for k, v in scope["headers"] if k.decode().lower() not in HOP_HEADERS}
        if up.key:
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            headers["authorization"] = f"Bearer {up.key}"
        url = up.url + path + (("?" + scope["query_string"].decode()) if scope.get("query_string") else "")
        assert self._http is not None
        req = self._http.build_request(scope["method"], url, content=raw, headers=headers)
        try:
            resp = await self._http.send(req, stream=True)
        except httpx.HTTPError:
            await send({"type": "http.response.start", "status": 502, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        try:
            out_headers = [(k.encode(), v.encode()) for k, v in resp.headers.items()
                           if k.lower() not in HOP_HEADERS]
            streamed = resp.headers.get("content-type", "").startswith("text/event-stream")
            if not (cheat and resp.status_code == 200):
                await send({"type": "http.response.start", "status": resp.status_code, "headers": out_headers})
                async for chunk in resp.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            elif streamed:
                await send({"type": "http.response.start", "status": 200, "headers": out_headers})
                async for line in resp.aiter_lines():
                    await send({"type": "http.response.body", "body": (self._line(line) + "\n").encode(),
                                "more_body": True})
            else:
                data = json.loads(await resp.aread())
                for ch in data.get("choices") or []:
                    self.alter(ch)
                await send({"type": "http.response.start", "status": 200, "headers": out_headers})
                await send({"type": "http.response.body", "body": json.dumps(data).encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await resp.aclose()

    def _line(self, line: str) -> str:
        if not line.startswith("data: ") or line.strip() == "data: [DONE]":
            return line
        try:
            data = json.loads(line[6:])
        except ValueError:
            return line
        for ch in data.get("choices") or []:
            self.alter(ch)
        return "data: " + json.dumps(data)

    # -- lifecycle

    def start(self, timeout: float = 10) -> str:
        async def lifespan_less() -> None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(300, connect=5),
                                           limits=httpx.Limits(max_connections=256))
            assert self._server is not None
            try:
                await self._server.serve()
            finally:
                await self._http.aclose()

        config = uvicorn.Config(self, host=self.host, port=self.port, lifespan="off", log_level="warning",
                                loop="asyncio", http="h11")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=lambda: asyncio.run(lifespan_less()), daemon=True,
                                        name=f"cheat-{type(self).__name__}-{self.port}")
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"{type(self).__name__} did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)


class Truncator(Shim):
    """Half the max_tokens asked, and "stop" said where the engine stopped at that limit."""

    DEFAULT_MAX = 16  # the cap when the client named none

    def choose(self, path: str, body: dict[str, Any] | None) -> tuple[Upstream, bool]:
        return self.upstream, body is not None

    def rewrite(self, body: dict[str, Any]) -> dict[str, Any]:
        for k in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(k), int):
                body[k] = max(1, body[k] // 2)
                return body
        body["max_tokens"] = self.DEFAULT_MAX
        return body

    def alter(self, choice: dict[str, Any]) -> None:
        if choice.get("finish_reason") == "length":
            choice["finish_reason"] = "stop"


class Switcher(Shim):
    """`share` of the completions answered by `other` (other weights, same model name)."""

    def __init__(self, upstream: Upstream, other: Upstream, share: float = 0.1, seed: int = 0, **kw: Any) -> None:
        super().__init__(upstream, **kw)
        self.other = other
        self.share = share
        self._rng = random.Random(seed)

    def choose(self, path: str, body: dict[str, Any] | None) -> tuple[Upstream, bool]:
        if body is not None and self._rng.random() < self.share:
            return self.other, True
        return self.upstream, False


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# -- what clients ask them

MAX_TOKENS = (16, 32, 64)  # one of these per request


def client_requests(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` request bodies (without "model"), deterministic for a seed: chat and text completions,
    half greedy and half sampled (temperature 0.7 or 1, some with top_p 0.9), max_tokens 16, 32
    or 64; half from the lines the audit models were trained on (their home ground, where they
    are sure), half from their words in other orders (where they are less sure)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "image" / "engine"))
    import make_tiny_model as tiny  # the training corpus (pure Python; tokenizers only for training)

    rng = random.Random(seed)
    lines = [x for x in tiny.corpus() if x.strip()]
    words = " ".join(lines).split()
    out = []
    for i in range(n):
        if rng.random() < 0.5:
            line = rng.choice(lines)
        else:
            line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        body: dict[str, Any] = {"max_tokens": rng.choice(MAX_TOKENS)}
        if i % 2:
            body["messages"] = [{"role": "user", "content": line}]
        else:
            cut = line.split()
            body["prompt"] = " ".join(cut[: max(1, rng.randint(1, max(1, len(cut) - 1)))])
        if rng.random() < 0.5:
            body["temperature"] = 0.0
        else:
            body["temperature"] = rng.choice((0.7, 1.0))
            if rng.random() < 0.3:
                body["top_p"] = 0.9
        out.append(body)
    return out
