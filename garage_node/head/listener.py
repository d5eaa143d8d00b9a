"""A second HTTP listener beside the head's control API (the gateway, the fleet page): its own
uvicorn server on its own thread and event loop.

Why a thread and not one more server on the control API's loop: uvicorn's `Server.serve()`
takes over the process's SIGINT/SIGTERM handlers while it runs, and two servers on one loop
would fight over them; off the main thread uvicorn leaves signals alone, so the control API's
server keeps the one shutdown path and stops these listeners from its lifespan. A separate loop
also keeps a burst of inference traffic from delaying heartbeats and enrollments.
"""

from __future__ import annotations

import logging
import ssl
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger(__name__)


class ListenerError(RuntimeError):
    pass


def tls13_config(app: Any, **kw: Any) -> uvicorn.Config:
    """uvicorn.Config whose TLS (when it has a certificate) speaks TLS 1.3 only. Both ends of
    the control API are ours (the agent's client asks for 1.3 too, node/headclient.py), and so
    is the fleet page's browser-facing listener, where every current browser speaks 1.3: no
    TLS 1.2, so none of its CBC-SHA1 suites (issue #23 found ECDHE-ECDSA-AES128-SHA accepted).
    uvicorn builds its SSLContext in Config.load() and has no setting for the lowest version,
    so the subclass sets it on the context it built."""
    import uvicorn  # only the head needs it

    class Tls13Config(uvicorn.Config):
        def load(self) -> None:
            super().load()
            if self.ssl is not None:
                self.ssl.minimum_version = ssl.TLSVersion.TLSv1_3

    return Tls13Config(app, **kw)


class BackgroundServer:
    """`start()` returns once the socket is bound (or raises with why not); `stop()` lets open
    requests finish for up to uvicorn's graceful-shutdown time, then returns."""

    def __init__(self, name: str, config: uvicorn.Config) -> None:
        import uvicorn  # only the head needs it

        self.name = name
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=f"listener-{name}", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.server.run()  # with the config's loop factory (the TLS handshake deadline)
        except BaseException as e:  # surfaced by start()
            self._error = e

    def start(self, timeout_s: float = 30.0) -> None:
        self._thread.start()
        deadline = threading.Event()
        waited = 0.0
        while not self.server.started and self._thread.is_alive() and waited < timeout_s:
            deadline.wait(0.02)
            waited += 0.02
        if not self.server.started:
            self.server.should_exit = True
            cfg = self.server.config
            why = f" ({type(self._error).__name__})" if self._error else ""
            raise ListenerError(f"the {self.name} could not listen on {cfg.host}:{cfg.port}{why}: "
                                f"is the address in use or not on this machine? See the log above.")
        log.info("%s listening on %s:%s", self.name, self.server.config.host, self.server.config.port)

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
