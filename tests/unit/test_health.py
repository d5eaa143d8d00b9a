"""The agent's problems, one per source (node/health.py), and the parts' small decisions that
need no rig: which identity change asks for what (agent.Change), and the pass's plan."""

from __future__ import annotations

import dataclasses

from garage_node.node.agent import Change
from garage_node.node.config import EngineSection
from garage_node.node.gpu import Inventory
from garage_node.node.health import Health, Source
from garage_node.node.identity import Identity
from garage_node.node.plan import make_plan
from testing.fakes import FakeClock

IDENT = Identity(node_id="n0001", name="pc-1", region="testland", credential="c", wg_private_key="k1",
                 overlay_ip="100.96.0.2", hub_ip="100.96.0.1", hub_public_key="hub", hub_endpoint="10.9.0.1:51820")


def test_a_problem_is_logged_once_when_it_starts_and_once_when_resolved(caplog):
    clock = FakeClock()
    h = Health(clock)
    with caplog.at_level("DEBUG", logger="garage_node.node.health"):
        for n in range(2, 12):
            h.fail(Source.TUNNEL, f"overlay down ({n} pings missed)", "check UDP")
            clock.advance(5)
        h.clear(Source.TUNNEL)
        h.clear(Source.TUNNEL)  # nothing left to resolve: no second line
    levels = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelname != "DEBUG"]
    assert levels == [("WARNING", "overlay down (2 pings missed)"),
                      ("INFO", "resolved (tunnel): overlay down (11 pings missed)")]


def test_a_problem_keeps_its_start_while_its_words_change():
    clock = FakeClock()
    h = Health(clock)
    h.fail(Source.HEAD, "head unreachable: connection refused", retry_in=4)
    clock.advance(30)
    h.fail(Source.HEAD, "head unreachable: timed out", retry_in=8)
    st = h.status(h.worst())
    assert st.message == "head unreachable: timed out" and st.age_s == 30 and st.retry_in_s == 8
    assert st.source == "head"


def test_the_worst_problem_follows_the_order_of_the_steps_not_the_last_write():
    h = Health(FakeClock())
    h.fail(Source.RAY, "no account")
    h.fail(Source.TUNNEL, "overlay down")
    h.fail(Source.HEAD, "head unreachable")
    h.fail(Source.TUNNEL, "overlay down (3 pings missed)")
    assert [p.source for p in h.all()] == [Source.HEAD, Source.TUNNEL, Source.RAY]
    h.clear(Source.HEAD)
    assert h.worst().source is Source.TUNNEL
    h.clear(*Source)
    assert h.worst() is None and h.status(None) is None


def test_what_an_identity_change_asks_for():
    assert Change.between(None, IDENT) == Change(revoked=False, rejoined=False, reapply_overlay=False)
    assert Change.between(IDENT, dataclasses.replace(IDENT, ray_token="new")) == Change(False, False, False)
    assert Change.between(IDENT, dataclasses.replace(IDENT, revoked=True)).revoked
    renewed = dataclasses.replace(IDENT, credential="c2", wg_private_key="k2")
    assert Change.between(IDENT, renewed) == Change(revoked=False, rejoined=False, reapply_overlay=True)
    moved = dataclasses.replace(IDENT, hub_endpoint="10.9.0.9:51820")
    assert Change.between(IDENT, moved).reapply_overlay
    again = dataclasses.replace(IDENT, node_id="n0002", wg_private_key="k3", revoked=False)
    assert Change.between(dataclasses.replace(IDENT, revoked=True), again).rejoined


def test_no_workload_may_run_before_the_overlay_and_its_firewall():
    engine = EngineSection(enabled=False)
    assert make_plan(engine, Inventory(), None, overlay_ready=True).blocked == "not joined yet"
    assert not make_plan(engine, Inventory(), dataclasses.replace(IDENT, revoked=True), True).may_run
    assert "overlay" in make_plan(engine, Inventory(), IDENT, overlay_ready=False).blocked
    plan = make_plan(engine, Inventory(), IDENT, overlay_ready=True)
    assert plan.may_run and plan.engine_wanted() is None and plan.engine_gpus == () and plan.model is None
