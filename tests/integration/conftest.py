"""What the testbed files share: the testbed itself. Each file's own `region` fixture adds the
head and the PCs it needs to it; the testbed is removed after the file's last test however it
ended (namespaces, processes, files)."""

from __future__ import annotations

from typing import Iterator

import pytest

from testing.region import Testbed


@pytest.fixture(scope="module")
def testbed() -> Iterator[Testbed]:
    with Testbed() as tb:
        yield tb
