"""POST /v1/nodes/{id}/heartbeat: a node reports its state; the head answers with its own view."""

from __future__ import annotations

from fastapi import APIRouter, Header
from pydantic import BaseModel

from garage_node.core.wire import HeartbeatReply, NodeReport, RegionFacts, encode
from garage_node.head.api.common import ApiError, region_fields
from garage_node.head.registry import Registry


class HeartbeatRequest(BaseModel):
    report: NodeReport


def router(registry: Registry, facts: RegionFacts) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/nodes/{node_id}/heartbeat", summary="A node reports its state; the head answers with its own view")
    def heartbeat(node_id: str, req: HeartbeatRequest, authorization: str = Header(default="")) -> HeartbeatReply:
        node = registry.authenticate(node_id, authorization.removeprefix("Bearer ").strip())
        if node is None:
            raise ApiError(401, "unauthorized", "the head does not recognise this node's credential: join again with a new token")
        if node.revoked:
            raise ApiError(403, "revoked", "the operator revoked this node: it needs a new join token to rejoin")
        registry.record_heartbeat(node_id, encode(req.report))
        return HeartbeatReply(node_id=node_id, ray_alive=node.ray_alive, ray_checked_at=node.ray_checked_at,
                              **region_fields(facts))

    return r
