"""Spill-over: an ASGI layer in front of the gateway's app.

A request whose model some local PC can take (healthy, not draining, not saturated) goes to
the gateway as before; this layer only reads its body once to learn the model and adds
`x-garage-region` to the answer. Otherwise, before anything has been sent to any PC, the
request is replayed to the nearest region whose round trip plus time to first token fits
[federation] budget_ms (capacity.py), head to head with the federation secret; the answer
comes back as that region sent it, with `x-garage-region` (who served it), `x-garage-node`
(its PC) and `x-garage-spilled-from`. A region that fails before its answer begins is passed
over for the next. No region fits: 429 with Retry-After, at once. A model no region serves
goes to the gateway as before (which holds it while the head places it, or answers 404).

A replayed request is served where it lands, never spilled again (no loops), and is counted
there: that region's ledger and usage records, under the customer's own key (keys are the
same in every region)."""

from __future__ import annotations

import hmac
import json
import time
from typing import Any, Awaitable, Callable

import httpx
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from garage_node.head.federation.capacity import PeerView, TtftWindow, serves_locally
from garage_node.head.gateway.errors import GatewayError
from garage_node.head.gateway.keys import ApiKey
from garage_node.head.gateway.table import EndpointTable

ENDPOINTS = frozenset(("/v1/chat/completions", "/v1/completions", "/v1/embeddings"))
SPILLED_FROM = b"x-garage-spilled-from"
REGION_AUTH = b"x-garage-region-auth"
PASS_STATUSES = (429, 502, 503, 504)  # the region could not take it after all: the next one
RETRY_AFTER_S = 2
KEEP = (b"content-type", b"x-garage-node", b"x-garage-node-id", b"x-garage-region", b"cache-control", b"retry-after")


