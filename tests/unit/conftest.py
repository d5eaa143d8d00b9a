"""Fixtures shared by the unit tests' modules."""

from testing.releases import keys  # noqa: F401  (the operator's and a stranger's signing keys)
