from __future__ import annotations

import os
import shutil

import pytest

from testing.region import cleanup_stale


@pytest.fixture(scope="session", autouse=True)
def _no_stale_testbeds():
    # A test run that was killed leaves namespaces named gnt-*: remove them before and after.
    if os.geteuid() == 0 and shutil.which("ip"):
        cleanup_stale()
    yield
    if os.geteuid() == 0 and shutil.which("ip"):
        cleanup_stale()


# CI sets GARAGE_REQUIRE_ALL=1: there a skipped test means a missing prerequisite (no dockerd,
# no QEMU, no root), which must fail the run rather than pass it quietly. Only tests that need
# hardware CI does not have (marker `gpu`) may skip.
REQUIRE_ALL = os.environ.get("GARAGE_REQUIRE_ALL") == "1"
_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if REQUIRE_ALL and report.skipped and "gpu" not in report.keywords:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if _skipped:
        print("\nGARAGE_REQUIRE_ALL=1 and these tests skipped (a prerequisite is missing):")
        for line in _skipped:
            print(f"  {line}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
