"""The head's stored releases on the control API: enrolled PCs fetch a release's SHA256SUMS, its
signature and its files (with HTTP range requests, so a broken download resumes), authenticated
as the model store's files are (head/api/store.py's node_only). Only the files a stored
release's SHA256SUMS lists can be named."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from fastapi.responses import FileResponse

from garage_node.core import releasefiles as rf
from garage_node.head.api.common import ApiError, ErrorBody, responses
from garage_node.head.api.store import node_only
from garage_node.head.registry import Registry
from garage_node.head.releases import ReleaseStore

log = logging.getLogger(__name__)

VersionPath = Annotated[str, Path(description="the release's version, e.g. 2026.12.1")]
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "the head holds no such release, or the release has no such file"}}


def router(registry: Registry, store: ReleaseStore) -> APIRouter:
    r = APIRouter()
    node = node_only(registry, "the release store")

    @r.get(rf.RELEASES_PREFIX + "{version}/{name}",
           summary="One file of a stored release of the stick's OS (SHA256SUMS, SHA256SUMS.gpg, or a file it lists); "
                   "HTTP range requests (Range: bytes=N-) resume a download",
           response_class=FileResponse, responses={**responses(401, 403, 422), **_NOT_FOUND,
                                                   206: {"description": "the part of the file the Range asked for"}})
    def release_file(version: VersionPath, name: str, node_id: str = Depends(node)) -> FileResponse:
        path = store.file_path(version, name)
        if path is None or not path.is_file():
            if not store.has(version):
                raise ApiError(404, "http_404", f"the head holds no release {version[:80]!r}: the operator adds it "
                                                "with `garage-node head release add DIR`")
            raise ApiError(404, "http_404", f"release {version} has no file {name[:100]!r}")
        if name == rf.SUMS:
            log.info("node %s fetches release %s", node_id, version)
        return FileResponse(path, media_type="application/octet-stream", headers={"Cache-Control": "no-store"})

    return r
