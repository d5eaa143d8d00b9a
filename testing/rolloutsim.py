"""A region of simulated PCs for the rollout's tests (tests/unit/test_rollout.py): each PC
heartbeats through the head's own path for reports and answers (head/reports.py's Reports, to
which the rollout keeper is subscribed, and the node_extras function the control API calls,
head/reports.py's with_extra), and acts on the update target it is given as an A/B
stick would: report `installing`, go quiet while it reboots, and come back on the new version
blessed, or (its health gate failing) back on the old one after its tries ran out, or never."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum

from garage_node.core.wire import HeartbeatExtras, UpdateOutcome, UpdateStatus
from garage_node.head.reports import Reports
from garage_node.head.reports import with_extra
from garage_node.head.rolloutkeeper import RolloutKeeper
from testing.fakes import sample_report

ROUND_S = 60.0  # one heartbeat per PC per simulated minute is enough for timeouts in minutes
REBOOT_ROUNDS = 3  # installing -> rebooted and blessed (or three failed tries)


class Behaviour(StrEnum):
    HEALTHY = "healthy"  # boots the new version; its health gate passes
    BROKEN = "broken"  # the new version's health gate fails: back on the old after its tries
    SILENT = "silent"  # never comes back after it began (dead PC, bricked stick)
    DEFER = "defer"  # its owner's window is closed until `defer_until_round`


@dataclass
class SimPC:
    node_id: str
    behaviour: Behaviour = Behaviour.HEALTHY
    os_version: str = "v1"
    defer_until_round: int = 0
    quiet_rounds: int = 0  # rebooting: no heartbeat
    installing: str | None = None
    last_version: str | None = None
    last_outcome: UpdateOutcome | None = None
    refused: set[str] = field(default_factory=set)  # versions it will never try again
    first_target_round: int | None = None
    began_round: int | None = None
    done_round: int | None = None

    def facts(self) -> UpdateStatus:
        return UpdateStatus(os_version=self.os_version, variant="base", blessed=True, policy="window",
                            last_version=self.last_version, last_outcome=self.last_outcome)

    def answer(self, target: str | None, rnd: int) -> None:
        if target is None or target == self.os_version or target in self.refused or self.installing:
            return
        if self.first_target_round is None:
            self.first_target_round = rnd
        if self.behaviour == Behaviour.DEFER and rnd < self.defer_until_round:
            return
        self.installing, self.began_round = target, rnd
        self.last_version, self.last_outcome = target, UpdateOutcome.INSTALLING

    def reboot(self, rnd: int) -> None:
        """After reporting `installing`: quiet, then back (or not)."""
        self.quiet_rounds = REBOOT_ROUNDS if self.behaviour != Behaviour.SILENT else 10**9

    def come_back(self, rnd: int) -> None:
        assert self.installing is not None
        if self.behaviour == Behaviour.BROKEN:
            self.last_outcome = UpdateOutcome.ROLLED_BACK
            self.refused.add(self.installing)
        else:
            self.os_version, self.last_outcome = self.installing, UpdateOutcome.OK
        self.installing, self.done_round = None, rnd


@dataclass
class Region:
    keeper: RolloutKeeper
    pcs: list[SimPC]
    clock: list[float]  # [now], moved by each round
    reports: Reports = field(default_factory=Reports)
    rnd: int = 0
    targets_after_stop: int = 0

    def __post_init__(self) -> None:
        self.reports.subscribe(self.keeper.on_report)
        self.extras = with_extra(lambda _n: HeartbeatExtras(), "update_target", self.keeper.target)
        self.base = sample_report()

    def round(self) -> None:
        self.rnd += 1
        self.clock[0] += ROUND_S
        for pc in self.pcs:
            if pc.quiet_rounds:
                pc.quiet_rounds -= 1
                if pc.quiet_rounds == 0:
                    pc.come_back(self.rnd)
                continue
            self.reports.publish(pc.node_id, replace(self.base, update=pc.facts()))
            was = pc.installing
            pc.answer(self.extras(pc.node_id).update_target, self.rnd)
            if was is not None:
                pc.reboot(self.rnd)  # it reported `installing` this round: now it reboots
        self.keeper.tick()

    def run(self, rounds: int) -> None:
        for _ in range(rounds):
            self.round()

    def began(self) -> int:
        return sum(1 for pc in self.pcs if pc.began_round is not None)
