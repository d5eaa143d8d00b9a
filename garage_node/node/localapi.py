"""The agent's local API: HTTP on a unix socket, root only (0600 in a 0755 runtime directory).

`garage-node status`, `drain`, `resume` and `join` talk to the agent only through it, with the
typed `AgentClient` below (as Tailscale's CLI talks to tailscaled through its LocalAPI).
Served with the standard library's http.server in one thread: a handful of routes and one
client at a time, where an ASGI stack would cost the agent more memory than it does work.
"""

from __future__ import annotations

import json
import os
import socketserver
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Callable

import httpx

from garage_node.core.wire import Status, decode, encode


@dataclass(frozen=True)
class Routes:
    """What the API does, as the agent's own methods."""

    status: Callable[[], Status]
    reconcile: Callable[[], None]
    drain: Callable[[], None]
    resume: Callable[[], None]


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class LocalApi:
    def __init__(self, path: Path, routes: Routes) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # a stale socket from a crashed agent
        old = os.umask(0o177)
        try:
            self._server = _Server(str(path), _handler(routes))
        finally:
            os.umask(old)
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-api", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)


def _handler(routes: Routes) -> type[BaseHTTPRequestHandler]:
    actions = {"/v1/reconcile": routes.reconcile, "/v1/drain": routes.drain, "/v1/resume": routes.resume}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/v1/status":
                self._send(200, encode(routes.status()))
            else:
                self._send(404, {"error": "not_found", "message": f"no route {self.path}; try /v1/status"})

        def do_POST(self) -> None:
            action = actions.get(self.path)
            if action is None:
                self._send(404, {"error": "not_found", "message": f"no route {self.path}; try {', '.join(actions)}"})
                return
            action()
            routes.reconcile()
            self._send(202, {"ok": True})

        def _send(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_: Any) -> None:  # status polls are not news
            pass

    return Handler


class AgentDown(Exception):
    """The agent's socket does not answer (agent not running, or no permission)."""


class AgentClient:
    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        self._http = httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://agent", timeout=timeout)

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *_: Any) -> None:
        self._http.close()

    def status(self) -> Status:
        return decode(self._call("GET", "/v1/status").json(), Status)

    def reconcile(self) -> None:
        self._call("POST", "/v1/reconcile")

    def drain(self) -> None:
        self._call("POST", "/v1/drain")

    def resume(self) -> None:
        self._call("POST", "/v1/resume")

    def _call(self, method: str, path: str) -> httpx.Response:
        try:
            resp = self._http.request(method, path)
            resp.raise_for_status()
            return resp
        except (httpx.HTTPError, OSError) as e:
            raise AgentDown(f"cannot reach the agent at {self.path} ({(str(e) or type(e).__name__).splitlines()[0][:160]})") from None
