"""The agent's local API: HTTP on a unix socket that `garage-node status` reads.

Served with the standard library's http.server in one thread: the API has three routes and
one client at a time, and an ASGI stack would cost the agent more memory than it does work.
The socket is root-only (0600 in a 0755 runtime directory); `status` needs no network.
"""

from __future__ import annotations

import json
import os
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Callable

import httpx


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class LocalApi:
    def __init__(self, path: Path, snapshot: Callable[[], dict[str, Any]], wake: Callable[[], None]) -> None:
        self.path = path
        handler = _handler(snapshot, wake)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # a stale socket from a crashed agent
        old = os.umask(0o177)
        try:
            self._server = _Server(str(path), handler)
        finally:
            os.umask(old)
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-api", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)


def _handler(snapshot: Callable[[], dict[str, Any]], wake: Callable[[], None]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/v1/status":
                self._send(200, snapshot())
            else:
                self._send(404, {"error": "not_found", "message": f"no route {self.path}; try /v1/status"})

        def do_POST(self) -> None:
            if self.path == "/v1/reconcile":
                wake()
                self._send(202, {"ok": True})
            else:
                self._send(404, {"error": "not_found", "message": f"no route {self.path}"})

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_: Any) -> None:  # status polls are not news
            pass

    return Handler


def client(path: Path, timeout: float = 5.0) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://agent", timeout=timeout)
