"""The head's side of a rollout at run time: every accepted heartbeat's report goes to
`on_report` (a subscriber of head/reports.py), and the heartbeat's answer asks `target` for the
PC's `update_target` (through the API's node_extras). A thread calls `tick` every few seconds
for the timeouts and the next wave. The operator's commands change the rollout in its file
(head/rolloutstore.py); the keeper reads it again whenever another process wrote it.

One lock around the rollout in memory: a heartbeat's check is a dictionary lookup, and only a
change (a PC began, came back, failed; a wave opened) writes the file.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from garage_node.core.wire import NodeReport
from garage_node.head import rolloutops
from garage_node.head.rollout import Rollout, RolloutState
from garage_node.head.rolloutstore import RolloutStore

log = logging.getLogger(__name__)

TICK_S = 2.0  # timeouts are minutes; a wave opens within this of the last one succeeding


class RolloutKeeper:
    def __init__(self, store: RolloutStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self._lock = threading.Lock()
        self._seen = -1
        self._rollout: Rollout | None = None
        self._read_state = RolloutState.RUNNING
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        with self._lock:
            self._refresh()

    # -- the heartbeat path

    def on_report(self, node_id: str, report: NodeReport) -> None:
        with self._lock:
            self._refresh()
            r = self._rollout
            if r is not None and r.observe(node_id, report.update, self.clock()):
                self._save()

    def current(self) -> dict[str, Any] | None:
        """The newest rollout as `head rollout status --json` shows it (the fleet page); None: none yet."""
        with self._lock:
            self._refresh()
            return rolloutops.summary(self._rollout) if self._rollout is not None else None

    def target(self, node_id: str) -> str | None:
        with self._lock:
            r = self._rollout
            return r.target(node_id) if r is not None else None

    # -- the clock

    def tick(self) -> None:
        with self._lock:
            self._refresh()
            r = self._rollout
            if r is not None and r.tick(self.clock()):
                self._save()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="head-rollout", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.tick()
            except Exception:  # a bad pass must not end rollouts for the head's life
                log.exception("the rollout's pass failed; the next one tries again")

    # -- inside (under the lock)

    def _refresh(self) -> None:
        v = self.store.data_version()
        if v == self._seen:
            return
        self._seen = v
        before = self._rollout
        self._rollout = self.store.current()
        if self._rollout is not None:
            self._read_state = self._rollout.state
            if before is None or before.id != self._rollout.id or before.state != self._rollout.state:
                log.info("rollout of %s: %s%s", self._rollout.plan.version, self._rollout.state.value,
                         f" ({self._rollout.reason})" if self._rollout.reason else "")

    def _save(self) -> None:
        r = self._rollout
        assert r is not None
        if self.store.save(r, self._read_state):
            if r.state != self._read_state:
                log.log(logging.WARNING if r.state == RolloutState.HALTED else logging.INFO,
                        "rollout of %s: %s%s", r.plan.version, r.state.value, f" ({r.reason})" if r.reason else "")
            self._read_state = r.state
            return
        # The operator changed the rollout meanwhile (pause, abort): theirs wins; the members
        # just written are kept, and the rollout is judged again under its new state.
        self._seen = -1
        self._refresh()
