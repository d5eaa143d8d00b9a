"""Measuring instruments for the gateway benchmarks (issue #22): engine stand-ins and a load
generator that cost far less CPU per request than the gateway they measure.

Written on asyncio's Protocol and httptools' parsers (the C parser uvicorn uses) rather than on
FastAPI and httpx: those cost 0.5-1.5 ms of CPU per request, so on a 2-CPU machine the rig ran
out of CPU before the gateway did and the gateway "fell behind" while mostly idle (issue #22's
300 requests/s). Here a stand-in answer costs tens of microseconds.

- `serve_standins(ports, token_interval_s)`: one process, many ports, each an OpenAI-shaped
  engine: `/v1/completions` and `/v1/chat/completions` answer at once, or stream `max_tokens`
  events one every `token_interval_s` (50 tokens/s: 0.02), ending with vLLM's usage chunk and
  `[DONE]`, chunked as vLLM does.
- `Client`: keep-alive HTTP/1.1 connections to one host:port; `request()` sends prebuilt bytes
  and returns status, time to the first body byte, total time and whether a stream ended with
  `[DONE]`. `open_loop()` starts requests on a fixed schedule (latency counted from the
  scheduled start, so a lagging target shows); `closed_loop()` keeps N requests going.

Not for production: no TLS, no pipelining, only what vLLM's and the gateway's answers use.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field

import httptools

# ------------------------------------------------------------------ stand-in engines

_COMPLETION = json.dumps({"id": "cmpl-x", "object": "text_completion", "created": 0, "model": "m",
                          "choices": [{"index": 0, "text": " ok", "logprobs": None, "finish_reason": "length"}],
                          "usage": {"prompt_tokens": 5, "total_tokens": 6, "completion_tokens": 1}},
                         separators=(",", ":")).encode()
_WHOLE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(_COMPLETION)
          + _COMPLETION)
_STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n"
# vLLM's token event: usage null when the client asked for usage in the stream (the gateway asks).
_TOKEN = (b'data: {"id":"cmpl-x","object":"text_completion","created":0,"model":"m","choices":[{"index":0,'
          b'"text":" ok","logprobs":null,"finish_reason":null,"stop_reason":null}],"usage":null}\n\n')
_LAST = (b'data: {"id":"cmpl-x","object":"text_completion","created":0,"model":"m","choices":[{"index":0,'
         b'"text":" ok","logprobs":null,"finish_reason":"length","stop_reason":null}],"usage":null}\n\n')


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _usage_event(n: int) -> bytes:
    return (b'data: {"id":"cmpl-x","object":"text_completion","created":0,"model":"m","choices":[],'
            b'"usage":{"prompt_tokens":5,"total_tokens":%d,"completion_tokens":%d}}\n\n' % (5 + n, n))


class _StandIn(asyncio.Protocol):
    def __init__(self, token_interval_s: float) -> None:
        self.interval = token_interval_s
        self.parser = httptools.HttpRequestParser(self)
        self.body = bytearray()
        self.transport: asyncio.Transport | None = None
        self.streams = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_begin(self) -> None:
        self.body.clear()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        assert self.transport is not None
        if b'"stream":true' not in self.body and b'"stream": true' not in self.body:
            self.transport.write(_WHOLE)
            return
        try:
            n = max(1, int(json.loads(self.body).get("max_tokens") or 16))
        except ValueError:
            n = 16
        self.transport.write(_STREAM_HEAD)
        asyncio.get_running_loop().call_later(self.interval, self._token, n, 1)

    def _token(self, n: int, i: int) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return  # the gateway hung up: as vLLM, the request is dropped
        if i < n:
            t.write(_chunk(_TOKEN))
            asyncio.get_running_loop().call_later(self.interval, self._token, n, i + 1)
            return
        t.write(_chunk(_LAST) + _chunk(_usage_event(n)) + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve_standins(ports: list[int], token_interval_s: float = 0.02, host: str = "127.0.0.1") -> None:
    """Serve stand-in engines on `ports` until cancelled. They accept connections in batches
    (the gateway's own BatchAcceptServer), so that they cannot be what holds the gateway's
    requests when it opens a hundred connections at once at an overload's onset: uvloop
    accepts one connection per turn of its loop. (It was a suspect for the onset's windows in
    which nothing completed with the gateway's loop on time; they were seen with both.)"""
    from garage_node.head.connguard import BatchAcceptServer, batch_listener

    loop = asyncio.get_running_loop()
    servers = []
    for p in ports:
        def factory() -> _StandIn:
            return _StandIn(token_interval_s)

        sock = batch_listener((factory, host, p), {"backlog": 4096})
        if sock is None:
            raise ValueError(f"stand-ins listen on a literal address, not {host!r}")
        servers.append(BatchAcceptServer(loop, factory, sock, None, None))
    try:
        await asyncio.Event().wait()
    finally:
        for s in servers:
            s.close()


# ------------------------------------------------------------------ client


@dataclass
class Result:
    status: int  # 0: the connection failed
    ttfb_s: float  # to the first byte of the body
    total_s: float
    done: bool  # a stream ended with [DONE] (a whole answer: True)
    retry_after: bool = False
    events: int = 0  # `data: ` lines received ([DONE] and the usage chunk included)
    # From when it was due to when it was written on a connection: the load generator's own
    # delay (its loop behind, or no connection free), which counts in the times above.
    late_s: float = 0.0

    @property
    def served(self) -> bool:
        """A whole answer (a stream ended with [DONE])."""
        return self.status == 200 and self.done

    @property
    def refused(self) -> bool:
        """Turned away with Retry-After (503 overloaded, 429 over a key's limits)."""
        return self.status in (429, 503) and self.retry_after


class _Conn(asyncio.Protocol):
    def __init__(self, pool: Client) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Result] | None = None
        self.t0 = 0.0
        self.ttfb = 0.0
        self.tail = b""
        self.retry_after = False
        self.keep = True
        self.events = 0
        self.sent = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes, t0: float) -> asyncio.Future[Result]:
        assert self.transport is not None
        self.t0, self.ttfb, self.tail, self.retry_after, self.events = t0, 0.0, b"", False, 0
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        self.sent = time.perf_counter()
        return self.waiter

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail()

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"retry-after":
            self.retry_after = True
        elif name.lower() == b"connection" and value.lower() == b"close":
            self.keep = False

    def on_body(self, body: bytes) -> None:
        if not self.ttfb:
            self.ttfb = time.perf_counter() - self.t0
        self.events += body.count(b"data: ")
        self.tail = (self.tail + body)[-64:]

    def on_message_complete(self) -> None:
        now = time.perf_counter()
        w, self.waiter = self.waiter, None
        if w is not None and not w.done():
            w.set_result(Result(self.parser.get_status_code(), self.ttfb or now - self.t0, now - self.t0,
                                b"[DONE]" in self.tail or b"data:" not in self.tail, self.retry_after, self.events,
                                self.sent - self.t0))
        if self.keep and self.transport is not None:
            self.pool._idle.append(self)
        elif self.transport is not None:
            self.transport.close()

    def _fail(self) -> None:
        w, self.waiter = self.waiter, None
        if w is not None and not w.done():
            w.set_result(Result(0, 0.0, time.perf_counter() - self.t0, False))
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail()
        try:
            self.pool._idle.remove(self)
        except ValueError:
            pass


