"""The fleet page's HTTP app: one HTML page (the fleet, or one PC) with its script and style,
two JSON routes the page polls, and, where the page needs the admin key, a sign-in form that
trades the key for a session cookie.

Read-only by construction: no route changes anything at the head (login and logout change only
this app's own sessions). Polling and not server-sent events: a poll every two seconds is as
live as an operator needs, survives SSH tunnels and proxies without tuning, and leaves no
endless response to hold up the head's shutdown.
"""

from __future__ import annotations

import asyncio
import threading
import time
from html import escape
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Protocol
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from garage_node.head.fleetpage import view
from garage_node.head.fleetpage.auth import SESSION_COOKIE, SESSION_LIFETIME_S, Sessions
from garage_node.head.fleetpage.history import SAMPLE_FIELDS, History
from garage_node.head.registry import NodeRow

STATIC = Path(str(resources.files("garage_node.head.fleetpage") / "static"))
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
MAX_LOGIN_BODY = 4096
LOGIN_NOTES = {
    "wrong": "That is not the admin key.",
    "nokey": "No admin key has been made yet: run garage-node head fleet-key on the head.",
}

# The page runs only its own script and style and is never framed; node-reported text is
# inserted as text, and this stops markup from running even if that ever slipped.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class NodeSource(Protocol):
    def nodes(self) -> list[NodeRow]: ...


class _Snapshot:
    """The fleet, computed at most once per `max_age_s` however many browsers poll."""

    def __init__(self, build: Callable[[float], dict[str, Any]], clock: Callable[[], float], max_age_s: float) -> None:
        self.build = build
        self.clock = clock
        self.max_age_s = max_age_s
        self._value: dict[str, Any] | None = None
        self._at = 0.0
        self._lock = threading.Lock()

    def get(self) -> dict[str, Any]:
        with self._lock:
            now = self.clock()
            if self._value is None or now - self._at >= self.max_age_s:
                self._value = self.build(now)
                self._at = now
            return self._value


def create_fleet_app(registry: NodeSource, history: History, offline_after_s: float, *, region: str = "",
                     key_path: Path | None = None, require_key: bool = False, secure_cookie: bool = False,
                     usage: view.Usage | None = None, models: view.Models | None = None,
                     trust: view.TrustView | None = None, rollout: view.RolloutView | None = None,
                     poll_s: float = 2.0,
                     clock: Callable[[], float] = time.time) -> FastAPI:
    """`registry`: where the PCs are listed (the head's Registry); `history`: fed by the head's
    report fan-out; `require_key`: every route but the login form needs a session opened with
    the admin key whose hash is in `key_path`; `secure_cookie`: the page is served over HTTPS;
    `usage()`: every PC's tokens served (the gateway's ledger), or None where there is none;
    `models()`: the region's models as the head's placement placed them (None: not shown);
    `trust()`: the audits' verdict on each PC (head/audit/trust.py; None: not shown)."""
    if require_key and key_path is None:
        raise ValueError("require_key needs key_path")
    sessions = Sessions(key_path, clock) if key_path is not None else None
    snapshot = _Snapshot(lambda now: view.fleet(registry.nodes(), now, offline_after_s, history, usage, models, trust,
                                                rollout),
                         clock, max_age_s=min(1.0, poll_s / 2))
    app = FastAPI(title="garage-node fleet", docs_url=None, redoc_url=None, openapi_url=None)
    # A region of a thousand PCs is about 1.5 MB of JSON per poll; compressed, a tenth of it.
    app.add_middleware(GZipMiddleware, minimum_size=4096)
    config = {"region": region, "poll_s": poll_s, "window_s": history.window_s, "sample_fields": SAMPLE_FIELDS,
              "key": require_key, "hot_c": view.HOT_C}

    def signed_in(request: Request) -> bool:
        return not require_key or (sessions is not None and sessions.valid(request.cookies.get(SESSION_COOKIE)))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        public = path in ("/login", "/style.css")
        if not public and not signed_in(request):
            if path.startswith("/api/"):
                response: Response = JSONResponse({"error": "login", "message": "sign in with the admin key"}, 401)
            else:
                response = RedirectResponse("/login", 303)
        else:
            response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/")
    def index() -> FileResponse:
        return page()

    @app.get("/pc/{node_id}")
    def pc_page(node_id: str) -> FileResponse:
        return page()

    @app.get("/api/config")
    def api_config() -> dict[str, Any]:
        return config

    @app.get("/api/fleet")
    def api_fleet() -> dict[str, Any]:
        return snapshot.get()

    @app.get("/api/pc/{node_id}")
    def api_pc(node_id: str) -> Response:
        fleet = snapshot.get()
        row = next((r for r in fleet["pcs"] if r["id"] == node_id), None)
        if row is None:
            return JSONResponse({"error": "not_found", "message": "no such PC in this region"}, 404)
        return JSONResponse({"now": fleet["now"], "window_s": history.window_s, "pc": row,
                             "history": history.node_history(node_id)})

    @app.get("/login")
    def login_form(error: str = "") -> Response:
        if not require_key or sessions is None:
            return RedirectResponse("/", 303)
        # Only fixed sentences are put in the form, chosen by name: nothing sent is echoed.
        note = LOGIN_NOTES.get(error, "")
        if not sessions.key_exists():
            note = LOGIN_NOTES["nokey"]
        html = (STATIC / "login.html").read_text().replace("{{note}}", note).replace("{{region}}", escape(region))
        return HTMLResponse(html)

    @app.post("/login")
    async def login(request: Request) -> Response:
        if not require_key or sessions is None:
            return RedirectResponse("/", 303)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_LOGIN_BODY:
                return JSONResponse({"error": "too_large", "message": "request too large"}, 413)
        key = (parse_qs(body.decode("utf-8", "replace")).get("key") or [""])[0].strip()
        sid = sessions.login(key) if key else None
        if sid is None:
            # A wrong key costs a second: with 256-bit keys guessing is hopeless anyway, but
            # a script hammering the form gets nowhere fast. The answer never echoes the key.
            await asyncio.sleep(1.0)
            return RedirectResponse("/login?error=wrong", 303)
        response = RedirectResponse("/", 303)
        response.set_cookie(SESSION_COOKIE, sid, max_age=int(SESSION_LIFETIME_S), httponly=True,
                            samesite="strict", secure=secure_cookie, path="/")
        return response

    @app.post("/logout")
    def logout(request: Request) -> Response:
        if sessions is not None:
            sessions.logout(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/login" if require_key else "/", 303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # Last: it would otherwise take /login.
    @app.get("/{name}")
    def asset(name: str) -> Response:
        if name not in ASSETS:
            return JSONResponse({"error": "not_found", "message": "no such page"}, 404)
        return FileResponse(STATIC / name, media_type=ASSETS[name])

    return app
