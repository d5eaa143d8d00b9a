"""The agent's update part (issue #19): once per pass, the head's target (the heartbeat answer's
`update_target`) against the owner's [update] policy, the boot and the serving state, through
node/update.py's pure decide(); its status is the `update` key of the status document and of
the heartbeat's report.

What it does not do yet: install. On an A/B stick that is `systemd-sysupdate update VERSION`
against the head's /v1/releases/VERSION/ followed by a reboot; this stick has neither (systemd
252, one root), so an INSTALL decision is reported as pending with the reason
(`installer_missing()`), never pretended. DRAIN is exposed as `wants_drain` for the agent to
drain the engine first, as the owner's drain does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from garage_node.core.wire import UpdateStatus
from garage_node.node import update as up

RECORD = "update.json"


@dataclass
class UpdatePart:
    state_dir: Path
    policy: up.Policy
    clock: Callable[[], float]
    read_boot: Callable[[], up.BootFacts] = up.boot_facts
    variant: str | None = None  # the stick's ("base", "nvidia"); from the image's os-release
    installer: Callable[[], str | None] = up.installer_missing
    _boot: up.BootFacts | None = field(default=None, init=False)
    _record: up.UpdateRecord = field(default_factory=up.UpdateRecord, init=False)
    _decision: up.Decision = field(default_factory=lambda: up.Decision(up.Action.NONE), init=False)
    _target: str | None = field(default=None, init=False)

    def step(self, target: str | None, *, serving: bool, idle: bool) -> up.Decision:
        """One pass: the boot read (the counter changes once, when the boot is blessed), the
        last update settled against it, and the decision for `target`."""
        now = self.clock()
        boot = self._boot = self.read_boot()
        path = self.state_dir / RECORD
        before = up.load_record(path)
        record = up.settle(before, boot, now)
        if record != before:
            up.save_record(path, record)
        self._record, self._target = record, target
        d = up.decide(target, boot, self.policy, now, serving=serving, idle=idle,
                      refused=frozenset(record.refused), approved=up.approved(self.state_dir))
        if d.action == up.Action.INSTALL:
            missing = self.installer()
            if missing is not None:
                d = up.Decision(up.Action.WAIT, f"{target} cannot be installed here: {missing}")
        self._decision = d
        return d

    @property
    def wants_drain(self) -> bool:
        return self._decision.action == up.Action.DRAIN

    def status(self) -> UpdateStatus | None:
        """None until the first pass, and on a PC whose OS has no version (not the stick)."""
        if self._boot is None or self._boot.os_version is None:
            return None
        return up.status(self._boot, self._record, self.policy, self._target, self._decision, self.variant, None)
