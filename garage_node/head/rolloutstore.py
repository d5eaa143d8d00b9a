"""Rollouts on disk: <state_dir>/rollout.sqlite, through head/sqlite.py. The head's rollout
keeper (head/rolloutkeeper.py) and the operator's commands (`head rollout pause`, ...) both
write it, so the rollout's own row is written only if its state is still the one the writer
read (`save` returns False otherwise, and the writer reads it again): an operator's pause is
never overwritten by a head that had not seen it. Members are facts about PCs, written by the
head alone (and once by `start`).

The blocked list ((node, version) pairs never to target again) outlives every rollout.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from garage_node.head import sqlite
from garage_node.head.rollout import Member, MemberState, Rollout, RolloutPlan, RolloutState

MIGRATIONS: list[sqlite.Step] = [
    """
    CREATE TABLE rollouts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        version TEXT NOT NULL,
        plan TEXT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        started_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        open_waves INTEGER NOT NULL,
        wave_sizes TEXT NOT NULL
    );
    CREATE TABLE members (
        rollout_id INTEGER NOT NULL,
        node_id TEXT NOT NULL,
        wave INTEGER NOT NULL,
        state TEXT NOT NULL,
        targeted_at REAL,
        started_at REAL,
        resolved_at REAL,
        why TEXT NOT NULL DEFAULT '',
        stale_failure INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (rollout_id, node_id)
    );
    CREATE TABLE blocked (
        node_id TEXT NOT NULL,
        version TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (node_id, version)
    );
    """,
]


def database_path(state_dir: Path) -> Path:
    return state_dir / "rollout.sqlite"


class RolloutStore:
    def __init__(self, path: Path, synchronous: sqlite.Synchronous = "FULL") -> None:
        """`synchronous`: FULL for the operator's commands (a pause must survive a power cut);
        the head's keeper passes NORMAL, since what it writes are the PCs' own reports, which
        every PC sends again within seconds (the 1,000-PC simulation of tests/unit/test_rollout.py,
        all healthy: 7.6 s with FULL, 4.6 s with NORMAL, on the shared 2-core machine)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite.Database(path, synchronous)
        self.db.migrate(MIGRATIONS)

    def close(self) -> None:
        self.db.close()

    def data_version(self) -> int:
        """Changes whenever another connection (an operator's command) committed to the file."""
        return int(self.db.query("PRAGMA data_version")[0][0])

    def blocked(self) -> set[tuple[str, str]]:
        return {(r["node_id"], r["version"]) for r in self.db.query("SELECT node_id, version FROM blocked")}

    def current(self) -> Rollout | None:
        """The newest rollout, whatever its state (None: there never was one)."""
        rows = self.db.query("SELECT * FROM rollouts ORDER BY id DESC LIMIT 1")
        if not rows:
            return None
        row = rows[0]
        plan_d = json.loads(row["plan"])
        plan_d["waves"] = tuple(plan_d["waves"])
        members = {m["node_id"]: Member(m["node_id"], m["wave"], MemberState(m["state"]), m["targeted_at"],
                                        m["started_at"], m["resolved_at"], m["why"], bool(m["stale_failure"]))
                   for m in self.db.query("SELECT * FROM members WHERE rollout_id = ?", (row["id"],))}
        return Rollout(RolloutPlan(**plan_d), RolloutState(row["state"]), row["started_at"], members,
                       json.loads(row["wave_sizes"]), row["open_waves"], row["reason"], row["id"], row["updated_at"],
                       blocked=self.blocked())

    def create(self, r: Rollout) -> Rollout:
        plan = {**r.plan.__dict__, "waves": list(r.plan.waves)}
        with self.db.transaction() as db:
            cur = db.execute("INSERT INTO rollouts (version, plan, state, reason, started_at, updated_at, open_waves, "
                             "wave_sizes) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (r.plan.version, json.dumps(plan), r.state.value, r.reason, r.started_at, r.updated_at,
                              r.open_waves, json.dumps(r.wave_sizes)))
            r.id = int(cur.lastrowid or 0)
            self._members(db, r, list(r.members))
        r.dirty.clear()
        return r

    def save(self, r: Rollout, read_state: RolloutState) -> bool:
        """Write `r`'s changed members, and its own row if the file still says `read_state`;
        False if it did not (someone else changed the rollout: read it again)."""
        with self.db.transaction() as db:
            self._members(db, r, sorted(r.dirty))
            for node, version in r.blocked:
                db.execute("INSERT OR IGNORE INTO blocked (node_id, version, at) VALUES (?, ?, ?)",
                           (node, version, r.updated_at))
            cur = db.execute("UPDATE rollouts SET state = ?, reason = ?, updated_at = ?, open_waves = ?, wave_sizes = ? "
                             "WHERE id = ? AND state = ?",
                             (r.state.value, r.reason, r.updated_at, r.open_waves, json.dumps(r.wave_sizes), r.id,
                              read_state.value))
        r.dirty.clear()
        return cur.rowcount == 1

    @staticmethod
    def _members(db: sqlite3.Connection, r: Rollout, ids: list[str]) -> None:
        db.executemany(
            "INSERT OR REPLACE INTO members (rollout_id, node_id, wave, state, targeted_at, started_at, resolved_at, why, "
            "stale_failure) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(r.id, m.node_id, m.wave, m.state.value, m.targeted_at, m.started_at, m.resolved_at, m.why,
              int(m.stale_failure))
             for m in (r.members[i] for i in ids)])
