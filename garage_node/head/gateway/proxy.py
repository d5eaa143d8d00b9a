"""One OpenAI request to the PCs serving its model: pick a PC, call its engine with the
engine's key, and relay the answer.

Failover: a PC that cannot be reached, answers 502/503/504 or 401 (it has not got its key
yet), or ends a stream before its first event is passed over, and the request goes to the
next PC the router picks (at most `max_attempts` in all). Nothing has reached the client by
then, so a retry is invisible. Once the first event is relayed the answer is committed to that
PC: if it stops answering, the stream ends with an error event and [DONE], never a hang.

Usage: every request's usage reaches `on_usage` (the ledger, the limits, the metrics). For a
stream the gateway asks vLLM for its usage chunk (`stream_options.include_usage`) and, if the
client did not ask for it, strips it again. A stream cut short (the client left, the PC died)
is accounted by its content events, one token each, as vLLM streams them; its prompt is not
known then and counts 0. What is billed is what was sent: a request whose client left before
its answer began (a non-streamed one, or a stream before its first event) is cancelled on the
PC and goes in the ledger as a request of 0 tokens.

Audits (issue #20, head/audit/): once a PC has answered 200, `audit.take` draws whether the
request is audited (one random number; the bytes sent were the same either way), and for the
few drawn the answer's choice 0 is captured: a whole answer from the one JSON parse its usage
needs anyway, a stream from its events as they are relayed. A re-check's canary is pinned to
its PC (`Call.pin`), past the audits' exclusion.

Ending what is open (`_Attempt`, swept every SWEEP_S by `_Watchdog`):
- the client leaves: a listener on the request's ASGI channel (from CLIENT_WATCH_AFTER_S on)
  sees it at once. Before the answer begins, the engine's response is closed (vLLM aborts the
  request) and the PC's slot given back; mid-stream, the same listener cancels the relay
  (RelayResponse), which closes the engine's response;
- the head gives the PC up (no heartbeat for stale_after_s, or dropped from the table): a
  request without its first byte goes to another PC, a stream under way ends with the
  `upstream_lost` event;
- the PC is alive but silent: a request still without its first byte when a report the PC
  sent `silent_first_byte_s` after it shows its engine holding no request at all is lost
  there, and goes to another PC. A long prompt keeps its PC: the engine reports it running.
  `first_byte_timeout_s` stays the bound where that is not measured.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol, TypeVar

import aiohttp
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Message

from garage_node.head.gateway.errors import GatewayError, stream_error_event
from garage_node.head.gateway.keys import ApiKey
from garage_node.head.gateway.metrics import GatewayMetrics
from garage_node.head.gateway.router import Router
from garage_node.head.gateway.table import Endpoint, EndpointTable

log = logging.getLogger(__name__)

RETRY_STATUSES = (401, 502, 503, 504)
SWEEP_S = 0.25  # how often open requests are checked against the table's verdicts
CLIENT_WATCH_AFTER_S = 0.1  # a request's client is watched from this long after it came in
YIELD_EVERY = 8  # a relayed stream lets the event loop run at least this often (events)
CLIENT_LEFT = 499  # nginx's status for "the client closed the request": for the metrics only

R = TypeVar("R")


@dataclass(frozen=True)
class Usage:
    node_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    complete: bool  # False: estimated from a stream cut short


@dataclass(frozen=True)
class Call:
    """One request, parsed and checked by the app."""

    path: str  # /v1/chat/completions, /v1/completions, /v1/embeddings
    model: str
    body: bytes  # what goes to the engine
    stream: bool
    client_wants_usage: bool
    blocks: list[int]  # the prompt's prefix blocks, for the router
    key: ApiKey
    started: float  # monotonic
    # The body as parsed (what `body` encodes), kept by reference for the audits: only a
    # request drawn for an audit is looked at (head/audit/).
    request: dict[str, Any] | None = None
    kind: str = "customer"  # customer, or the head's own: canary, recheck (always audited)
    pin: str | None = None  # a re-check's canary: this PC only, quarantined or not


class AuditTap(Protocol):
    """What the proxy tells the audits (head/audit/auditor.py). Nothing the PC receives depends
    on it: the decision is taken after the PC is chosen, and the answer is captured here."""

    def take(self, call: Call, node_id: str) -> bool:
        """Whether this request, sent to this PC, is audited (one random draw; cheap)."""
        ...

    def keep(self, call: Call, ep: Endpoint, text: str, finish_reason: str | None,
             completion_tokens: int | None) -> None:
        """An audited request's complete answer (choice 0)."""
        ...


