"""Heartbeat jitter (#10): PCs that came up in the same second must not beat the head in step."""

import random
from collections import Counter

from garage_node.node.headclient import BeatTimer

PERIOD = 5.0


def test_first_wait_is_a_random_part_of_a_period_then_period_plus_minus_ten_percent():
    t = BeatTimer(random.Random(7))
    first = t.next_in(PERIOD)
    assert 0.1 * PERIOD <= first <= PERIOD
    rest = [t.next_in(PERIOD) for _ in range(2000)]
    assert all(0.9 * PERIOD <= d <= 1.1 * PERIOD for d in rest)
    assert max(rest) - min(rest) > 0.15 * PERIOD  # spread, not a constant


def test_a_thousand_pcs_that_booted_together_do_not_beat_in_step():
    """1,000 agents whose first heartbeat went in the same instant: on a virtual clock, the
    beats of the next minute are spread out: no 100 ms slot holds more than a few percent of
    them (without jitter every one of the 1,000 would land in the same slot, every period)."""
    slots: Counter[int] = Counter()
    for pc in range(1000):
        timer, now = BeatTimer(random.Random(pc)), 0.0  # all beat at t=0 first
        while True:
            now += timer.next_in(PERIOD)
            if now > 60.0:
                break
            slots[int(now * 10)] += 1
    beats = sum(slots.values())
    assert beats > 1000 * (60 / PERIOD) * 0.9  # each still beats about every period
    assert max(slots.values()) <= 40  # 4 % of the PCs at most in any 100 ms (uniform would be ~20)


def test_agent_waits_a_jittered_period_on_its_clock(tmp_path):
    """The agent's next heartbeat is its clock's now plus the timer's delay (it reads no other time)."""
    from testing.agentrig import rig

    r = rig(tmp_path)
    r.agent.session.beats = BeatTimer(random.Random(1))
    expected = BeatTimer(random.Random(1))
    r.agent.reconcile_once()  # joins and sends its first heartbeat now
    first = r.clock.monotonic()
    assert len(r.head.heartbeats) >= 1
    wait = expected.next_in(r.head.facts.heartbeat_s)
    assert r.agent.session.link.next_call == first + wait
    before = len(r.head.heartbeats)
    r.clock.advance(wait - 0.01)
    r.agent.reconcile_once()
    assert len(r.head.heartbeats) == before  # not yet
    r.clock.advance(0.02)
    r.agent.reconcile_once()
    assert len(r.head.heartbeats) == before + 1
    assert r.agent.session.link.next_call == r.clock.monotonic() + expected.next_in(r.head.facts.heartbeat_s)
