"""The key each PC's engine demands (vLLM's VLLM_API_KEY): derived per PC from one secret only
the head holds, so the head can call every engine while a PC knows only its own key — it cannot
call another PC's engine around the gateway's keys and accounting (the hub also forwards no
node-to-node traffic to engine ports)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from garage_node.core import fsutil


class EngineKeys:
    def __init__(self, secret_file: Path) -> None:
        if not secret_file.exists():
            fsutil.write_private(secret_file, (secrets.token_hex(32) + "\n").encode())
        self._secret = bytes.fromhex(secret_file.read_text().strip())

    def for_node(self, node_id: str) -> str:
        return "gne-" + hmac.new(self._secret, node_id.encode(), hashlib.sha256).hexdigest()[:48]
