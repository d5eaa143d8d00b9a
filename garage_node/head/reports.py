"""Node reports fanned out inside the head: every accepted heartbeat's report reaches each
subscriber (the gateway's endpoint table, the fleet page's history) as it arrives, without a
database read. A subscriber must be quick and must not raise; one that does is logged and the
others still get the report."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import Any, Callable

from garage_node.core.wire import HeartbeatExtras, NodeReport

log = logging.getLogger(__name__)

Subscriber = Callable[[str, NodeReport], None]


class Reports:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()

    def subscribe(self, fn: Subscriber) -> None:
        with self._lock:
            self._subscribers.append(fn)

    def publish(self, node_id: str, report: NodeReport) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for fn in subscribers:
            try:
                fn(node_id, report)
            except Exception:
                log.exception("a subscriber to node reports failed on node %s", node_id)


Extras = Callable[[str], HeartbeatExtras]


def with_extra(extras: Extras, name: str, value: Callable[[str], Any]) -> Extras:
    """The heartbeat answer's extras with one more part: the field `name` set to `value(node_id)`
    where that is not None (the placement's assignment, the rollout's update target)."""
    def both(node_id: str) -> HeartbeatExtras:
        e = extras(node_id)
        v = value(node_id)
        return e if v is None else replace(e, **{name: v})
    return both
