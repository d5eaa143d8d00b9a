"""One extra gateway worker: a process of its own that serves the gateway's port beside the head
([gateway] workers; started and watched by workers.py).

It builds the same Gateway and listener as the head does, with what it cannot own from here
taken from the head over its pipe: the PCs' reports (the endpoint table), their names, the
models being placed. Keys, the ledger and the audits' quarantines it reads and writes in
gateway.db like the head (SQLite serialises the writers). Its metrics, demand and keys'
rate-limit spending go back to the head as events (relay.py). Audits are the head's: a
worker's traffic is not sampled.

It ends when the head says so, when its pipe closes (the head is gone), or on SIGTERM/SIGINT
(uvicorn's graceful shutdown: open requests get [gateway]'s 10 s)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

from garage_node.head.connguard import GuardLimits
from garage_node.head.gateway.metrics import AdmissionState
from garage_node.head.gateway.relay import RELAY_EVERY_S, Events, relay_from

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class WorkerSpec:
    index: int  # 1.. (the head's own gateway is 0)
    gateway: Any  # config.GatewaySection
    limits: GuardLimits
    state_dir: Path
    log_level: int = logging.INFO


class Inbox:
    """What the head sends, applied on a thread of its own."""

    def __init__(self, gateway: Any, server: Any) -> None:
        self.gateway, self.server = gateway, server
        self.names: dict[str, str] = {}

    def run(self, conn: Connection) -> None:
        try:
            while True:
                for message in conn.recv():
                    try:
                        if not self.apply(message):
                            return
                    except Exception:  # one bad message is skipped; the worker serves on
                        log.exception("gateway worker: could not apply the head's %r", message[0])
        except (EOFError, OSError):
            log.info("gateway worker: the head is gone; stopping")
        finally:
            self.server.should_exit = True

    def apply(self, message: tuple[Any, ...]) -> bool:
        """False once told to stop."""
        kind = message[0]
        if kind == "report":
            self.gateway.on_report(message[1], message[2])
        elif kind == "names":
            self.names = message[1]
        elif kind == "placed":
            placed = message[1]
            self.gateway.placed = lambda: placed
        elif kind == "spent":
            self.gateway.limits.spent_elsewhere(*message[1:])
        elif kind == "stop":
            return False
        return True


class Outbox:
    """Sends the worker's events to the head every RELAY_EVERY_S (and once more at the end),
    and its admission governor's state when it changed (the head's metrics sum them)."""

    def __init__(self, conn: Connection, events: Events, admission: Callable[[], AdmissionState]) -> None:
        self.conn, self.events, self.admission = conn, events, admission
        self._admission_sent: AdmissionState | None = None
        self._lock = threading.Lock()
        self.done = threading.Event()
        self.urgent = threading.Event()  # set: send now (what a key spent of its limits)

    def send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            self.conn.send(message)

    def flush(self) -> None:
        batch = self.events.take()
        if batch:
            self.send(("events", batch))
        state = self.admission()
        if state != self._admission_sent:
            self.send(("admission", state))
            self._admission_sent = state

    def run(self) -> None:
        try:
            while not self.done.is_set():
                self.urgent.wait(RELAY_EVERY_S)
                self.urgent.clear()
                self.flush()
        except (OSError, ValueError):  # the head is gone: the inbox stops the server
            pass


def main(spec: WorkerSpec, conn: Connection) -> None:
    """The worker process's entry (multiprocessing, spawn)."""
    import uvicorn

    from garage_node.head.gateway.app import create_gateway_app
    from garage_node.head.gateway.gateway import Gateway
    from garage_node.head.gateway.serve import gateway_config
    from garage_node.head.service import settle_heap

    logging.basicConfig(level=spec.log_level, format=f"%(levelname)s gateway worker {spec.index}: %(message)s")
    inbox: Inbox | None = None
    gateway = Gateway(spec.gateway, spec.state_dir, lambda: inbox.names if inbox is not None else {}, audit=None)
    events = Events()
    app = create_gateway_app(gateway)
    server = uvicorn.Server(gateway_config(spec.gateway, spec.limits, app, app.admission.protocol_hook()))
    inbox = Inbox(gateway, server)
    governor = app.admission.governor
    outbox = Outbox(conn, events, admission=lambda: AdmissionState.of(governor))
    relay_from(gateway, events, urgent=outbox.urgent.set)
    threading.Thread(target=inbox.run, args=(conn,), name="worker-inbox", daemon=True).start()

    def announce() -> None:
        waited = 0.0
        while not server.started and waited < READY_TIMEOUT_S and not server.should_exit:
            outbox.done.wait(0.02)
            waited += 0.02
        if server.started:
            settle_heap()  # as the head does once it is up (service.py)
            outbox.send(("ready",))
            outbox.run()

    gateway.start()
    threading.Thread(target=announce, name="worker-outbox", daemon=True).start()
    try:
        server.run()  # the main thread: uvicorn's signal handlers give SIGTERM its graceful stop
    finally:
        outbox.done.set()
        gateway.stop()  # the ledger's last batch
        try:
            if not server.started:
                outbox.send(("failed", f"could not listen on {spec.gateway.listen_host}:{spec.gateway.port}"))
            outbox.flush()
        except (OSError, ValueError):
            pass
        conn.close()
