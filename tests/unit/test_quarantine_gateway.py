"""What a quarantine by the audits does at the gateway (issue #20): the table gives the PC no
customers' requests while a pinned lookup still finds it, the heartbeat answer tells the PC
why, and the ledger holds, freezes and forfeits its earnings."""

from __future__ import annotations

import pytest

from garage_node.head.audit.trust import OWNER_HINT, RECHECK_HINT, Trust
from garage_node.head.gateway.ledger import Earnings, Ledger, standing
from garage_node.head.gateway.store import Store
from garage_node.head.gateway.table import EndpointTable
from testing.fakes import FakeClock
from tests.unit.test_gateway import MODEL, call, gw, report  # noqa: F401 (gw: the fixture)

DAY = 86400.0
HOLD = 7 * DAY


def test_an_excluded_pc_takes_no_customers_requests_but_a_pinned_lookup_finds_it():
    clock = FakeClock()
    t = EndpointTable(stale_after_s=15, clock=clock)
    t.update("n1", report())
    t.update("n2", report())
    t.excluded = lambda: frozenset({"n1"})
    assert [e.node_id for e in t.serving(MODEL)] == ["n2"]
    assert [(m.pcs_serving, m.pcs_known) for m in t.models()] == [(1, 2)]
    with t.lock:
        takes = t.usable(clock.monotonic())
        assert [takes(e) for e in t.pool(MODEL)] == [False, True]
        # The re-check's canaries are pinned to the PC: it is there, healthy, and reachable.
        pinned = t.get("n1")
        assert pinned is not None and t._takes_requests(pinned, clock.monotonic())
    t.excluded = frozenset
    assert sorted(e.node_id for e in t.serving(MODEL)) == ["n1", "n2"]


def test_a_quarantined_pc_gets_none_of_the_customers_requests_until_released(gw):  # noqa: F811
    gw.trust.quarantine("n1", "greedy tokens below the verifier's choice in 31 of 40 audits")
    served = {call(gw, "POST", "/v1/completions", {"model": MODEL, "prompt": f"p{i}"}).headers["x-garage-node-id"]
              for i in range(8)}
    assert served == {"n2"}
    assert call(gw, "GET", "/v1/models").json()["data"][0]["pcs_serving"] == 1
    gw.trust.start_recheck("n1")  # still no customers while its canaries decide
    assert {call(gw, "POST", "/v1/completions", {"model": MODEL, "prompt": f"q{i}"}).headers["x-garage-node-id"]
            for i in range(6)} == {"n2"}
    gw.trust.release("n1")
    assert {call(gw, "POST", "/v1/completions", {"model": MODEL, "prompt": f"r{i}"}).headers["x-garage-node-id"]
            for i in range(20)} == {"n1", "n2"}  # random among the least loaded: both, but for 2 in a million


def test_a_region_whose_only_pcs_are_quarantined_answers_that_none_serves(gw):  # noqa: F811
    gw.trust.quarantine("n1", "x")
    gw.trust.quarantine("n2", "y")
    r = call(gw, "POST", "/v1/completions", {"model": MODEL, "prompt": "p"})
    assert r.status_code == 503, r.text
    assert gw.engines["n1"].calls == [] and gw.engines["n2"].calls == []


def test_the_heartbeat_answer_tells_a_quarantined_pc_why_and_what_to_do(gw):  # noqa: F811
    assert gw.node_extras("n1").quarantine is None
    gw.trust.quarantine("n1", "answers scored as another model's")
    q = gw.node_extras("n1").quarantine
    assert q is not None and q.state == "quarantined" and q.why == "answers scored as another model's"
    assert q.hint == OWNER_HINT and q.since is not None
    assert gw.node_extras("n2").quarantine is None
    gw.trust.start_recheck("n1")
    q = gw.node_extras("n1").quarantine
    assert q is not None and q.state == "rechecking" and q.hint == RECHECK_HINT
    gw.trust.release("n1")
    assert gw.node_extras("n1").quarantine is None


def test_a_quarantine_without_words_still_says_something():
    from garage_node.head.audit.trust import NodeTrust, quarantine_status

    q = quarantine_status(NodeTrust("n1", state="quarantined", why=""))
    assert q is not None and q.why == "its answers failed the region's audits"
    long = quarantine_status(NodeTrust("n1", state="quarantined", why="x" * 5000))
    assert long is not None and len(long.why) == 512  # inside the wire's bound


