"""POST /v1/enroll: a join token traded for a node identity and an overlay address."""

from __future__ import annotations

import logging
from typing import Callable

from fastapi import APIRouter
from pydantic import BaseModel, Field

from garage_node.core.errors import CONFLICTS
from garage_node.core.wire import EnrollReply, RegionFacts, encode
from garage_node.head.api.common import (SECRET, TOKEN_ID, ApiError, StrictNodeReport, WgPublicKey, region_fields,
                                         responses)
from garage_node.head.registry import EnrollError, Registry

log = logging.getLogger(__name__)


class EnrollRequest(BaseModel):
    """The join token's id and secret (from the `gn1.` token), the node's name, and the public
    half of the WireGuard key the node made and stored before this call. The same token and
    key again, before the node's first heartbeat, return the same identity (a crash between
    the head's answer and the node storing it must not spend the token)."""

    token_id: str = Field(pattern=TOKEN_ID, description="the join token's id")
    secret: str = Field(pattern=SECRET, repr=False, description="the join token's secret (base64url)")
    name: str = Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    wg_public_key: WgPublicKey
    report: StrictNodeReport | None = None


def router(registry: Registry, facts: RegionFacts, on_change: Callable[[], None],
           ray_token: Callable[[], str] = lambda: "", engine_key: Callable[[str], str] = lambda _: "") -> APIRouter:
    """`engine_key(node_id)`: the API key the node's engine will demand (the gateway's)."""
    r = APIRouter()

    @r.post("/v1/enroll", summary="Trade a join token for a node identity and an overlay address",
            responses=responses(401, 409, 413, 422))
    def enroll(req: EnrollRequest) -> EnrollReply:
        try:
            result = registry.enroll(req.token_id, req.secret, req.name, facts.region, req.wg_public_key)
        except EnrollError as e:
            status = 409 if e.code in CONFLICTS else 401
            raise ApiError(status, e.code, str(e)) from None
        if req.report is not None:
            registry.record_heartbeat(result.node.id, encode(req.report), confirm=False)
        again = " again (same token and key; its first answer was lost)" if result.resumed else ""
        log.info("enrolled node %s (%s) at %s%s", result.node.id, result.node.name, result.node.overlay_ip, again)
        on_change()
        return EnrollReply(node_id=result.node.id, credential=result.credential, overlay_ip=result.node.overlay_ip,
                           ray_token=ray_token(), engine_api_key=engine_key(result.node.id), **region_fields(facts))

    return r

