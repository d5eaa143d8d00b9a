"""Writes taken into memory at once and written to SQLite in batches, one transaction each, by
a background thread: the head's heartbeats (`head/heartbeats.py`) and the gateway's usage
ledger. A caller never waits for the disk; a crash loses at most the last batch.

What is in memory is in one of two places: `pending` (taken, not yet written) or `in_flight`
(being written right now, until its commit is done). Readers lay both over what they read from
the file, so each value is always somewhere a reader looks: in memory or in the file, never in
neither (counters, which must not be counted twice either, read under `settled()`). A batch
whose write fails goes back under what came in meanwhile, for the next try.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

B = TypeVar("B")
T = TypeVar("T")


class WriteBehind(Generic[B]):
    """`empty()` makes an empty batch (falsy); `fold(acc, newer)` lays `newer` into `acc` in
    place; `write(batch)` writes one batch in one transaction (raising leaves it in memory)."""

    def __init__(self, name: str, empty: Callable[[], B], fold: Callable[[B, B], None],
                 write: Callable[[B], None]) -> None:
        self.name = name
        self._empty = empty
        self._fold = fold
        self._write = write
        # Taking a value never waits for a write: the write happens under _flush_lock only.
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._pending = empty()
        self._in_flight = empty()
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None

    def add(self, batch: B) -> None:
        with self._lock:
            self._fold(self._pending, batch)

    def view(self, look: Callable[[B, B], T]) -> T:
        """`look(pending, in_flight)` under the lock; it must copy out what it keeps."""
        with self._lock:
            return look(self._pending, self._in_flight)

    @contextmanager
    def settled(self) -> Iterator[None]:
        """Holds writes off: while held nothing is in flight, so the file plus `view` counts each
        value exactly once. Counters need this (a reader between a batch's commit and the end of
        its flush would count it twice); values where the newest wins can read without it."""
        with self._flush_lock:
            yield

    def flush(self) -> B:
        """Write what is pending now; returns that batch (empty when there was nothing)."""
        with self._flush_lock:
            with self._lock:
                batch, self._pending = self._pending, self._empty()
                self._in_flight = batch
            try:
                if batch:
                    self._write(batch)
            except BaseException:
                with self._lock:
                    self._fold(batch, self._pending)  # what came in meanwhile is newer
                    self._pending = batch
                raise
            finally:
                with self._lock:
                    self._in_flight = self._empty()
        return batch

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def start(self, every_s: float) -> None:
        """Start the flusher, unless it runs already or `stop()` was called."""
        if self.thread is not None or self.stopped:
            return
        with self._lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, args=(every_s,), name=self.name, daemon=True)
                self.thread.start()

    def stop(self) -> None:
        """Stop the flusher and write what is left."""
        self._stop.set()
        thread, self.thread = self.thread, None
        if thread is not None:
            thread.join(timeout=10)
        self.flush()

    def _loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.flush()
            except Exception:  # a locked or full disk: the batch waits in memory for the next pass
                log.exception("%s: writing a batch failed; retrying", self.name)
