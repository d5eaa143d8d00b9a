"""A node's own routes, with its credential (`Authorization: Bearer ...`): heartbeats (the
node reports its state; the head answers with its own view) and credential renewal."""

from __future__ import annotations

import logging
from typing import Annotated, Callable

from fastapi import APIRouter, Depends, Path
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from garage_node.core.errors import ErrorCode
from garage_node.core.wire import CredentialReply, HeartbeatExtras, HeartbeatReply, RegionFacts, encode
from garage_node.head.api.common import (CREDENTIAL_FORMAT, NODE_ID, ApiError, StrictNodeReport, WgPublicKey,
                                         region_fields, responses)
from garage_node.head.registry import Auth, EnrollError, Registry
from garage_node.head.reports import Reports

log = logging.getLogger(__name__)

bearer = HTTPBearer(auto_error=False, bearerFormat=CREDENTIAL_FORMAT,
                    description="the per-node credential the head gave at enrollment or renewal")


NodeIdPath = Annotated[str, Path(pattern=NODE_ID, description="the node's id, e.g. n0123456789")]


class HeartbeatRequest(BaseModel):
    report: StrictNodeReport


class CredentialRequest(BaseModel):
    """`wg_public_key`: the public half of a new WireGuard key the node made and stored before
    this call; the hub swaps the node's peer to it. Absent: the node keeps its key."""

    wg_public_key: WgPublicKey | None = None


def router(registry: Registry, facts: RegionFacts, ray_token: Callable[[], str] = lambda: "",
           on_change: Callable[[], None] = lambda: None, reports: Reports | None = None,
           node_extras: Callable[[str], HeartbeatExtras] = lambda _: HeartbeatExtras()) -> APIRouter:
    """`reports` gets every accepted heartbeat's report; `node_extras(node_id)` adds the
    gateway's part of the answer (the engine's API key, the tokens the PC served) and the
    placement's (the PC's assignment, head/placement.py)."""
    r = APIRouter()

    def authenticated(node_id: str, creds: HTTPAuthorizationCredentials | None) -> Auth:
        auth = registry.authenticate(node_id, creds.credentials if creds else "")
        # Unknown node, wrong credential, no credential: one answer, so ids cannot be probed.
        if auth is None:
            raise ApiError(401, ErrorCode.UNAUTHORIZED, "the head does not recognise this node's credential: join again with a new token")
        if auth.node.revoked:
            raise ApiError(403, ErrorCode.REVOKED, "the operator revoked this node: it needs a new join token to rejoin")
        if auth.expires_in_s <= 0:
            raise ApiError(401, ErrorCode.CREDENTIAL_EXPIRED,
                           "this node's credential has expired (a running node renews it by itself; one that was off "
                           "for longer than its lifetime must join again with a new token)")
        return auth

    @r.post("/v1/nodes/{node_id}/heartbeat", summary="A node reports its state; the head answers with its own view",
            responses=responses(401, 403, 413, 422))
    def heartbeat(req: HeartbeatRequest, node_id: NodeIdPath,
                  creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> HeartbeatReply:
        auth = authenticated(node_id, creds)
        node = auth.node
        registry.record_heartbeat(node_id, encode(req.report))
        if reports is not None:
            reports.publish(node_id, req.report)
        extras = node_extras(node_id)
        return HeartbeatReply(node_id=node_id, ray_alive=node.ray_alive, ray_checked_at=node.ray_checked_at,
                              ray_token=ray_token(), ray_cluster_id=registry.ray_cluster_id,
                              ray_dead=registry.ray_dead(node_id),
                              credential_expires_in_s=round(auth.expires_in_s, 1),
                              credential_lifetime_s=auth.lifetime_s, engine_api_key=extras.engine_api_key,
                              tokens_served=extras.tokens_served, assignment=extras.assignment,
                              update_target=extras.update_target,
                              quarantine=extras.quarantine,
                              **region_fields(facts))

    @r.post("/v1/nodes/{node_id}/credential",
            summary="Renew the node's credential (and, if asked, its WireGuard key); the old credential stays "
                    "valid for a short overlap", responses=responses(401, 403, 409, 413, 422))
    def renew_credential(req: CredentialRequest, node_id: NodeIdPath,
                         creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> CredentialReply:
        auth = authenticated(node_id, creds)
        assert creds is not None
        try:
            renewal = registry.renew_credential(auth, creds.credentials, req.wg_public_key)
        except EnrollError as e:
            raise ApiError(409, e.code, str(e)) from None
        if renewal.key_changed:
            on_change()  # the hub swaps the peer's key now, not at the next periodic sync
        log.info("node %s renewed its credential%s", node_id, " and WireGuard key" if renewal.key_changed else "")
        return CredentialReply(node_id=node_id, credential=renewal.credential,
                               credential_expires_in_s=renewal.expires_in_s, credential_lifetime_s=renewal.lifetime_s,
                               wg_public_key=renewal.node.wg_public_key)

    return r