@dataclass
class Client:
    """Keep-alive connections to one server, opened as needed (at most `max_connections`;
    beyond, requests wait for one, and the wait counts in their time)."""

    host: str
    port: int
    max_connections: int = 1024
    _idle: deque[_Conn] = field(default_factory=deque)
    _open: int = 0
    _slots: asyncio.Semaphore | None = None

    def build(self, path: str, body: dict, key: str = "") -> bytes:
        data = json.dumps(body, separators=(",", ":")).encode()
        auth = f"authorization: Bearer {key}\r\n" if key else ""
        return (f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n{auth}"
                f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n").encode() + data

    async def request(self, data: bytes, t0: float | None = None) -> Result:
        """`t0`: when the request was due (perf_counter); its times count from there."""
        t0 = time.perf_counter() if t0 is None else t0
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_connections)
        async with self._slots:
            conn = self._idle.pop() if self._idle else None
            if conn is None or conn.transport is None:
                try:
                    _, conn = await asyncio.get_running_loop().create_connection(lambda: _Conn(self), self.host, self.port)
                except OSError:
                    return Result(0, 0.0, time.perf_counter() - t0, False)
            waiter = conn.send(data, t0)
            try:
                return await waiter
            except asyncio.CancelledError:
                if conn.transport is not None:
                    conn.transport.close()  # the request is given up: the server sees the client leave
                raise

    def close(self) -> None:
        while self._idle:
            c = self._idle.pop()
            if c.transport is not None:
                c.transport.close()


@dataclass
class Tally:
    results: list[Result] = field(default_factory=list)
    unfinished: int = 0
    elapsed_s: float = 0.0
    sent_s: list[float] = field(default_factory=list)  # open_loop: when each result's request was due, from the start

    def ok(self) -> list[Result]:
        return [r for r in self.results if r.served]

    def refused(self) -> list[Result]:
        return [r for r in self.results if r.refused]

    def errors(self) -> int:
        return len(self.results) - len(self.ok()) - len(self.refused())

    def error_kinds(self) -> dict[str, int]:
        """The errors by status ("0": no connection or it broke; "200-cut": a stream without [DONE])."""
        kinds: dict[str, int] = {}
        for r in self.results:
            if not r.served and not r.refused:
                k = "200-cut" if r.status == 200 else str(r.status)
                kinds[k] = kinds.get(k, 0) + 1
        return kinds


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) in ms; nan for none."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000


async def open_loop(client: Client, data: bytes, rate: float, seconds: float, grace_s: float) -> Tally:
    """`rate` requests a second for `seconds`, each started on schedule whether or not earlier ones
    are done; at most `grace_s` more for the answers, then what is open is cancelled (unfinished)."""
    tally = Tally()
    tasks: list[asyncio.Task[Result]] = []
    start = time.perf_counter()
    n = int(rate * seconds)
    for i in range(n):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(client.request(data, due)))
    left = start + seconds + grace_s - time.perf_counter()
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, left)) if tasks else (set(), set())
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    tally.elapsed_s = time.perf_counter() - start
    answered = [(i / rate, t.result()) for i, t in enumerate(tasks) if t in done]
    tally.sent_s = [sent for sent, _ in answered]
    tally.results = [r for _, r in answered]
    tally.unfinished = len(pending)
    return tally


async def closed_loop(client: Client, data: bytes, concurrency: int, seconds: float, grace_s: float) -> Tally:
    """`concurrency` requests open at all times for `seconds` (each user sends its next one as its
    last one ends), then at most `grace_s` for the last ones."""
    tally = Tally()
    start = time.perf_counter()
    stop = start + seconds

    async def user(i: int) -> None:
        await asyncio.sleep(i * 0.02 % 1.0)  # users arrive over the first second, not in one burst
        while time.perf_counter() < stop:
            tally.results.append(await client.request(data))

    users = [asyncio.ensure_future(user(i)) for i in range(concurrency)]
    _, pending = await asyncio.wait(users, timeout=seconds + grace_s)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    tally.unfinished = len(pending)
    tally.elapsed_s = time.perf_counter() - start
    return tally