class Proxy:
    def __init__(self, table: EndpointTable, router: Router, engine_key: Callable[[str], str],
                 metrics: GatewayMetrics, on_usage: Callable[[Call, Usage], None], node_name: Callable[[str], str],
                 connect_timeout_s: float = 3.0, first_byte_timeout_s: float = 120.0,
                 stream_idle_timeout_s: float = 60.0, max_attempts: int = 3,
                 silent_first_byte_s: float = 20.0, max_connections: int = 3072,
                 keepalive_connections: int = 64, keepalive_s: float = 4.0) -> None:
        self.table, self.router, self.engine_key = table, router, engine_key
        self.metrics, self.on_usage, self.node_name = metrics, on_usage, node_name
        self.stream_idle_timeout_s = stream_idle_timeout_s
        self.max_attempts = max_attempts
        self.watchdog = _Watchdog(table, silent_first_byte_s)
        # connect: the wait for a pooled slot and the TCP connect; sock_read: the first byte
        # (a stream's later silences are bounded by stream_idle_timeout_s, per event).
        self._timeout = aiohttp.ClientTimeout(total=None, connect=10.0, sock_connect=connect_timeout_s,
                                              sock_read=first_byte_timeout_s)
        # Every in-flight request holds at most one connection (a retry gives its first one
        # back first). Idle ones are kept keepalive_s, under the engines' own keep-alive (5 s in
        # uvicorn and vLLM); keepalive_connections 0 turns keep-alive off. aiohttp, not httpx:
        # httpcore 1.0 walks every pooled connection each time a request takes or returns one,
        # and that walk (with httpx's per-request objects) was 45-60 % of the gateway's CPU at
        # 400 requests/s (py-spy, bench/gateway_load.py; issue #22). aiohttp's pool is a
        # deque per engine and its HTTP parser is C.
        self._keepalive_s = keepalive_s if keepalive_connections > 0 else 0.0
        self._max_connections = max_connections
        self._http: aiohttp.ClientSession | None = None
        self.audit: AuditTap | None = None  # set by the gateway when [audit] is on

    @property
    def client(self) -> aiohttp.ClientSession:
        """One pooled session (keep-alive connections to the engines), made in the event loop
        that serves the gateway: a session belongs to the loop it was made in."""
        if self._http is None or self._http.closed:
            if self._keepalive_s > 0:
                connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0,
                                                 keepalive_timeout=self._keepalive_s)
            else:  # aiohttp refuses a keep-alive time together with force_close
                connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0, force_close=True)
            # Engines get exactly the headers the proxy sets (no User-Agent, no Accept-Encoding:
            # vLLM's answers are relayed as they come).
            self._http = aiohttp.ClientSession(connector=connector, timeout=self._timeout, auto_decompress=False,
                                               skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"))
        return self._http

    async def close(self) -> None:
        self.watchdog.stop()
        if self._http is not None:
            await self._http.close()

    def _pick(self, call: Call, tried: set[str]) -> Endpoint | None:
        table = self.table
        if call.pin is not None:
            return self._pinned(call, tried)
        with table.lock:
            takes = table.usable(table.clock.monotonic())
            usable = (lambda ep: takes(ep) and ep.node_id not in tried) if tried else takes
            # The prefix's PC only if it serves this model: two models' requests often share a
            # prompt (a system prompt), and a PC serving the other model would answer 404.
            def lookup(node_id: str) -> Endpoint | None:
                ep = table.get(node_id)
                return ep if ep is not None and ep.model == call.model else None
            decision = self.router.choose(table.pool(call.model), call.blocks, usable, lookup)
            if decision is None:
                return None
            ep = table.get(decision.node_id)
            assert ep is not None
            ep.inflight += 1
            self.router.served(call.blocks, ep.node_id)
        return ep

    def _pinned(self, call: Call, tried: set[str]) -> Endpoint | None:
        """A re-check's PC, whatever the audits' exclusion, if it can answer now."""
        table = self.table
        with table.lock:
            ep = table.get(call.pin or "")
            now = table.clock.monotonic()
            if ep is None or ep.node_id in tried or ep.model != call.model or not table.live(ep, now):
                return None
            ep.inflight += 1
        return ep

    async def forward(self, call: Call, request: Request | None) -> Response:
        """`request`: the client's, to see it leave (None: not watched)."""
        client = _ClientWatch(request.receive if request is not None else None)
        response: Response | None = None
        try:
            response = await self._forward(call, client)
            return response
        finally:
            if isinstance(response, RelayResponse) and request is not None:
                response.watch = client  # the stream goes on watching the client with it
            else:
                client.stop()

    async def _forward(self, call: Call, client: _ClientWatch) -> Response:
        tried: set[str] = set()
        last_problem = ""
        for attempt in range(self.max_attempts):
            ep = self._pick(call, tried)
            if ep is None:
                break
            tried.add(ep.node_id)
            if attempt:
                self.metrics.retries.labels(call.model).inc()
            att = _Attempt(ep, self.table.clock.monotonic(), answered=False)
            client.attempt = att
            if client.left:  # between two attempts
                att.end("client")
            self.watchdog.add(att)
            try:
                return await self._try(call, ep, att)
            except (asyncio.CancelledError, GatewayError):
                self.table.end(ep)
                raise
            except _ClientGone:
                self.table.end(ep)
                # Nothing reached the client: billed nothing, but the ledger keeps the request.
                self.on_usage(call, Usage(ep.node_id, call.model, 0, 0, complete=False))
                log.info("a client left its %s request before its answer; cancelled on PC %s", call.model, ep.node_id)
                return Response(status_code=CLIENT_LEFT)
            except _Unusable as e:
                self.table.end(ep)
                self.table.suspend(ep.node_id)
                last_problem = e.why
                log.info("PC %s could not take a %s request (%s); trying another", ep.node_id, call.model, e.why)
            finally:
                self.watchdog.discard(att)
                client.attempt = None
        if tried:
            raise GatewayError(503, "no_pc_answered",
                               f"no PC serving {call.model} could answer ({len(tried)} tried; the last: {last_problem}); "
                               "retry shortly", retry_after_s=5)
        raise GatewayError(503, "no_healthy_pc",
                           f"no PC can take a request for {call.model} right now (all are starting, draining or "
                           "busy failing over); retry shortly", retry_after_s=5)

    async def _try(self, call: Call, ep: Endpoint, att: _Attempt) -> Response:
        """One PC's answer; every wait before the first byte ends early when `att` is ended
        (the client left: the engine's connection is closed, and vLLM aborts the request)."""
        session = self.client
        url = ep.url + call.path
        headers = {"authorization": f"Bearer {self.engine_key(ep.node_id)}", "content-type": "application/json"}
        try:
            # A non-streamed answer's headers come with its last byte: this wait is most of it.
            resp = await att.wait(lambda: session.post(url, data=call.body, headers=headers))
        except aiohttp.ClientError as e:
            raise _Unusable(type(e).__name__) from None
        try:
            if resp.status in RETRY_STATUSES:
                raise _Unusable(f"HTTP {resp.status}")
            headers = {"x-garage-node": self.node_name(ep.node_id), "x-garage-node-id": ep.node_id}
            # After the PC is chosen and the request sent as it is: the PC cannot see this.
            audited = self.audit is not None and resp.status == 200 and self.audit.take(call, ep.node_id)
            if not call.stream or resp.status != 200:
                return await self._whole(call, ep, resp, headers, att, audited)
            events = sse_data(resp.content)
            try:
                first = await att.wait(lambda: anext(events))  # within first_byte_timeout_s (sock_read)
            except (aiohttp.ClientError, StopAsyncIteration) as e:
                raise _Unusable(f"the stream ended before it began ({type(e).__name__})") from None
        except BaseException:
            resp.close()  # the engine's connection closed: vLLM aborts the request; the caller gives the slot back
            raise
        self.metrics.ttft.labels(call.model).observe(time.monotonic() - call.started)
        slot = _Slot(self.table, ep, resp)
        capture = _Capture() if audited else None
        return RelayResponse(self._relay(call, ep, slot, first, events, capture), slot, media_type="text/event-stream",
                             headers={**headers, "cache-control": "no-cache"})

    async def _whole(self, call: Call, ep: Endpoint, resp: aiohttp.ClientResponse, headers: dict[str, str],
                     att: _Attempt, audited: bool = False) -> Response:
        try:
            data = await att.wait(resp.read)
        except aiohttp.ClientError as e:
            raise _Unusable(f"the answer broke off ({type(e).__name__})") from None
        self.table.end(ep)
        resp.release()  # read to its end: the connection goes back to the pool
        self.metrics.ttft.labels(call.model).observe(time.monotonic() - call.started)
        if resp.status == 200:
            usage = _usage_of(data) if not audited else self._keep_whole(call, ep, data)
            if usage is not None:
                self.on_usage(call, Usage(ep.node_id, call.model, *usage, complete=True))
        out = {k: v for k, v in resp.headers.items() if k.lower() == "content-type"}
        return Response(content=data, status_code=resp.status, headers={**out, **headers})

    def _keep_whole(self, call: Call, ep: Endpoint, data: bytes) -> tuple[int, int] | None:
        """An audited answer's usage, and its choice 0 handed to the audits (one parse for both)."""
        try:
            obj = json.loads(data)
        except ValueError:
            return None
        usage = _usage_in(obj)
        if usage is None:
            return None
        choices = obj.get("choices")
        choice = choices[0] if isinstance(choices, list) and len(choices) == 1 else None
        if isinstance(choice, dict) and self.audit is not None:
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else choice.get("text")
            if isinstance(text, str):
                self.audit.keep(call, ep, text, choice.get("finish_reason"),
                                usage[1] if isinstance(obj.get("usage"), dict) else None)
        return usage

    async def _relay(self, call: Call, ep: Endpoint, slot: _Slot, first: str,
                     events: AsyncIterator[str], capture: _Capture | None = None) -> AsyncIterator[bytes]:
        usage: tuple[int, int] | None = None
        content_events = relayed = 0
        finished = False
        # Ended by the watchdog if the head gives the PC up or the PC stays silent: by closing
        # the engine's response, which wakes the read under way. No timer per event: an
        # asyncio.timeout around each read was a fifth of the CPU per relayed event (#22).
        loop = asyncio.get_running_loop()
        att = _Attempt(ep, self.table.clock.monotonic(), answered=True)
        att.resp, att.idle_limit_s, att.last_s = slot.resp, self.stream_idle_timeout_s, loop.time()
        self.watchdog.add(att)
        try:
            event: str | None = first
            while event is not None:
                out, found, has_content = _pass_event(event, call.client_wants_usage)
                if capture is not None:
                    capture.add(event)
                if found is not None:
                    usage = found
                content_events += has_content
                if out:
                    yield out
                    relayed += 1
                    if relayed % YIELD_EVERY == 0:
                        # Events already read (many come in one read when the gateway lags)
                        # are relayed without a pause, and the loop never polls: a client that
                        # left went unnoticed for seconds (1-4 s measured on a busy machine).
                        await asyncio.sleep(0)
                if event.strip() == "[DONE]":
                    finished = True
                    break
                try:
                    event = await anext(events)
                except StopAsyncIteration:
                    event = None
                att.last_s = loop.time()
            if not finished:
                raise _Broken("the PC closed the stream without finishing it")
        except (TimeoutError, aiohttp.ClientError, _Broken, _Unusable) as e:
            self.metrics.stream_errors.labels(call.model).inc()
            why = att.reason or (e.why if isinstance(e, _Unusable) else type(e).__name__)
            log.warning("stream from PC %s for %s broke off: %s", ep.node_id, call.model, why)
            yield stream_error_event(f"the PC serving this request ({self.node_name(ep.node_id)}) stopped answering "
                                     "mid-stream; the output above is incomplete. Send the request again.")
        finally:
            self.watchdog.discard(att)
            await slot.release(finished)
            if usage is not None:
                self.on_usage(call, Usage(ep.node_id, call.model, usage[0], usage[1], complete=True))
                if finished and capture is not None and capture.ok and self.audit is not None:
                    self.audit.keep(call, ep, capture.text(), capture.finish_reason, usage[1])
            elif content_events:
                self.on_usage(call, Usage(ep.node_id, call.model, 0, content_events, complete=False))


class _Capture:
    """An audited stream's choice 0, gathered from its events as they are relayed (parsed here,
    for the drawn few only: the relay itself never parses a token event)."""

    __slots__ = ("parts", "finish_reason", "ok")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.ok = True  # False: an event not understood, or a second choice (not scored)

    def add(self, data: str) -> None:
        if not self.ok or data.strip() == "[DONE]":
            return
        try:
            obj = json.loads(data)
        except ValueError:
            self.ok = False
            return
        for choice in (obj.get("choices") or []) if isinstance(obj, dict) else []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                self.ok = False
                return
            delta = choice.get("delta")
            piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if isinstance(piece, str):
                self.parts.append(piece)
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]

    def text(self) -> str:
        return "".join(self.parts)


