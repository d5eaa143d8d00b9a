"""A rollout of an OS release across the region, as a pure state machine (issue #19): which PCs
are told to update (the heartbeat answer's `update_target`), when the next wave may start,
and when the rollout stops by itself. Persistence is head/rolloutstore.py; the heartbeat path
feeds it reports and asks it for targets through head/rolloutkeeper.py.

The models are hawkBit's cascading groups (a group starts only when the one before succeeded; an
error threshold stops the whole rollout) and Nebraska's safe mode (a canary first; a canary
that does not come back in time stops the rollout). The PCs that can take the release are
split once, at the start: `canary` PCs, then waves up to the cumulative shares the operator
gave (1, 10, 50, 100 % of the PCs), in an order drawn from the version (so a region's rollouts
do not always start on the same PCs).

A member PC goes QUEUED -> TARGETED (its wave opened: its heartbeat answer names the version)
-> STARTED (it reported that it is installing) -> OK (back on the new version, blessed) or
FAILED (it reported a failed install, it came back on the old version after its tries ran
out, or it did not come back within `update_timeout_s`). A PC that does not begin within
`start_timeout_s` (switched off, outside its owner's update window, "ask" not yet answered) is
PASSED_OVER: it does not hold its wave back and counts as neither success nor failure; it keeps
its target once the last wave is open. A wave succeeds when none of its members is TARGETED or
STARTED any longer and its failures are within `max_failures_pct` of its size (none at all for
the canary). Failures above that, in any opened wave, at any moment, HALT the rollout: no PC
that has not begun is told to update any more. A PC that came back on the old version after its
tries ran out is never targeted with that version again (the blocked list, kept across rollouts).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from enum import StrEnum

from garage_node.core.wire import UpdateOutcome, UpdateStatus


class RolloutState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"  # by the operator: no new PC is told; resume goes on
    HALTED = "halted"  # by itself: a failed canary or too many failures; final
    ABORTED = "aborted"  # by the operator; final
    DONE = "done"  # every wave succeeded; PCs that were passed over still get the target


ENDED = (RolloutState.HALTED, RolloutState.ABORTED, RolloutState.DONE)


class MemberState(StrEnum):
    QUEUED = "queued"
    TARGETED = "targeted"
    STARTED = "started"
    OK = "ok"
    FAILED = "failed"
    PASSED_OVER = "passed-over"


OPEN = (MemberState.TARGETED, MemberState.STARTED)  # not yet resolved
RESOLVED = (MemberState.OK, MemberState.FAILED, MemberState.PASSED_OVER)


class RolloutError(ValueError):
    """A rollout cannot be started or changed as asked; the message says why and what to do."""


@dataclass(frozen=True)
class RolloutPlan:
    version: str
    variant: str = "base"  # the release's: only sticks of this variant take it
    canary: int = 1
    waves: tuple[float, ...] = (1.0, 10.0, 50.0, 100.0)  # cumulative % of the PCs
    max_failures_pct: float = 2.0  # per wave, of its size; the canary allows none
    start_timeout_s: float = 3600.0  # a PC told to update that has not begun by then is passed over
    update_timeout_s: float = 1800.0  # a PC that began and is not back, blessed, by then has failed

    def check(self) -> RolloutPlan:
        if self.canary < 1:
            raise RolloutError("--canary must be 1 or more: the first PCs show whether the release boots")
        if not self.waves or any(not 0 < w <= 100 for w in self.waves) or list(self.waves) != sorted(set(self.waves)):
            raise RolloutError("--waves must be rising percentages of the PCs, each above 0 and at most 100, "
                               "e.g. 1,10,50,100")
        if self.waves[-1] != 100:
            raise RolloutError("--waves must end at 100: the last wave takes every PC left")
        if not 0 <= self.max_failures_pct <= 100:
            raise RolloutError("--max-failures must be a percentage between 0 and 100")
        if self.start_timeout_s <= 0 or self.update_timeout_s <= 0:
            raise RolloutError("the timeouts must be positive")
        return self


@dataclass
class Member:
    node_id: str
    wave: int
    state: MemberState = MemberState.QUEUED
    targeted_at: float | None = None
    started_at: float | None = None
    resolved_at: float | None = None
    why: str = ""
    # Its report already said "failed" for this version when it joined (an earlier rollout of
    # the same version, aborted): that failure is not counted again until it begins anew.
    stale_failure: bool = False


@dataclass
class Rollout:
    """One rollout, mutable, changed only through its methods. Each method returns the ids of
    the members it changed (and whether the rollout's own row changed), for the store."""

    plan: RolloutPlan
    state: RolloutState
    started_at: float
    members: dict[str, Member]
    wave_sizes: list[int]  # planned size of each wave; 0 is the canary
    open_waves: int = 0  # waves 0 .. open_waves-1 are open
    reason: str = ""
    id: int = 0
    updated_at: float = 0.0
    # (node, version) pairs never to target again (shared by all rollouts; loaded by the store).
    blocked: set[tuple[str, str]] = field(default_factory=set)
    dirty: set[str] = field(default_factory=set)  # members changed since the store last wrote them
    # (wave, state) -> members: kept with every change, so judging a wave on each heartbeat
    # that changed something does not walk 1,000 members.
    _tally: dict[tuple[int, MemberState], int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._tally = {}
        for m in self.members.values():
            self._count(m, +1)

    def _count(self, m: Member, by: int) -> None:
        key = (m.wave, m.state)
        self._tally[key] = self._tally.get(key, 0) + by

    def _set(self, m: Member, state: MemberState, wave: int | None = None) -> None:
        self._count(m, -1)
        m.state = state
        if wave is not None:
            m.wave = wave
        self._count(m, +1)
        self.dirty.add(m.node_id)

    # -- making one

    @classmethod
    def start(cls, plan: RolloutPlan, node_ids: list[str], now: float,
              blocked: set[tuple[str, str]] | None = None, stale_failures: set[str] | None = None) -> Rollout:
        """A rollout of `plan` over the PCs `node_ids` (reporting update facts, not on the
        version, not blocked for it), with its first wave (the canary) open."""
        plan = plan.check()
        blocked = blocked or set()
        ids = sorted({n for n in node_ids if (n, plan.version) not in blocked},
                     key=lambda n: hashlib.sha256(f"{plan.version}\0{n}".encode()).digest())
        if not ids:
            raise RolloutError(f"no PC can take {plan.version}: none reports an A/B stick that is not already on it "
                               "(see `garage-node head nodes`)")
        sizes = wave_sizes(len(ids), plan)
        members: dict[str, Member] = {}
        i = 0
        for wave, size in enumerate(sizes):
            for n in ids[i:i + size]:
                members[n] = Member(n, wave, stale_failure=n in (stale_failures or set()))
            i += size
        r = cls(plan, RolloutState.RUNNING, now, members, sizes, blocked=set(blocked), updated_at=now)
        r._open_next(now)
        return r

    # -- what the heartbeat path asks

    def target(self, node_id: str) -> str | None:
        """The version `node_id` should update to now, or None."""
        if (node_id, self.plan.version) in self.blocked:
            return None
        m = self.members.get(node_id)
        if m is None or m.state in (MemberState.QUEUED, MemberState.FAILED):
            return None
        if m.state == MemberState.STARTED or m.state == MemberState.OK:
            return self.plan.version  # it has begun (or is there): nothing to take back
        if self.state == RolloutState.RUNNING:
            return self.plan.version if m.state == MemberState.TARGETED or self._last_open() else None
        if self.state == RolloutState.DONE:
            return self.plan.version  # the passed-over PCs catch up
        return None  # paused, halted, aborted: no PC that has not begun is told

    def observe(self, node_id: str, update: UpdateStatus | None, now: float) -> bool:
        """A heartbeat's update facts from `node_id`; True if anything changed."""
        if update is None:
            return False
        m = self.members.get(node_id)
        v = self.plan.version
        if m is None:
            if self.state not in (RolloutState.RUNNING, RolloutState.DONE) or not self._joins(node_id, update):
                return False
            # Enrolled, or back online, after the start: it waits for the last wave (after the
            # rollout is done, it is told at once: a PC that was off catches up).
            m = self.members[node_id] = Member(node_id, len(self.wave_sizes) - 1,
                                               stale_failure=failed_before(update, v))
            self._count(m, +1)
            self.wave_sizes[-1] += 1
            self.dirty.add(node_id)
            if self._last_open():
                self._target(m, now)
            return True
        if m.state in (MemberState.OK, MemberState.FAILED):
            return False
        changed = False
        if update.last_version == v and update.last_outcome == UpdateOutcome.ROLLED_BACK:
            self.blocked.add((node_id, v))
            changed = self._resolve(m, MemberState.FAILED, now, update.last_why or
                                    f"came back on {update.os_version or 'the old version'} after its tries ran out")
        elif update.last_version == v and update.last_outcome == UpdateOutcome.FAILED:
            if not (m.stale_failure and m.state != MemberState.STARTED):
                changed = self._resolve(m, MemberState.FAILED, now, update.last_why or "the install failed")
        elif update.os_version == v and update.blessed:
            changed = self._resolve(m, MemberState.OK, now, "")
        elif m.state in (MemberState.TARGETED, MemberState.PASSED_OVER) and (
                update.os_version == v or (update.last_version == v and update.last_outcome == UpdateOutcome.INSTALLING)):
            self._set(m, MemberState.STARTED)
            m.started_at = now
            changed = True
        if changed:
            self._judge(now)
        return changed

    def tick(self, now: float) -> bool:
        """Timeouts, and the next wave when the open ones succeeded; True if anything changed.
        A halted or aborted rollout is over: its clock stops (what its PCs report still counts)."""
        if self.state in (RolloutState.ABORTED, RolloutState.HALTED):
            return False
        changed = False
        for m in self.members.values():
            if m.state == MemberState.TARGETED and m.targeted_at is not None and \
                    now - m.targeted_at >= self.plan.start_timeout_s and self.state != RolloutState.PAUSED:
                changed |= self._pass_over(m, now)
            elif m.state == MemberState.STARTED and m.started_at is not None and \
                    now - m.started_at >= self.plan.update_timeout_s:
                changed |= self._resolve(m, MemberState.FAILED, now, "did not come back on the new version within "
                                         f"{self.plan.update_timeout_s / 60:.0f} min of starting")
        return self._judge(now) or changed

    # -- the operator

    def pause(self, now: float) -> None:
        if self.state != RolloutState.RUNNING:
            raise RolloutError(f"the rollout of {self.plan.version} is {self.state}, not running: nothing to pause")
        self.state, self.updated_at = RolloutState.PAUSED, now

    def resume(self, now: float) -> None:
        if self.state != RolloutState.PAUSED:
            hint = " (a halted rollout is over: abort it, fix the release, and start a new version)" \
                if self.state == RolloutState.HALTED else ""
            raise RolloutError(f"the rollout of {self.plan.version} is {self.state}, not paused{hint}")
        self.state, self.updated_at = RolloutState.RUNNING, now
        # The time paused does not count against the PCs waiting to begin.
        for m in self.members.values():
            if m.state == MemberState.TARGETED:
                m.targeted_at = now
        self._judge(now)

    def abort(self, now: float) -> None:
        if self.state in (RolloutState.ABORTED, RolloutState.DONE):
            raise RolloutError(f"the rollout of {self.plan.version} is already {self.state}")
        self.state, self.updated_at = RolloutState.ABORTED, now
        self.reason = "aborted by the operator"

    # -- what status shows

    def counts(self, wave: int | None = None) -> dict[str, int]:
        out = {s.value: 0 for s in MemberState}
        for (w, state), n in self._tally.items():
            if wave is None or w == wave:
                out[state.value] += n
        return out

    def touched(self) -> int:
        """PCs that began installing the release (the blast radius so far)."""
        return sum(1 for m in self.members.values() if m.started_at is not None)

    # -- inside

    def _joins(self, node_id: str, update: UpdateStatus) -> bool:
        return eligible(node_id, update, self.plan, self.blocked)

    def _last_open(self) -> bool:
        return self.open_waves >= len(self.wave_sizes)

    def _target(self, m: Member, now: float) -> None:
        self._set(m, MemberState.TARGETED)
        m.targeted_at = now

    def _resolve(self, m: Member, state: MemberState, now: float, why: str) -> bool:
        if m.state == state:
            return False
        if state == MemberState.OK and m.started_at is None:
            m.started_at = now
        self._set(m, state)
        m.resolved_at, m.why = now, why[:512]
        return True

    def _pass_over(self, m: Member, now: float) -> bool:
        self._set(m, MemberState.PASSED_OVER)
        m.resolved_at = now
        m.why = f"did not begin within {self.plan.start_timeout_s / 60:.0f} min of being told"
        if m.wave == 0 and self.state == RolloutState.RUNNING:
            # Safe mode: a canary that never began proves nothing; the next PC in line takes its place.
            spare = next((x for x in sorted(self.members.values(), key=lambda x: (x.wave, x.node_id))
                          if x.state == MemberState.QUEUED), None)
            if spare is not None:
                self.wave_sizes[spare.wave] -= 1
                self._set(spare, spare.state, wave=0)
                self.wave_sizes[0] += 1
                self._target(spare, now)
            elif all(x.state == MemberState.PASSED_OVER for x in self.members.values() if x.wave == 0):
                self.state, self.updated_at = RolloutState.HALTED, now
                self.reason = ("no canary began within "
                               f"{self.plan.start_timeout_s / 60:.0f} min, and no other PC is left to try")
        return True

    def _allowed_failures(self, wave: int) -> int:
        if wave == 0:
            return 0
        return math.floor(self.wave_sizes[wave] * self.plan.max_failures_pct / 100)

    def _judge(self, now: float) -> bool:
        """Halt on too many failures; open the next wave when the open ones succeeded."""
        if self.state in (RolloutState.ABORTED, RolloutState.HALTED):
            return False
        for wave in range(self.open_waves):
            failed = self.counts(wave)[MemberState.FAILED.value]
            if failed > self._allowed_failures(wave):
                name = "the canary" if wave == 0 else f"wave {wave} ({self.plan.waves[wave - 1]:g} %)"
                why = next(m.why for m in self.members.values() if m.wave == wave and m.state == MemberState.FAILED)
                self.state, self.updated_at = RolloutState.HALTED, now
                self.reason = (f"{failed} PC{'s' if failed > 1 else ''} of {name} failed (allowed "
                               f"{self._allowed_failures(wave)}): {why}")
                return True
        if self.state != RolloutState.RUNNING:
            return False
        changed = False
        while self._wave_succeeded(self.open_waves - 1):
            if self._last_open():
                self.state, self.updated_at = RolloutState.DONE, now
                return True
            self._open_next(now)
            changed = True
        return changed

    def _wave_succeeded(self, wave: int) -> bool:
        if wave < 0:
            return True
        c = self.counts(wave)
        if c[MemberState.QUEUED.value] or c[MemberState.TARGETED.value] or c[MemberState.STARTED.value]:
            return False
        if wave == 0 and not c[MemberState.OK.value]:
            return False  # safe mode: no canary came back yet (all were passed over, no spare)
        return True

    def _open_next(self, now: float) -> None:
        wave = self.open_waves
        self.open_waves += 1
        self.updated_at = now
        for m in self.members.values():
            if m.wave == wave and m.state == MemberState.QUEUED:
                self._target(m, now)


def failed_before(update: UpdateStatus, version: str) -> bool:
    return update.last_version == version and update.last_outcome == UpdateOutcome.FAILED


def eligible(node_id: str, update: UpdateStatus, plan: RolloutPlan, blocked: set[tuple[str, str]]) -> bool:
    """Whether a PC reporting `update` can take the plan's release: an A/B stick of the same
    variant, not already on the version, whose owner allows updates, not blocked for it."""
    return (update.os_version not in (None, plan.version) and update.variant == plan.variant
            and update.policy != "never" and (node_id, plan.version) not in blocked)


def wave_sizes(n: int, plan: RolloutPlan) -> list[int]:
    """How many of `n` PCs each wave takes: the canary, then up to each cumulative share (at
    least one PC per wave while PCs are left; empty waves are kept, so wave numbers stay the
    operator's)."""
    canary = min(plan.canary, n)
    sizes = [canary]
    done = canary
    for pct in plan.waves:
        upto = min(n, max(math.ceil(n * pct / 100), done + (1 if done < n else 0)))
        sizes.append(upto - done)
        done = upto
    sizes[-1] += n - done
    return sizes
