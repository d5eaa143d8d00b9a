"""Where a node keeps what must survive a reboot (the state directory, on the stick's data
partition) and what lives only while the agent runs (the runtime directory)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StatePaths:
    state_dir: Path

    @property
    def identity(self) -> Path:
        return self.state_dir / "identity.json"

    @property
    def head_ca(self) -> Path:
        return self.state_dir / "head-ca.pem"

    @property
    def join_token(self) -> Path:
        return self.state_dir / "join-token"

    @property
    def enroll_key(self) -> Path:
        # The WireGuard key made before enrolling (0600), kept until the identity is stored: a
        # node that crashes in between enrolls again with the same token and key, and the head
        # answers with the same identity instead of spending another use of the token.
        return self.state_dir / "enroll-key.json"

    @property
    def rotate_key(self) -> Path:
        # The same for a WireGuard key rotation: made and stored before the head is asked.
        return self.state_dir / "rotate-key.json"

    @property
    def assignment(self) -> Path:
        # The head's last assignment (issue #18): an agent restarted while the head is
        # unreachable goes on serving it, as a running one does. Absent: the head assigns none.
        return self.state_dir / "assignment.json"

    @property
    def carried_assignment(self) -> Path:
        # The assignment the engine runs (it lags the head's word during a switch): a restart
        # mid-switch goes on running it while the switch starts over (node/assign.py).
        return self.state_dir / "assignment-carried.json"

    @property
    def drain_flag(self) -> Path:
        # A file: a drain holds across agent restarts and reboots until resumed.
        return self.state_dir / "draining"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"