class _Slot:
    """A PC's slot taken by one stream and the engine's response behind it, given back once."""

    def __init__(self, table: EndpointTable, ep: Endpoint, resp: aiohttp.ClientResponse) -> None:
        self.table, self.ep, self.resp = table, ep, resp
        self.released = False

    async def release(self, finished: bool = False) -> None:
        """Safe to call again: the slot is given back once. `finished`: the stream reached
        [DONE], and its connection may go back to the pool once read to its end (a stream cut
        short closes it: that is how vLLM learns to abort the request)."""
        if not self.released:
            # The slot first: nothing after it may keep the PC looking busier to the router.
            self.released = True
            self.table.end(self.ep)
        if self.resp.closed:
            return
        if finished and self.resp.content.is_eof():
            self.resp.release()
        else:
            self.resp.close()


class RelayResponse(StreamingResponse):
    """A relayed stream that gives its PC's slot back however the response ends.

    The relay's own `finally` cannot promise that: a client that leaves before the relay is
    first stepped leaves an async generator that never ran, and one cancelled mid-stream is
    closed only when it is collected. So the response closes its relay (running its `finally`:
    the usage) and releases the slot when it is done with, and then runs `on_end` (the app's
    latency, measured to the stream's real end)."""

    def __init__(self, content: AsyncIterator[bytes], slot: _Slot, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.slot = slot
        self.on_end: list[Callable[[], None]] = []
        self.watch: _ClientWatch | None = None  # the request's listener, handed on by Proxy.forward

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            spec = tuple(map(int, scope.get("asgi", {}).get("spec_version", "2.0").split(".")))
            if spec >= (2, 4):  # a send to a client that left raises: Starlette needs no listener
                await super().__call__(scope, receive, send)
            else:
                await self._stream_watched(receive, send)
        finally:
            if self.watch is not None:
                self.watch.stop()
            try:
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            finally:
                await self.slot.release()
                for fn in self.on_end:
                    fn()

    async def _stream_watched(self, receive: Callable[[], Awaitable[Message]], send: Any) -> None:
        """The stream in the request's own task, cancelled by the request's listener when the
        client leaves (ASGI 2.3, uvicorn's: a send to a client gone returns as if sent).
        Starlette would run the stream and a listener of its own as two more tasks in an anyio
        task group, with their cancel scopes, task states and handles, and cancel one of them
        at every stream's end. At 300 streams a full collection walked 56,000 objects and
        paused the gateway 13-19 ms; without them (and without the cancelled listeners, see
        _ClientWatch.stop) 44,000 and 8-9 ms (bench/seed_scale.py, issue #22)."""
        task = asyncio.current_task()
        assert task is not None
        if self.watch is None:  # a response not made by forward: watch the client from here
            self.watch = _ClientWatch(receive, after_s=0.0)
        watch = self.watch
        streaming = True

        def cancel() -> None:
            if streaming:  # after the stream, a cancel would hit the relay's cleanup instead
                task.cancel()

        watch.on_leave = cancel
        try:
            if not watch.left:  # it may have left while the answer was on its way: then no relay
                await self.stream_response(send)
        except asyncio.CancelledError:
            if not watch.left or task.uncancel() > 0:
                raise  # not (only) the client's leaving: the server is stopping
        finally:
            streaming = False


class _Attempt:
    """One request open on one PC, which the client's leaving or the table's verdict on the PC
    can end: `end` fires the timeout of the wait under way (or the next one), and that wait
    raises why instead of TimeoutError. A timeout, not a task cancelled: no task per request
    or per event, and the engine's response is closed by the caller as for any other error."""

    __slots__ = ("ep", "sent_at", "answered", "reason", "_cm", "resp", "idle_limit_s", "last_s")

    def __init__(self, ep: Endpoint, sent_at: float, answered: bool) -> None:
        self.ep, self.sent_at, self.answered = ep, sent_at, answered  # sent_at: the table's clock
        self.reason: str | None = None  # "client" or why the PC is given up
        self._cm: asyncio.Timeout | None = None
        # A stream under way: its engine response (closed to end it), and the loop's time of its
        # last event, which the watchdog holds against idle_limit_s.
        self.resp: aiohttp.ClientResponse | None = None
        self.idle_limit_s = 0.0
        self.last_s = 0.0

    def end(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            if self._cm is not None and not self._cm.expired():
                self._cm.reschedule(0)  # a time past: it fires at the loop's next turn
            if self.resp is not None and not self.resp.closed:
                self.resp.close()  # the read under way fails at once

    async def wait(self, start: Callable[[], Awaitable[R]], limit_s: float | None = None) -> R:
        """`start()`, awaited at most `limit_s` (TimeoutError past it), or until `end`."""
        if self.reason is None:
            try:
                async with asyncio.timeout(limit_s) as cm:
                    self._cm = cm
                    try:
                        return await start()
                    finally:
                        self._cm = None
            except TimeoutError:
                if self.reason is None:
                    raise
        if self.reason == "client":
            raise _ClientGone()
        raise _Unusable(self.reason)


class _Watchdog:
    """Every SWEEP_S while requests are open, ends those the table's verdicts make pointless:
    on a PC the head has given up, and (before their first byte) on a PC alive but silent.
    A timer on the gateway's loop, armed only while something is open."""

    def __init__(self, table: EndpointTable, silent_first_byte_s: float) -> None:
        self.table, self.silent_first_byte_s = table, silent_first_byte_s
        self._open: dict[str, set[_Attempt]] = {}  # node id -> its open attempts
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def add(self, att: _Attempt) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new loop (tests run one per call): the old one's are gone
            self.stop()
            self._loop = loop
        self._open.setdefault(att.ep.node_id, set()).add(att)
        if self._timer is None:
            self._timer = loop.call_later(SWEEP_S, self._sweep)

    def discard(self, att: _Attempt) -> None:
        held = self._open.get(att.ep.node_id)
        if held is not None:
            held.discard(att)
            if not held:
                del self._open[att.ep.node_id]

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._open.clear()

    def _sweep(self) -> None:
        self._timer = None
        ended: list[tuple[_Attempt, str]] = []
        table = self.table
        loop_now = self._loop.time() if self._loop is not None else 0.0
        with table.lock:
            now = table.clock.monotonic()
            for held in self._open.values():
                for att in held:
                    if table.given_up(att.ep, now):
                        ended.append((att, "the head gave the PC up (no heartbeat, or it left the table)"))
                    elif att.idle_limit_s and loop_now - att.last_s > att.idle_limit_s:
                        ended.append((att, f"the PC sent nothing for {att.idle_limit_s:g} s"))
                    elif (not att.answered and att.ep.engine_idle
                          and att.ep.seen_at - att.sent_at >= self.silent_first_byte_s):
                        ended.append((att, "no first byte, and the PC reports its engine holds no request"))
        for att, why in ended:
            att.end(why)
        if self._open and self._loop is not None and not self._loop.is_closed():
            self._timer = self._loop.call_later(SWEEP_S, self._sweep)


class _ClientWatch:
    """Sees the client leave while the gateway waits for a PC's answer or relays a stream: once
    the body is read, the next ASGI message is `http.disconnect` (uvicorn sends it when the
    connection closes), so one listener per request ends the attempt under way (or, mid-stream,
    calls `on_leave`) at once instead of polling. The listener starts only after
    CLIENT_WATCH_AFTER_S: most short answers are back before, and pay a timer instead of a task
    (which cost 0.17-0.25 ms of CPU a request, measured)."""

    def __init__(self, receive: Callable[[], Awaitable[Message]] | None,
                 after_s: float = CLIENT_WATCH_AFTER_S) -> None:
        self.attempt: _Attempt | None = None
        self.on_leave: Callable[[], None] | None = None
        self.left = False
        self._task: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        if receive is not None:
            self._timer = asyncio.get_running_loop().call_later(after_s, self._start, receive)

    def _start(self, receive: Callable[[], Awaitable[Message]]) -> None:
        self._timer = None
        self._task = asyncio.ensure_future(self._listen(receive))

    async def _listen(self, receive: Callable[[], Awaitable[Message]]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass  # the body was read before: nothing else comes
        self.left = True
        if self.attempt is not None:
            self.attempt.end("client")
        if self.on_leave is not None:
            self.on_leave()

    def stop(self) -> None:
        """Done with: it ends nothing more. A listener under way is left to end by itself
        (uvicorn answers http.disconnect once the response is complete) rather than cancelled:
        a cancelled task leaves its error, traceback and frames in a cycle for the collector,
        two per stream at 300 streams (issue #22)."""
        self.attempt = self.on_leave = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Unusable(Exception):
    """This PC cannot take the request; nothing has reached the client yet."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class _Broken(Exception):
    pass


class _ClientGone(Exception):
    pass


async def sse_data(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The `data` of each Server-Sent Event on `content`, as the engines send them (vLLM:
    `data: {...}` and a blank line). Written here rather than taken from httpx-sse, which reads
    httpx's responses only; it follows the event-stream format (fields, multi-line data,
    comments, CR LF) but keeps no event names or ids: the relay needs neither. An event left
    without its blank line at the end of the stream is dropped, as the format says."""
    buf = b""
    async for chunk in content.iter_any():
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = buf + chunk if buf else chunk
        start = 0
        while (end := buf.find(b"\n\n", start)) >= 0:
            block = buf[start:end]
            start = end + 2
            if block.startswith(b"data: ") and b"\n" not in block:  # the usual one-line event
                yield block[6:].decode(errors="replace")  # an engine's bad byte is not the gateway's failure
                continue
            data = [line[5:].removeprefix(b" ") if line != b"data" else b""
                    for line in block.split(b"\n") if line.startswith(b"data")
                    and (len(line) == 4 or line[4:5] == b":")]
            if data:
                yield b"\n".join(data).decode(errors="replace")
        buf = buf[start:]


def _usage_of(data: bytes) -> tuple[int, int] | None:
    try:
        return _usage_in(json.loads(data))
    except ValueError:
        return None


def _usage_in(obj: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens of a parsed answer's usage (0 where missing); None: not an answer."""
    try:
        u = obj.get("usage") or {}
        return int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
    except (ValueError, AttributeError, TypeError):
        return None


def _pass_event(data: str, client_wants_usage: bool) -> tuple[bytes, tuple[int, int] | None, int]:
    """(the bytes to relay, the usage the event carries, 1 if it carries content).

    Most events are token chunks without a usage object: those are relayed without a JSON
    parse (a stream is one event per token, and every microsecond here is the gateway's)."""
    if data.strip() == "[DONE]":
        return b"data: [DONE]\n\n", None, 0
    if '"usage":{' not in data and '"choices":[' in data and '"choices":[]' not in data:
        if client_wants_usage or '"usage"' not in data:
            return f"data: {data}\n\n".encode(), None, 1
        stripped = data.replace(',"usage":null', "").replace('"usage":null,', "")
        if '"usage"' not in stripped:
            return f"data: {stripped}\n\n".encode(), None, 1
    try:
        obj: Any = json.loads(data)
    except ValueError:
        return f"data: {data}\n\n".encode(), None, 0
    if not isinstance(obj, dict):
        return f"data: {data}\n\n".encode(), None, 0
    u = obj.get("usage")
    found = (int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)) if isinstance(u, dict) else None
    has_content = 1 if obj.get("choices") else 0
    if client_wants_usage or "usage" not in obj:
        return f"data: {data}\n\n".encode(), found, has_content
    if not obj.get("choices"):
        return b"", found, 0  # the usage-only chunk the client did not ask for
    del obj["usage"]
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode(), found, has_content
