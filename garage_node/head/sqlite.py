"""The head's one way to open SQLite: a connection with the pragmas the stores were measured
with, a write transaction, and migrations numbered by `PRAGMA user_version`.

Only the head keeps databases (the registry, the gateway's keys and ledger), so this lives in
`head/`, not `core/`: the node side never imports sqlite3.

A migration is a step in an ordered list; step i (from 0) brings the file to user_version i + 1,
and each step runs in its own write transaction with the version bump, so a head and a CLI
command opening an old file at once never apply a step twice (the second waits for the lock,
then reads the new version). A step is SQL, or a function for what SQL alone cannot say (a
step that must look at the file first, as the registry's adoption of files made before it
was numbered).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

Step = str | Callable[[sqlite3.Connection], None]
Synchronous = Literal["FULL", "NORMAL"]

# Long enough for a batch's fsync on a slow disk, short enough that a wedged writer is reported.
BUSY_TIMEOUT_S = 10.0


def connect(path: Path, synchronous: Synchronous = "FULL") -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are opened by `transaction`), rows by name.
    WAL: readers never wait for a writer, so a heartbeat's credential check does not queue
    behind a batch's fsync. `synchronous`: FULL syncs every commit (an identity handed out must
    survive a power cut); NORMAL syncs at checkpoints only, for batches whose loss costs little."""
    # check_same_thread off: the API's handler threads share it, each caller holding a lock.
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    return db


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE (the write lock at once, so two writers never deadlock upgrading a read
    lock) ... COMMIT, or ROLLBACK on any error, KeyboardInterrupt included."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite3.Connection, steps: Sequence[Step]) -> int:
    """Apply the steps the file has not had yet; returns the file's version after. A file newer
    than the code (a head downgraded) is left alone: its extra columns do not hurt older code."""
    while True:
        with transaction(db):
            done = version(db)  # read under the write lock: another process may have migrated meanwhile
            if done >= len(steps):
                return done
            _run(db, steps[done])
            db.execute(f"PRAGMA user_version = {done + 1}")


def _run(db: sqlite3.Connection, step: Step) -> None:
    if callable(step):
        step(db)
        return
    # Not executescript: it commits first, which would end the step's transaction.
    for statement in statements(step):
        db.execute(statement)


def statements(script: str) -> list[str]:
    """A script split into statements at the semicolons that end one (not those inside a
    string, a comment or a trigger's body)."""
    out, buf = [], ""
    for piece in script.split(";"):
        buf += piece + ";"
        if sqlite3.complete_statement(buf):
            if buf.strip(" \t\n;"):
                out.append(buf.strip())
            buf = ""
    if buf.strip(" \t\n;"):
        raise ValueError(f"an incomplete SQL statement: {buf.strip()[:80]!r}")
    return out


class Database:
    """One long-lived connection behind a lock: the API runs its handlers in threads (and the
    gateway its event loop and flushers) and a sqlite3 connection must not be used by two at
    once. A connection per call cost an open and a schema read each time (#10)."""

    def __init__(self, path: Path, synchronous: Synchronous = "FULL") -> None:
        self.path = path
        self._conn = connect(path, synchronous)
        # Reentrant: a write may read back through the same Database while it holds it.
        self._lock = threading.RLock()

    @contextmanager
    def use(self) -> Iterator[sqlite3.Connection]:
        """The connection, alone, for statements that commit one by one."""
        with self._lock:
            yield self._conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, transaction(self._conn) as db:
            yield db

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def migrate(self, steps: Sequence[Step]) -> int:
        with self._lock:
            return migrate(self._conn, steps)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
