from __future__ import annotations

import os
import shutil

import pytest

from garage_node.testbed.region import cleanup_stale


@pytest.fixture(scope="session", autouse=True)
def _no_stale_testbeds():
    # A test run that was killed leaves namespaces named gnt-*: remove them before and after.
    if os.geteuid() == 0 and shutil.which("ip"):
        cleanup_stale()
    yield
    if os.geteuid() == 0 and shutil.which("ip"):
        cleanup_stale()
