"""The built base image, for every image test file that boots it."""

from __future__ import annotations

from pathlib import Path

import pytest

from testing.image import GARAGE_TOML, TOKEN, build_image


@pytest.fixture(scope="module")
def image() -> Path:
    img, output = build_image("base", GARAGE_TOML, "garage.toml")
    assert TOKEN not in output, "the build printed the join token"
    return img
