"""The systemd units we ship say what systemd reads: a key in the wrong section is ignored
with only a log line (StartLimitIntervalSec= sat under [Service] in two units, so their
restart-forever setting never took effect)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = sorted((Path(__file__).resolve().parents[2] / "systemd").glob("*.service"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_knows_every_key_of_the_unit(unit: Path) -> None:
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                         capture_output=True, text=True, timeout=60)
    ignored = [line for line in (out.stdout + out.stderr).splitlines()
               if "Unknown key" in line or "Unknown section" in line or "ignoring" in line.lower()]
    assert not ignored, "\n".join(ignored)


def test_there_are_units_to_check() -> None:
    assert len(UNITS) >= 3
