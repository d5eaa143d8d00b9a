"""The gateway's HTTP API: OpenAI's `/v1/chat/completions`, `/v1/completions`,
`/v1/embeddings` and `/v1/models`, answered by the PCs of the region.

Every request: the key (401 unknown, revoked or expired), the body (400 when it is not a JSON
object with a model), the model (held while the head places a model of the region's catalog
that no PC serves yet, 503 with Retry-After past [gateway] hold_s; 404 when no PC serves it and
it is not in the catalog, or the key may not use it — with the list it may use), the key's
limits (429 with Retry-After), then the proxy (503 with Retry-After when no PC can take it).
Answers are vLLM's own, with `x-garage-node` naming the PC. Each request known to the gateway
counts towards its model's demand (demand.py), which the head's placement reads.

The three POST endpoints are served by a plain ASGI handler in front of FastAPI (GatewayApp):
FastAPI's routing, dependency solving and its five middlewares were a fifth of the gateway's CPU
per request at 600 requests/s (py-spy, issue #22) and add nothing these endpoints use. The rest
(/v1/models, the 404 and 405 answers, the lifespan) stays with FastAPI."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from garage_node.head.gateway.admission import Admission
from garage_node.head.gateway.demand import Demand
from garage_node.head.gateway.errors import ClientGone, GatewayError
from garage_node.head.gateway.keys import ApiKey
from garage_node.head.gateway.metrics import GatewayMetrics
from garage_node.head.gateway.proxy import Call, Proxy, RelayResponse
from garage_node.head.gateway.router import Router
from garage_node.head.gateway.table import EndpointTable

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]

log = logging.getLogger(__name__)


class GatewayParts(Protocol):
    """What the HTTP API uses of the gateway (gateway.Gateway is one)."""

    table: EndpointTable
    router: Router
    proxy: Proxy
    metrics: GatewayMetrics
    max_body_bytes: int
    max_in_flight: int
    max_queue_age_s: float
    demand: Demand

    def authenticate(self, authorization: str) -> ApiKey: ...

    def known(self, model: str) -> bool: ...

    def admit_key(self, key: ApiKey, model: str) -> None: ...

    async def hold(self, key: ApiKey, model: str, gone: Callable[[], Awaitable[bool]]) -> None: ...

    def admit(self, key: ApiKey, model: str) -> None: ...


class GatewayApp:
    """The gateway's ASGI app: the POST endpoints through the admission limit to `handle`,
    everything else to FastAPI (`fallback`)."""

    def __init__(self, gw: GatewayParts, fallback: FastAPI,
                 handle: Callable[[Request, str], Awaitable[Response]]) -> None:
        self.fallback, self.handle = fallback, handle
        # Before anything else is done for a request: past the gateway's capacity, 503 at once.
        self.admission = Admission(self._endpoint, max_in_flight=gw.max_in_flight,
                                   max_queue_age_s=gw.max_queue_age_s, paths=ENDPOINTS,
                                   refused=lambda reason: gw.metrics.refused.labels(reason).inc())
        gw.metrics.watch_admission(self.admission.governor)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in ENDPOINTS:
            await self.admission(scope, receive, send)
        else:
            await self.fallback(scope, receive, send)

    async def _endpoint(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await self.handle(Request(scope, receive), scope["path"])
        except GatewayError as e:
            response = e.response()
        except Exception:
            # What FastAPI's error middleware did: the request fails, the gateway serves on.
            log.exception("the gateway failed on a %s request", scope["path"])
            response = GatewayError(500, "internal_error", "the gateway failed on this request; it is "
                                    "logged at the head. Send it again, or tell the region's operator").response()
        relaying = isinstance(response, RelayResponse)  # answered: its first event is in, the rest is relayed
        self.admission.relaying += relaying
        try:
            await response(scope, receive, send)
        finally:
            self.admission.relaying -= relaying


def create_gateway_app(gw: GatewayParts) -> GatewayApp:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        auditor = getattr(gw, "auditor", None)
        if auditor is not None:
            auditor.gateway_loop = asyncio.get_running_loop()  # canaries go through this loop's proxy
        yield
        await gw.proxy.close()

    app = FastAPI(title="garage-node gateway", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)

    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(404)
    async def _not_found(request: Request, _exc: Exception) -> JSONResponse:
        return GatewayError(404, "unknown_url", f"{request.url.path} is not an endpoint of this API; it serves "
                            f"{', '.join(ENDPOINTS)} and /v1/models").response()

    @app.exception_handler(405)
    async def _wrong_method(request: Request, _exc: Exception) -> JSONResponse:
        return GatewayError(405, "method_not_allowed",
                            f"{request.method} is not allowed on {request.url.path}").response()

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        key = gw.authenticate(request.headers.get("authorization", ""))
        now = int(time.time())
        data = [{"id": m.model, "object": "model", "created": now, "owned_by": "garage-node",
                 "pcs_serving": m.pcs_serving, "pcs_known": m.pcs_known}
                for m in gw.table.models() if key.allows(m.model)]
        return JSONResponse({"object": "list", "data": data})

    async def handle(request: Request, path: str) -> Response:
        started = time.monotonic()
        key = gw.authenticate(request.headers.get("authorization", ""))
        try:
            body, size = await _json_body(request, gw.max_body_bytes)
        except ClientDisconnect:  # the client left while sending its body: no one to answer, no traceback
            gw.metrics.requests.labels("", key.name, "499").inc()
            return Response(status_code=499)
        model: str = body["model"]  # _json_body refused a body without one
        status = "error"
        streaming = False
        counted = gw.known(model)  # demand: only models served or in the region's catalog
        # A name nobody serves gets one label for all: clients choose names, and a series per
        # made-up name would grow the head's memory and Prometheus without bound.
        label = model if counted else "(unknown)"
        opened = False

        def ended() -> None:
            gw.metrics.latency.labels(label).observe(time.monotonic() - started)
            if opened:
                gw.demand.closed(model)

        try:
            if counted:
                gw.demand.arrived(model, size, body.get("max_tokens"))
            gw.admit_key(key, model)  # before any hold: a key over its limits waits for nothing
            await gw.hold(key, model, request.is_disconnected)
            gw.admit(key, model)
            call = _call(path, body, key, started, gw.router)
            if counted:
                gw.demand.opened(model)
                opened = True
            response = await gw.proxy.forward(call, request)
            status = str(response.status_code)
            if isinstance(response, RelayResponse):
                streaming = True
                response.on_end.append(ended)  # a stream ends after this returns
            return response
        except ClientGone:  # left while held: nothing was sent to a PC
            status = "499"
            return Response(status_code=499)
        except GatewayError as e:
            status = str(e.status)
            if counted and e.status == 503 and e.code != "model_loading":  # hold() counted its own
                gw.demand.unserved(model)
            raise
        finally:
            gw.metrics.requests.labels(label, key.name, status).inc()
            if not streaming:
                ended()

    # Declared so that FastAPI answers other methods on them with 405; POST never reaches these.
    @app.post("/v1/chat/completions")
    @app.post("/v1/completions")
    @app.post("/v1/embeddings")
    async def _served_by_gateway_app(request: Request) -> Response:
        return await handle(request, request.url.path)

    return GatewayApp(gw, app, handle)


async def _json_body(request: Request, max_bytes: int) -> tuple[dict[str, Any], int]:
    """The body as a JSON object with a model, and its size in bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise GatewayError(413, "body_too_large", f"the request body is over {max_bytes} bytes")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise GatewayError(413, "body_too_large", f"the request body is over {max_bytes} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise GatewayError(400, "invalid_json", "the request body is not valid JSON") from None
    except RecursionError:  # nested past the parser's limit (a 10 KB body does it): not a 500
        raise GatewayError(400, "invalid_json", "the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "invalid_body", "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model or len(model) > 256:
        raise GatewayError(400, "missing_model", "the request body needs a 'model': the name of a model "
                           "(GET /v1/models lists those served)", param="model")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise GatewayError(400, "invalid_stream", "'stream' must be true or false", param="stream")
    return body, len(raw)


def _call(path: str, body: dict[str, Any], key: ApiKey, started: float, router: Router) -> Call:
    stream = bool(body.get("stream")) and path != "/v1/embeddings"
    options = body.get("stream_options")
    wants_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    if stream:
        # vLLM sends its usage chunk only when asked; the ledger needs it for every stream.
        body = {**body, "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True}}
    return Call(path=path, model=body["model"], body=json.dumps(body).encode(), stream=stream,
                client_wants_usage=wants_usage, blocks=router.blocks(_prompt_text(body)), key=key,
                started=started, request=body)


def _prompt_text(body: dict[str, Any]) -> str:
    """The prompt as one string, for prefix affinity only (never logged)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
            parts.append(f"{m.get('role', '')}:{content if isinstance(content, str) else ''}\n")
        return "".join(parts)
    for field in ("prompt", "input"):
        value = body.get(field)
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and isinstance(value[0], str):
            return value[0]
        if isinstance(value, list) and value and isinstance(value[0], int):
            return ",".join(str(t) for t in value[:4096])
    return ""
