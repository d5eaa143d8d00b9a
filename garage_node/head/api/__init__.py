"""The head's control API (HTTPS, FastAPI): enrollment and heartbeats.

Errors are JSON `{"error": CODE, "message": TEXT}`, where TEXT tells a person what to do.
Bodies are the typed messages of core.wire, validated here by pydantic; the OpenAPI
description is served at /openapi.json and /docs.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from garage_node.core.errors import ErrorCode
from garage_node.core.wire import HeartbeatExtras, RegionFacts
from garage_node.head.api import enroll, nodes
from garage_node.head.api.common import ApiError
from garage_node.head.api.limits import BodyLimit
from garage_node.head.api.timing import HeartbeatTimer
from garage_node.head.registry import Registry
from garage_node.head.reports import Reports


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class ApiHooks:
    """What the control API calls out to besides the registry, each with a default that does
    nothing, so a test names only those it watches."""

    # After an enrollment or a WireGuard key change: the hub adds the peer at once.
    on_change: Callable[[], None] = _nothing
    # Bracket the server's life: the head's service runs between them.
    on_startup: Callable[[], None] = _nothing
    on_shutdown: Callable[[], None] = _nothing
    # The Ray cluster token enrolled nodes receive (read again after a rotation).
    ray_token: Callable[[], str] = lambda: ""
    # Every accepted heartbeat's report goes to its subscribers (the gateway, the fleet page).
    reports: Reports | None = None
    # node id -> extra fields of its heartbeat answer (its engine key, tokens served).
    node_extras: Callable[[str], HeartbeatExtras] = lambda _node_id: HeartbeatExtras()
    # (seconds, HTTP status) of each heartbeat answered: the gateway's metrics.
    on_heartbeat_s: Callable[[float, int], None] | None = None


def create_app(registry: Registry, facts: RegionFacts, ca_pem: bytes, hooks: ApiHooks | None = None,
               max_body_bytes: int = 32768) -> FastAPI:
    """A request body over `max_body_bytes` is refused with 413 before anything parses it."""
    hooks = hooks or ApiHooks()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        hooks.on_startup()
        try:
            yield
        finally:
            hooks.on_shutdown()

    app = FastAPI(title="garage-node head", version="1", docs_url="/docs", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if hooks.on_heartbeat_s is not None:
        app.add_middleware(HeartbeatTimer, observe=hooks.on_heartbeat_s)  # outermost: the body limit's read counts

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.code, "message": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI answers 400 to a body it cannot even decode (not UTF-8, not JSON): for a
        # client that is the same mistake as any other malformed body, so the same 422.
        if exc.status_code == 400:
            return JSONResponse({"error": ErrorCode.INVALID_REQUEST, "message": "the request body is not valid JSON"},
                                status_code=422)
        return JSONResponse({"error": f"http_{exc.status_code}", "message": str(exc.detail)},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Name the field and the problem; never echo the input (it may hold a secret).
        errors = exc.errors()
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in errors[:5])
        if len(errors) > 5:
            problems += f"; and {len(errors) - 5} more"
        return JSONResponse({"error": ErrorCode.INVALID_REQUEST, "message": problems}, status_code=422)

    @app.get("/v1/ca", response_class=PlainTextResponse, summary="The head's CA certificate (PEM); nodes check it against their token's pin")
    def get_ca() -> str:
        return ca_pem.decode()

    @app.get("/v1/health", summary="Liveness of the control API")
    def health() -> dict[str, Any]:
        return {"ok": True, "region": facts.region, "versions": {"ray": facts.versions.ray, "python": facts.versions.python}}

    node_extras = hooks.node_extras
    app.include_router(enroll.router(registry, facts, hooks.on_change, hooks.ray_token,
                                     lambda node_id: node_extras(node_id).engine_api_key))
    app.include_router(nodes.router(registry, facts, hooks.ray_token, hooks.on_change, hooks.reports, node_extras))
    return app
