"""The head's control API (HTTPS, FastAPI): enrollment and heartbeats.

Errors are JSON `{"error": CODE, "message": TEXT}`, where TEXT tells a person what to do.
The OpenAPI description is served at /openapi.json and /docs.
"""

from __future__ import annotations

import base64
import binascii
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field, field_validator

from .raycluster import Versions
from .registry import EnrollError, Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubInfo:
    """What a node needs to reach the hub, fixed for the life of the head process."""

    ip: str
    prefix_len: int
    public_key: str
    endpoint: str
    ray_address: str
    region: str
    heartbeat_s: float
    versions: Versions


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class EnrollRequest(BaseModel):
    token_id: str = Field(min_length=1, max_length=64)
    secret: str = Field(min_length=16, max_length=256, repr=False)
    name: str = Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    wg_public_key: str
    report: dict[str, Any] = Field(default_factory=dict)

    @field_validator("wg_public_key")
    @classmethod
    def _is_wg_key(cls, v: str) -> str:
        try:
            ok = len(base64.b64decode(v, validate=True)) == 32
        except binascii.Error:
            ok = False
        if not ok:
            raise ValueError("must be a WireGuard public key (base64 of 32 bytes)")
        return v


class HeartbeatRequest(BaseModel):
    report: dict[str, Any] = Field(default_factory=dict)


def create_app(registry: Registry, hub: HubInfo, ca_pem: bytes, on_change: Callable[[], None],
               on_ready: Callable[[], None] = lambda: None) -> FastAPI:
    """`on_change` is called after an enrollment so the hub adds the peer at once;
    `on_ready` once the server listens (the head tells systemd READY then)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        on_ready()
        yield

    app = FastAPI(title="garage-node head", version="1", docs_url="/docs", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.code, "message": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Name the field and the problem; never echo the input (it may hold a secret).
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": "invalid_request", "message": problems}, status_code=422)

    @app.get("/v1/ca", response_class=PlainTextResponse, summary="The head's CA certificate (PEM); nodes check it against their token's pin")
    def get_ca() -> str:
        return ca_pem.decode()

    @app.get("/v1/health", summary="Liveness of the control API")
    def health() -> dict[str, Any]:
        return {"ok": True, "region": hub.region, "versions": hub.versions.__dict__}

    @app.post("/v1/enroll", summary="Trade a join token for a node identity and an overlay address")
    def enroll(req: EnrollRequest) -> dict[str, Any]:
        try:
            result = registry.enroll(req.token_id, req.secret, req.name, hub.region, req.wg_public_key)
        except EnrollError as e:
            status = 409 if e.code in ("key_in_use", "network_full") else 401
            raise ApiError(status, e.code, str(e)) from None
        registry.record_heartbeat(result.node.id, req.report)
        log.info("enrolled node %s (%s) at %s", result.node.id, result.node.name, result.node.overlay_ip)
        on_change()
        return {
            "node_id": result.node.id,
            "credential": result.credential,
            "overlay_ip": result.node.overlay_ip,
            **_hub_fields(hub),
        }

    @app.post("/v1/nodes/{node_id}/heartbeat", summary="A node reports its state; the head answers with its own view")
    def heartbeat(node_id: str, req: HeartbeatRequest, authorization: str = Header(default="")) -> dict[str, Any]:
        node = registry.authenticate(node_id, authorization.removeprefix("Bearer ").strip())
        if node is None:
            raise ApiError(401, "unauthorized", "the head does not recognise this node's credential: join again with a new token")
        if node.revoked:
            raise ApiError(403, "revoked", "the operator revoked this node: it needs a new join token to rejoin")
        registry.record_heartbeat(node_id, req.report)
        return {"node_id": node_id, "state": "active", "ray_alive": node.ray_alive,
                "ray_checked_at": node.ray_checked_at, **_hub_fields(hub)}

    return app


def _hub_fields(hub: HubInfo) -> dict[str, Any]:
    return {
        "prefix_len": hub.prefix_len,
        "hub": {"ip": hub.ip, "public_key": hub.public_key, "endpoint": hub.endpoint},
        "ray_address": hub.ray_address,
        "region": hub.region,
        "heartbeat_s": hub.heartbeat_s,
        "versions": {"ray": hub.versions.ray, "python": hub.versions.python},
    }
