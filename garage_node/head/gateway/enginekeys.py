"""The key each PC's engine demands (vLLM's VLLM_API_KEY): derived per PC from one secret only
the head holds, so the head can call every engine while a PC knows only its own key — it cannot
call another PC's engine around the gateway's keys and accounting (the hub also forwards no
node-to-node traffic to engine ports)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from functools import lru_cache
from pathlib import Path

from garage_node.core import fsutil


class EngineKeys:
    def __init__(self, secret_file: Path) -> None:
        if not secret_file.exists():
            fsutil.write_private(secret_file, (secrets.token_hex(32) + "\n").encode())
        self._secret = bytes.fromhex(secret_file.read_text().strip())
        # Every proxied request needs its PC's key: the HMAC was 6 % of the gateway's CPU at
        # 600 requests/s (py-spy, issue #22). Bounded: a region's PCs, with room.
        self.for_node = lru_cache(maxsize=16384)(self._derive)  # type: ignore[method-assign]

    def for_node(self, node_id: str) -> str:
        return self._derive(node_id)

    def _derive(self, node_id: str) -> str:
        return "gne-" + hmac.new(self._secret, node_id.encode(), hashlib.sha256).hexdigest()[:48]
