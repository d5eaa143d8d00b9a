"""POST /v1/enroll: a join token traded for a node identity and an overlay address."""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Callable

from fastapi import APIRouter
from pydantic import BaseModel, Field, field_validator

from garage_node.core.wire import EnrollReply, NodeReport, RegionFacts, encode
from garage_node.head.api.common import ApiError, region_fields
from garage_node.head.registry import EnrollError, Registry

log = logging.getLogger(__name__)


class EnrollRequest(BaseModel):
    token_id: str = Field(min_length=1, max_length=64)
    secret: str = Field(min_length=16, max_length=256, repr=False)
    name: str = Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    wg_public_key: str
    report: NodeReport | None = None

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


def router(registry: Registry, facts: RegionFacts, on_change: Callable[[], None]) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/enroll", summary="Trade a join token for a node identity and an overlay address")
    def enroll(req: EnrollRequest) -> EnrollReply:
        try:
            result = registry.enroll(req.token_id, req.secret, req.name, facts.region, req.wg_public_key)
        except EnrollError as e:
            status = 409 if e.code in ("key_in_use", "network_full") else 401
            raise ApiError(status, e.code, str(e)) from None
        if req.report is not None:
            registry.record_heartbeat(result.node.id, encode(req.report))
        log.info("enrolled node %s (%s) at %s", result.node.id, result.node.name, result.node.overlay_ip)
        on_change()
        return EnrollReply(node_id=result.node.id, credential=result.credential, overlay_ip=result.node.overlay_ip,
                           **region_fields(facts))

    return r

