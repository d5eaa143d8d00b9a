"""How long the head takes to answer heartbeats, from the moment the application gets the
request to the last byte of its answer: parsing, the credential check, the registry and the
reply, with any wait for a worker thread included (issue #10 found the waits, not the work,
made the slow tail). TLS and the socket are outside it."""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class HeartbeatTimer:
    """Pure ASGI middleware: calls `observe(seconds, status)` once per heartbeat answered."""

    def __init__(self, app: Callable[..., Awaitable[None]], observe: Callable[[float, int], None]) -> None:
        self.app = app
        self.observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").endswith("/heartbeat"):
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 0

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.observe(time.monotonic() - started, status)

        await self.app(scope, receive, timed_send)