# ---------------------------------------------------------------- the ledger's earnings


def _ledger(tmp_path, clock):
    store = Store(tmp_path / "gateway.db")
    return Ledger(store, clock), Trust(store, clock)


def _credit(ledger, clock, node, tokens, at):
    """`tokens` (prompt) credited to `node` at wall time `at` (the clock is moved there)."""
    clock.wall = at
    ledger.add("k", node, MODEL, tokens, 0)
    ledger.flush()


def test_credited_tokens_are_held_for_hold_days_then_earned(tmp_path):
    start = 1_800_000_000.0 // 3600 * 3600  # on the hour
    clock = FakeClock(wall=start)
    ledger, trust = _ledger(tmp_path, clock)
    _credit(ledger, clock, "n1", 100, start + 60)
    _credit(ledger, clock, "n1", 10, start + 3 * DAY)
    clock.wall = start + HOLD + 3599  # the first hour not yet wholly past the hold
    assert ledger.earnings(trust.all(), HOLD)["n1"] == Earnings("n1", earned=0, held=110)
    clock.wall = start + HOLD + 3600
    assert ledger.earnings(trust.all(), HOLD)["n1"] == Earnings("n1", earned=100, held=10)
    ledger.add("k", "n1", MODEL, 5, 0)  # not written yet: counted, as held
    assert ledger.earnings(trust.all(), HOLD)["n1"] == Earnings("n1", earned=100, held=15)
    assert ledger.earnings(trust.all(), 0.0)["n1"].earned == 110  # hold 0: all but the hour under way
    # --since keeps only the rows from that hour on.
    assert ledger.earnings(trust.all(), HOLD, since=start + DAY)["n1"] == Earnings("n1", held=15)


def test_a_quarantine_freezes_what_was_held_and_what_comes_after(tmp_path):
    start = 1_800_000_000.0 // 3600 * 3600
    clock = FakeClock(wall=start)
    ledger, trust = _ledger(tmp_path, clock)
    _credit(ledger, clock, "n1", 1000, start)  # earned by the time of the freeze
    _credit(ledger, clock, "n1", 200, start + 5 * DAY)  # held at the freeze
    _credit(ledger, clock, "n2", 7, start + 5 * DAY)
    clock.wall = start + 9 * DAY
    trust.quarantine("n1", "cheats")
    _credit(ledger, clock, "n1", 30, start + 9 * DAY + 60)  # while quarantined (its re-check's canaries)
    clock.wall = start + 30 * DAY  # long past every hold: frozen stays frozen
    e = ledger.earnings(trust.all(), HOLD)
    assert e["n1"] == Earnings("n1", earned=1000, frozen=230)
    assert e["n2"] == Earnings("n2", earned=7)
    # Released after a passed re-check: what was frozen is held again, then earned.
    trust.start_recheck("n1")
    trust.release("n1")
    assert ledger.earnings(trust.all(), HOLD)["n1"] == Earnings("n1", earned=1230)


def test_a_forfeit_keeps_what_the_freeze_held_and_nothing_earned_before(tmp_path):
    start = 1_800_000_000.0 // 3600 * 3600
    clock = FakeClock(wall=start)
    ledger, trust = _ledger(tmp_path, clock)
    _credit(ledger, clock, "n1", 1000, start)
    _credit(ledger, clock, "n1", 200, start + 5 * DAY)
    clock.wall = start + 9 * DAY + 10
    trust.quarantine("n1", "cheats")
    trust.forfeit("n1")
    _credit(ledger, clock, "n1", 30, start + 9 * DAY + 3600)  # an hour after the freeze: frozen, not forfeited
    assert ledger.earnings(trust.all(), HOLD)["n1"] == Earnings("n1", earned=1000, frozen=30, forfeited=200)
    trust.start_recheck("n1")
    trust.release("n1")
    clock.wall = start + 40 * DAY
    assert ledger.earnings(trust.all(), HOLD)["n1"] == Earnings("n1", earned=1030, forfeited=200)


