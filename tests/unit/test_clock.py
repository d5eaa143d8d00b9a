"""core/clock.py's Refreshed: one read per period, whoever asks."""

from garage_node.core.clock import Refreshed
from testing.fakes import FakeClock


def test_a_refreshed_value_is_read_once_per_period_and_again_when_stale() -> None:
    clock, reads = FakeClock(), []

    def read() -> int:
        reads.append(clock.monotonic())
        return len(reads)

    value = Refreshed(read, 1.0, clock)
    assert [value.get() for _ in range(5)] == [1] * 5
    clock.advance(0.5)
    assert value.get() == 1
    clock.advance(0.5)
    assert value.get() == 2
    value.stale()
    assert value.get() == 3 and len(reads) == 3
