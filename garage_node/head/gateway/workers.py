"""The gateway on several cores ([gateway] workers = N): the head's own gateway plus N-1 worker
processes (worker.py), all listening on the gateway's port with SO_REUSEPORT, so the kernel
spreads new connections over them. One Python process serves about one core (the GIL); this
is how a head with more cores carries more traffic (issue #22).

The head keeps what has one truth for the region and tells the workers: each PC's report (as
it arrives, and all of them when a worker starts), the PCs' names, the models being placed,
and what every process spent of each key's rate limits. The workers send back their metrics,
demand and spending (relay.py). What each process keeps for itself: its admission limit and
hold queue (so [gateway] max_in_flight and hold_queue are per process), and its count of
requests open on each PC, which its routing balances (as nginx's workers each balance their
own). A worker that dies is started again, with backoff; the head's stop stops them all.

Why multiprocessing (spawn) and a pipe rather than threads: threads share one GIL, which is
the limit being lifted. Why not prometheus-client's multiprocess mode for the metrics: the
head's collectors read its tables, which a file per process cannot carry (see relay.py)."""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

from garage_node.core.backoff import Backoff
from garage_node.core.wire import NodeReport
from garage_node.head.connguard import GuardLimits
from garage_node.head.gateway.metrics import AdmissionState
from garage_node.head.gateway.relay import Applier
from garage_node.head.listener import ListenerError
from garage_node.head.gateway.worker import READY_TIMEOUT_S, WorkerSpec, main

log = logging.getLogger(__name__)

SYNC_EVERY_S = 1.0  # names and placed models looked at this often, sent when changed
STOP_TIMEOUT_S = 15.0  # uvicorn's graceful 10 s, then the ledger's last batch
# A worker that does not read (stuck) is sent at most this many messages; then what waits is
# dropped and it is sent the whole table again once it reads.
OUTBOX_LIMIT = 50_000


class _Link:
    """One worker process and its pipe: a sender thread drains its outbox; a receiver thread
    applies its events, and starts it again when it dies (unless the pool is stopping)."""

    def __init__(self, pool: GatewayWorkers, index: int) -> None:
        self.pool, self.index = pool, index
        self.applier = Applier(pool.gateway)
        self._outbox: deque[tuple[Any, ...]] = deque()
        self._wake = threading.Event()
        self._lost = False  # messages were dropped: send the whole table again
        self.process: Any = None
        self.ready = threading.Event()
        self.settled = threading.Event()  # ready, or ended before it was
        self.failed: str | None = None
        self.admission: AdmissionState | None = None  # its governor, as it last said
        self._backoff = Backoff(initial_s=1.0, max_s=30.0)

    # -- to the worker

    def put(self, message: tuple[Any, ...]) -> None:
        if len(self._outbox) >= OUTBOX_LIMIT:
            self._outbox.clear()
            self._lost = True
        self._outbox.append(message)
        self._wake.set()

    def _send_loop(self, conn: Connection, outbox: deque[tuple[Any, ...]], wake: threading.Event) -> None:
        """Until the worker is gone: each start has its own outbox and sender, so a sender of a
        worker that died never takes what was meant for the next one."""
        while not conn.closed and (not self.pool.stopping.is_set() or outbox):
            wake.wait(0.5)
            wake.clear()
            if self._lost and outbox is self._outbox:
                self._lost = False
                outbox.extendleft(reversed(self.pool.snapshot()))
            batch: list[tuple[Any, ...]] = []
            while outbox and len(batch) < 5000:
                batch.append(outbox.popleft())
            if batch:
                try:
                    conn.send(batch)
                except (OSError, ValueError):  # the worker is gone: its receiver starts another
                    return
            if outbox:
                wake.set()

    # -- the process

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self.process = ctx.Process(target=main, args=(self.pool.spec(self.index), child),
                                   name=f"gateway-worker-{self.index}", daemon=True)
        self.process.start()
        child.close()
        self.ready.clear()
        self.settled.clear()
        self.failed = None
        self._lost = False
        self._outbox = deque(self.pool.snapshot())
        self._wake = threading.Event()
        threading.Thread(target=self._send_loop, args=(parent, self._outbox, self._wake),
                         name=f"gw-worker-{self.index}-out", daemon=True).start()
        threading.Thread(target=self._receive_loop, args=(parent, self.process), name=f"gw-worker-{self.index}-in",
                         daemon=True).start()
        self._wake.set()

    def _receive_loop(self, conn: Connection, process: Any) -> None:
        try:
            while True:
                message = conn.recv()
                kind = message[0]
                if kind == "events":
                    try:
                        spent = self.applier.apply(message[1])
                    except Exception:  # a bad event costs its batch, not the worker's link
                        log.exception("gateway worker %d: could not count its events", self.index)
                        continue
                    for event in spent:
                        self.pool.tell_others(self, event)
                elif kind == "ready":
                    self._backoff.reset()
                    self.ready.set()
                    self.settled.set()
                elif kind == "failed":
                    self.failed = message[1]
                elif kind == "admission":
                    self.admission = message[1]
        except (EOFError, OSError):
            pass
        self.admission = None
        self.settled.set()
        conn.close()
        process.join(5)
        self.applier.close_all()
        if self.pool.stopping.is_set():
            return
        code = process.exitcode
        delay = self._backoff.next_delay()
        # Exit code 0: it was told to stop by a signal (a Ctrl-C reaches the whole process
        # group before the head's own stop does); anything else is a crash.
        log.log(logging.INFO if code == 0 else logging.WARNING,
                "gateway worker %d ended (exit code %s)%s; starting it again in %.1f s", self.index, code,
                f": {self.failed}" if self.failed else "", delay)
        if self.pool.stopping.wait(delay):
            return
        self.start()

    def stop(self) -> None:
        """After `put(("stop",))` (to every worker first, so they stop together)."""
        if self.process is None:
            return
        self.process.join(STOP_TIMEOUT_S)
        if self.process.is_alive():
            log.warning("gateway worker %d did not stop in %.0f s; ending it", self.index, STOP_TIMEOUT_S)
            self.process.kill()
            self.process.join(5)