def test_the_hour_a_quarantine_began_in_is_frozen_whole():
    from garage_node.head.audit.trust import NodeTrust

    hour = 500_000
    frozen = NodeTrust("n1", state="quarantined", frozen_at=hour * 3600 + 1800.0)
    now = hour * 3600 + 10 * DAY
    assert standing(hour, now, HOLD, frozen) == "frozen"
    assert standing(hour - 168, now, HOLD, frozen) == "frozen"  # ended 7 days minus 30 min before the freeze
    assert standing(hour - 169, now, HOLD, frozen) == "earned"
    assert standing(hour, now, HOLD, None) == "earned"
    assert standing(hour, hour * 3600 + HOLD, HOLD, None) == "held"


def test_bad_trust_requests_are_refused_with_what_was_wrong(tmp_path):
    clock = FakeClock()
    _, trust = _ledger(tmp_path, clock)
    with pytest.raises(ValueError, match="n1 is not quarantined"):
        trust.start_recheck("n1")
    with pytest.raises(ValueError, match="no frozen earnings"):
        trust.forfeit("n1")


def test_a_second_forfeit_keeps_the_first(tmp_path):
    """Quarantined, forfeited, released, quarantined again and forfeited again: both freezes'
    held tokens stay forfeited (a single `forfeited_before` line would pay the first out)."""
    start = 1_800_000_000.0 // 3600 * 3600
    clock = FakeClock(wall=start)
    ledger, trust = _ledger(tmp_path, clock)
    _credit(ledger, clock, "n1", 200, start + DAY)
    clock.wall = start + 2 * DAY
    trust.quarantine("n1", "first")
    trust.forfeit("n1")
    with pytest.raises(ValueError, match="forfeited already"):
        trust.forfeit("n1")
    trust.start_recheck("n1")
    trust.release("n1")
    _credit(ledger, clock, "n1", 1000, start + 3 * DAY)  # honest for a while: earned in time
    _credit(ledger, clock, "n1", 50, start + 20 * DAY)
    clock.wall = start + 21 * DAY
    trust.quarantine("n1", "second")
    trust.forfeit("n1")
    clock.wall = start + 60 * DAY
    assert trust.get("n1").forfeits == (start + 2 * DAY, start + 21 * DAY)
    assert ledger.earnings(trust.all(), HOLD)["n1"] == Earnings("n1", earned=1000, forfeited=250)


def test_the_control_apis_heartbeat_answer_carries_the_quarantine_to_the_pc(tmp_path):
    """Through the real control API: the gateway's extras into the answer, decoded by the node."""
    from garage_node.head.api import ApiHooks
    from garage_node.head.config import GatewaySection
    from garage_node.head.gateway.gateway import Gateway
    from testing.headapi import enrolled_pc

    gateway = Gateway(GatewaySection(), tmp_path / "gw", lambda: {})
    try:
        pc = enrolled_pc(tmp_path, ApiHooks(node_extras=gateway.node_extras))
        assert pc.beat().quarantine is None
        gateway.trust.quarantine(pc.node_id, "answers scored as another model's")
        q = pc.beat().quarantine
        assert q is not None and q.state == "quarantined" and q.why == "answers scored as another model's"
        assert q.hint == OWNER_HINT
    finally:
        gateway.stop()


def test_the_heartbeat_says_what_of_the_tokens_served_is_earned_held_and_frozen(tmp_path):
    from garage_node.core.wire import TokensServed
    from garage_node.head.config import AuditSection, GatewaySection
    from garage_node.head.gateway.gateway import Gateway

    start = 1_800_000_000.0 // 3600 * 3600
    clock = FakeClock(wall=start)
    plain = Gateway(GatewaySection(), tmp_path / "plain", lambda: {}, clock=clock)
    audited = Gateway(GatewaySection(), tmp_path / "audited", lambda: {}, clock=clock, audit=AuditSection(hold_days=7))
    try:
        for g in (plain, audited):
            _credit(g.ledger, clock, "n1", 100, start)
            _credit(g.ledger, clock, "n1", 20, start + 8 * DAY)
            clock.wall = start + 8 * DAY + 60
        assert plain.node_extras("n1").tokens_served == TokensServed(today=20, total=120)  # no audits: no split
        assert audited.node_extras("n1").tokens_served == TokensServed(today=20, total=120, earned=100, held=20, frozen=0)
        audited.trust.quarantine("n1", "x")
        clock.advance(1.0)  # past the second the earnings are cached for
        assert audited.node_extras("n1").tokens_served.frozen == 20
        assert audited.node_extras("n2").tokens_served == TokensServed(earned=0, held=0, frozen=0)
    finally:
        plain.stop()
        audited.stop()