class SpillOver:
    def __init__(self, app: ASGIApp, *, region: str, secret: str, table: EndpointTable, peers: PeerView,
                 gateways: dict[str, str], authenticate: Callable[[str], ApiKey], budget_ms: float, pc_slots: int,
                 max_body_bytes: int, ttft: TtftWindow, degraded: Callable[[], bool],
                 admit: Callable[[ApiKey], Awaitable[None]] | None = None, connect_timeout_s: float = 3.0) -> None:
        """`admit(key)`: raises GatewayError when the key may not be served here now (its quota
        lease, leases.py); called for every request of a key with a quota."""
        self.app, self.region, self._secret = app, region, secret
        self.table, self.peers, self.gateways = table, peers, gateways
        self.authenticate, self.budget_ms, self.pc_slots = authenticate, budget_ms, pc_slots
        self.max_body_bytes, self.ttft, self.degraded = max_body_bytes, ttft, degraded
        self.admit = admit
        self._timeout = httpx.Timeout(connect=connect_timeout_s, read=120.0, write=30.0, pool=5.0)
        self._http: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        # Kept-alive connections to the other heads: a replay pays one round trip, not a handshake.
        if self._http is None or self._http.is_closed:
            self._http = httpx.AsyncClient(timeout=self._timeout,
                                           limits=httpx.Limits(max_keepalive_connections=32, keepalive_expiry=60))
        return self._http

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in ENDPOINTS:
            await self.app(scope, receive, self._tagged(send))
            return
        headers = dict(scope["headers"])
        if SPILLED_FROM in headers:
            if not hmac.compare_digest(headers.get(REGION_AUTH, b""), self._secret.encode()):
                await _error(send, GatewayError(401, "invalid_region_credential",
                                                "a replayed request without the federation's credential"))
                return
            refused = await self._admit(headers.get(b"authorization", b"").decode("latin-1"))
            if refused is not None:  # served here counts against this region's lease too
                await _error(send, refused)
                return
            await self.app(scope, receive, self._tagged(send))  # served here, never spilled again
            return
        body, complete = await _read_body(receive, self.max_body_bytes)
        model = _model_of(body) if complete else None
        replay = _replayer(body, complete, receive)
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if model is not None:
            refused = await self._admit(auth)
            if refused is not None:
                await _error(send, refused)
                return
        if model is None or serves_locally(self.table, model, self.pc_slots):
            await self.app(scope, replay, self._tagged(send, model))
            return
        try:
            key = self.authenticate(auth)
        except GatewayError as e:
            await _error(send, e)
            return
        if not key.allows(model):
            await self.app(scope, replay, self._tagged(send, model))  # the gateway says which it may use
            return
        now = time.monotonic()
        for choice in self.peers.choose(model, self.budget_ms, now):
            if await self._replay(choice.region, scope, auth, body, send):
                return
        with self.table.lock:
            here = bool(self.table.pool(model))
        if here or self.peers.known_elsewhere(model, now):
            await _error(send, GatewayError(
                429, "no_capacity", f"every PC serving {model} in this region is busy or unavailable, and no other "
                "region can answer within the latency budget; retry shortly", retry_after_s=RETRY_AFTER_S))
            return
        await self.app(scope, replay, self._tagged(send, model))  # nobody serves it: the gateway's hold or 404

    async def _admit(self, auth: str) -> GatewayError | None:
        """Why a key with a quota may not be served here now (no lease left), or None."""
        if self.admit is None:
            return None
        try:
            key = self.authenticate(auth)  # cached; an unknown key is the gateway's to refuse, as ever
        except GatewayError:
            return None
        if key.quota_tokens is None:
            return None
        try:
            await self.admit(key)
        except GatewayError as e:
            return e
        return None

    async def _replay(self, region: str, scope: Scope, auth: str, body: bytes, send: Send) -> bool:
        """The request to `region`'s gateway; True once its answer is under way to the client."""
        url = self.gateways[region] + scope["path"]
        req = self.client.build_request("POST", url, content=body, headers={
            "authorization": auth, "content-type": "application/json",
            SPILLED_FROM.decode(): self.region, REGION_AUTH.decode(): self._secret})
        try:
            resp = await self.client.send(req, stream=True)
        except httpx.TransportError:
            return False
        try:
            if resp.status_code in PASS_STATUSES:
                return False
            out = [(k, v) for k, v in resp.headers.raw if k.lower() in KEEP]
            if not any(k.lower() == b"x-garage-region" for k, _ in out):
                out.append((b"x-garage-region", region.encode()))
            out.append((SPILLED_FROM, self.region.encode()))
            await send({"type": "http.response.start", "status": resp.status_code, "headers": out})
            try:
                async for chunk in resp.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.TransportError:
                pass  # the other region broke off mid-answer: what came is what the client gets
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return True
        finally:
            await resp.aclose()

    def _tagged(self, send: Send, model: str | None = None) -> Send:
        """The gateway's answer with this region's name (and the federation's state) added;
        the time to its first byte measured for the model's summary."""
        started = time.monotonic()
        extra = [(b"x-garage-region", self.region.encode())]
        if self.degraded():
            extra.append((b"x-garage-federation", b"degraded"))

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
                if model is not None and message["status"] == 200:
                    self.ttft.add(model, (time.monotonic() - started) * 1000.0)
            await send(message)
        return tagged

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, bool]:
    """The body, or what was read of it once past `limit` (False: the gateway refuses it)."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return bytes(body), False
        body += message.get("body", b"")
        if len(body) > limit:
            return bytes(body), False
        if not message.get("more_body", False):
            return bytes(body), True


def _replayer(body: bytes, complete: bool, receive: Receive) -> Receive:
    """The request's receive channel again, with the body already read handed over first."""
    given = False

    async def again() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": not complete}
        return await receive()
    return again


def _model_of(body: bytes) -> str | None:
    try:
        obj: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    model = obj.get("model") if isinstance(obj, dict) else None
    return model if isinstance(model, str) and model else None


async def _error(send: Send, e: GatewayError) -> None:
    r = e.response()
    await send({"type": "http.response.start", "status": r.status_code, "headers": r.raw_headers})
    await send({"type": "http.response.body", "body": r.body, "more_body": False})
