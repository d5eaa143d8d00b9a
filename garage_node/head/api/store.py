"""The head's model store on the control API: enrolled PCs fetch a model's manifest and its
files (with HTTP range requests, so a broken download resumes where it stopped).

Only enrolled, unrevoked nodes with a valid credential are answered, authenticated as their
heartbeats are (`Authorization: Bearer <credential>`), with the node id in the X-Garage-Node
header (a heartbeat has it in its URL). Only the files a model's manifest lists can be named, so
no path can reach anything else on the head.
"""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any, Callable

from fastapi import APIRouter, Depends, Header, Path
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from garage_node.core import modelfiles
from garage_node.core.errors import ErrorCode
from garage_node.head.api.common import CREDENTIAL_FORMAT, NODE_ID, ApiError, ErrorBody, responses
from garage_node.head.modelstore import ModelStore
from garage_node.head.registry import Registry

log = logging.getLogger(__name__)

bearer = HTTPBearer(auto_error=False, bearerFormat=CREDENTIAL_FORMAT,
                    description="the per-node credential the head gave at enrollment or renewal")

ModelNamePath = Annotated[str, Path(description="the model's catalog name, e.g. qwen2.5-7b")]
NodeHeader = Annotated[str | None, Header(alias=modelfiles.NODE_HEADER, description="the node's id, e.g. n0123456789")]

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "the store does not hold this model, or the model has no such file"}}


def node_only(registry: Registry, what: str = "the model store") -> Callable[..., str]:
    """A FastAPI dependency: the node's id if it may fetch files (enrolled, not revoked, a valid
    credential); refuses (401/403) as the heartbeat does. The releases' routes use it too."""

    def check(node_id: NodeHeader = None, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        auth = None
        if node_id is not None and re.fullmatch(NODE_ID, node_id) and creds is not None:
            auth = registry.authenticate(node_id, creds.credentials)
        if auth is None:
            raise ApiError(401, ErrorCode.UNAUTHORIZED,
                           f"{what} answers enrolled nodes only: send the node's credential "
                           f"(Authorization: Bearer) and its id ({modelfiles.NODE_HEADER})")
        if auth.node.revoked:
            raise ApiError(403, ErrorCode.REVOKED, "the operator revoked this node: it needs a new join token to rejoin")
        if auth.expires_in_s <= 0:
            raise ApiError(401, ErrorCode.CREDENTIAL_EXPIRED,
                           "this node's credential has expired: it renews it with its heartbeats, or joins again")
        return auth.node.id

    return check


def router(registry: Registry, store: ModelStore) -> APIRouter:
    r = APIRouter()
    node_only_ = node_only(registry)

    def not_stored(name: str) -> ApiError:
        return ApiError(404, "http_404", f"the head's model store does not hold model {name[:100]!r}: the operator adds "
                                         f"it with `garage-node head weights add {name[:100]} DIR`; until then PCs "
                                         "fetch it from the model hub")

    @r.get(modelfiles.STORE_PREFIX + "{name}/" + modelfiles.MANIFEST,
           summary="A stored model's manifest: its files with size and SHA-256, and a digest of them",
           responses={**responses(401, 403, 422), **_NOT_FOUND})
    def manifest(name: ModelNamePath, node_id: str = Depends(node_only_)) -> dict[str, Any]:
        m = store.manifest(name)
        if m is None:
            raise not_stored(name)
        log.info("node %s fetches the manifest of %s", node_id, name)
        return {"name": m.name, "digest": m.digest, "added_at": m.added_at,
                "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in m.files]}

    @r.get(modelfiles.STORE_PREFIX + "{name}/" + modelfiles.FILES + "{path:path}",
           summary="One file of a stored model; HTTP range requests (Range: bytes=N-) resume a download",
           response_class=FileResponse, responses={**responses(401, 403, 422), **_NOT_FOUND,
                                                   206: {"description": "the part of the file the Range asked for"},
                                                   500: {"model": ErrorBody, "description": "the store's copy is damaged"}})
    def file(name: ModelNamePath, path: str, node_id: str = Depends(node_only_)) -> FileResponse:
        found = store.file_path(name, path)
        if found is None:
            if store.manifest(name) is None:
                raise not_stored(name)
            raise ApiError(404, "http_404", f"model {name!r} has no such file in its manifest")
        disk, entry = found
        try:
            size = disk.stat().st_size
        except OSError:
            size = -1
        if size != entry.size:
            # Cheap and caught before a byte goes out; a changed byte of the same size is
            # caught by the PC, which checks every file's SHA-256 before using it.
            log.error("model store: %s/%s is %d bytes on disk but %d in its manifest", name, path, size, entry.size)
            raise ApiError(500, "http_500", f"the head's copy of {name}/{path} is damaged (its size differs from the "
                                            "manifest): the operator must add the model again")
        return FileResponse(disk, media_type="application/octet-stream",
                            headers={"Cache-Control": "no-store", "X-Content-SHA256": entry.sha256})

    return r
