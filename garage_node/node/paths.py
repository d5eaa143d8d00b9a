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
    def drain_flag(self) -> Path:
        # A file: a drain holds across agent restarts and reboots until resumed.
        return self.state_dir / "draining"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"