class GatewayWorkers:
    """`start()` returns once every worker listens (or raises ListenerError with why not)."""

    def __init__(self, gateway: Any, limits: GuardLimits, log_level: int = logging.INFO) -> None:
        self.gateway = gateway
        self.limits, self.log_level = limits, log_level
        self.count = gateway.cfg.workers
        self.stopping = threading.Event()
        self._links = [_Link(self, i) for i in range(1, self.count)]
        self._ticker = threading.Thread(target=self._sync_loop, name="gw-workers-sync", daemon=True)
        # The head's own gateway spends keys' limits too: the workers hear of it.
        gateway.limits.spent = lambda kind, key, limit, cost: self.tell_others(None, ("spent", kind, key, limit, cost))
        gateway.metrics.watch_admission_elsewhere(self.admission_states)

    def admission_states(self) -> list[AdmissionState]:
        """The workers' admission governors, as each last said (for the head's metrics)."""
        return [s for s in (link.admission for link in self._links) if s is not None]

    def spec(self, index: int) -> WorkerSpec:
        return WorkerSpec(index=index, gateway=self.gateway.cfg, limits=self.limits,
                          state_dir=self.gateway.state_dir, log_level=self.log_level)

    def snapshot(self) -> list[tuple[Any, ...]]:
        """What a worker needs to start serving: every fresh report, the names, the placed models.
        A worker dates a report from when it gets it, so a PC seen a while ago counts as fresh
        there for up to stale_after_s longer than at the head, until its next heartbeat."""
        out: list[tuple[Any, ...]] = [("report", node_id, report) for node_id, report in self.gateway.table.fresh_reports()]
        out.append(("names", self.gateway.names()))
        out.append(("placed", frozenset(self.gateway.placed())))
        return out

    def start(self) -> None:
        for link in self._links:
            link.start()
        for link in self._links:
            link.settled.wait(READY_TIMEOUT_S)
            if not link.ready.is_set():
                why = link.failed or "it did not start listening in time"
                self.stop()
                raise ListenerError(f"gateway worker {link.index} of {self.count}: {why}. Is the port taken by "
                                  "another program? See the log above.")
        self._ticker.start()
        log.info("gateway: %d worker processes beside the head's own, on port %d", self.count - 1,
                 self.gateway.cfg.port)

    def stop(self) -> None:
        self.stopping.set()
        for link in self._links:
            link.put(("stop",))
        for link in self._links:
            link.stop()

    # -- what the workers are told

    def on_report(self, node_id: str, report: NodeReport) -> None:
        for link in self._links:
            link.put(("report", node_id, report))

    def tell_others(self, origin: _Link | None, event: tuple[Any, ...]) -> None:
        for link in self._links:
            if link is not origin:
                link.put(event)

    def _sync_loop(self) -> None:
        """Names and placed models, when they change (a worker got both at its start)."""
        names, placed = self.gateway.names(), frozenset(self.gateway.placed())
        while not self.stopping.wait(SYNC_EVERY_S):
            now_names, now_placed = self.gateway.names(), frozenset(self.gateway.placed())
            if now_names != names:
                names = now_names
                self.tell_others(None, ("names", names))
            if now_placed != placed:
                placed = now_placed
                self.tell_others(None, ("placed", placed))
