"""The write-behind mechanism (head/writebehind.py) the heartbeat buffer and the usage ledger
share: nothing taken is ever out of a reader's sight, a failed batch is kept, counters are
counted once."""

from __future__ import annotations

import threading

import pytest

from garage_node.head.gateway.ledger import Ledger
from garage_node.head.gateway.store import Store
from garage_node.head.writebehind import WriteBehind
from testing.fakes import FakeClock

NEVER = 3600.0


def _counter(write) -> WriteBehind[dict[str, int]]:
    def add(acc: dict[str, int], newer: dict[str, int]) -> None:
        for k, v in newer.items():
            acc[k] = acc.get(k, 0) + v
    return WriteBehind("test", dict, add, write)


def test_a_batch_in_flight_is_visible_and_a_failed_one_goes_back_under_newer_values():
    seen = []

    def write(batch):
        seen.append(buf.view(lambda pending, in_flight: (dict(pending), dict(in_flight))))
        buf.add({"x": 10})  # arrives while the batch is being written
        raise OSError("disk full")

    buf = _counter(write)
    buf.add({"x": 1})
    with pytest.raises(OSError):
        buf.flush()
    assert seen == [({}, {"x": 1})]
    assert buf.view(lambda pending, in_flight: (dict(pending), dict(in_flight))) == ({"x": 11}, {})


def test_flusher_writes_and_stop_writes_what_is_left():
    written: list[dict[str, int]] = []
    buf = _counter(written.append)
    assert not buf.flush() and written == []  # nothing pending, nothing written
    buf.start(NEVER)
    buf.add({"x": 1})
    buf.stop()
    assert written == [{"x": 1}] and buf.thread is None and buf.stopped
    buf.start(0.01)
    assert buf.thread is None  # stopped for good


def test_ledger_totals_count_each_request_once_while_the_flusher_writes(tmp_path):
    ledger = Ledger(Store(tmp_path / "gateway.db"), FakeClock(wall=86400 * 100))
    stop = threading.Event()

    def flush_hard():
        while not stop.is_set():
            ledger.flush()

    flusher = threading.Thread(target=flush_hard)
    flusher.start()
    try:
        for i in range(1, 301):
            ledger.add("alice", "n1", "m", 1, 0)
            assert ledger.key_tokens("alice") == i
            assert ledger.node_totals_all()["n1"].total == i
    finally:
        stop.set()
        flusher.join()
