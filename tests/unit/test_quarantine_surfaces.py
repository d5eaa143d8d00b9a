"""Where a quarantine by the audits is shown (issue #20): the operator's fleet page and the
head's metrics; the PC's owner's `status`, screen and state; the agent's Ray offer."""

from __future__ import annotations

from dataclasses import replace

from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from garage_node.core.wire import NodeState, QuarantineStatus, Status
from garage_node.head.audit.trust import NodeTrust
from garage_node.head.fleetpage import History, create_fleet_app
from garage_node.node.state import Facts, derive
from tests.unit.test_fleetpage import OFFLINE_AFTER_S, Clock, FakeRegistry, report
from tests.unit.test_gateway import MODEL, call, gw  # noqa: F401 (gw: the fixture)

WHY = "greedy tokens below the verifier's choice in 31 of 40 audits"


# ---------------------------------------------------------------- the operator


def test_the_fleet_page_puts_a_quarantined_pc_first_with_why_and_counts_it():
    clock = Clock()
    reg = FakeRegistry()
    for node, name in (("n1", "alice-pc"), ("n2", "bob-pc"), ("n3", "carol-pc")):
        reg.put(node, name, clock.t, report())
    standing = {"n1": NodeTrust("n1", state="quarantined", why=WHY, since=clock.t, frozen_at=clock.t),
                "n2": NodeTrust("n2", trusted=True)}
    app = create_fleet_app(reg, History(OFFLINE_AFTER_S, clock=clock), OFFLINE_AFTER_S, trust=lambda: standing,
                           clock=clock)
    data = TestClient(app).get("/api/fleet").json()
    pcs = {p["name"]: p for p in data["pcs"]}
    assert pcs["alice-pc"]["problem"] == f"quarantined by the audits: {WHY}"
    assert pcs["alice-pc"]["audit"]["state"] == "quarantined" and pcs["alice-pc"]["audit"]["why"] == WHY
    assert data["pcs"][0]["name"] == "alice-pc"  # problems first
    assert pcs["bob-pc"]["problem"] is None and pcs["bob-pc"]["audit"]["trusted"] is True
    assert pcs["carol-pc"]["audit"] is None
    assert data["totals"]["quarantined"] == 1 and data["totals"]["problems"] == 1
    detail = TestClient(app).get("/api/pc/n1")
    assert detail.status_code == 200 and detail.json()["pc"]["audit"]["why"] == WHY
    standing["n1"] = replace(standing["n1"], state="rechecking")
    clock.t += 5
    data = TestClient(app).get("/api/fleet").json()
    assert data["pcs"][0]["problem"] == f"re-checked on canaries after a quarantine: {WHY}"


def test_the_fleet_page_shows_the_rest_when_the_trust_store_fails():
    clock = Clock()
    reg = FakeRegistry()
    reg.put("n1", "alice-pc", clock.t, report())

    def broken():
        raise RuntimeError("database is locked")

    app = create_fleet_app(reg, History(OFFLINE_AFTER_S, clock=clock), OFFLINE_AFTER_S, trust=broken, clock=clock)
    data = TestClient(app).get("/api/fleet").json()
    assert [p["name"] for p in data["pcs"]] == ["alice-pc"] and data["pcs"][0]["audit"] is None


def _samples(g) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(generate_latest(g.metrics.registry).decode()) for s in f.samples}


def test_metrics_count_quarantined_pcs_and_name_them(gw):  # noqa: F811
    before = _samples(gw)
    assert before[("garage_audit_quarantined_pcs", (("state", "quarantined"),))] == 0  # not watched yet: 0
    gw.metrics.watch_trust(gw.trust.snapshot)
    gw.trust.set_trusted("n2", True)
    gw.trust.quarantine("n1", WHY)
    s = _samples(gw)
    assert s[("garage_audit_quarantined_pcs", (("state", "quarantined"),))] == 1
    assert s[("garage_audit_quarantined_pcs", (("state", "rechecking"),))] == 0
    assert s[("garage_node_quarantined", (("name", "alice-pc"), ("node", "n1"), ("state", "quarantined")))] == 1
    assert s[("garage_audit_trusted_pcs", ())] == 1
    gw.trust.start_recheck("n1")
    s = _samples(gw)
    assert s[("garage_audit_quarantined_pcs", (("state", "rechecking"),))] == 1
    gw.trust.release("n1")
    s = _samples(gw)
    assert s[("garage_audit_quarantined_pcs", (("state", "quarantined"),))] == 0
    assert not any(k[0] == "garage_node_quarantined" for k in s)


# ---------------------------------------------------------------- the owner


QUARANTINED = QuarantineStatus(state="quarantined", why=WHY, since=1_800_000_000.0, hint="serve the assigned model")


def joined(**kw) -> Facts:
    base = dict(joined=True, revoked=False, enrollment=None, version_mismatch=None, overlay_ready=True,
                head_reachable=True, ray_running=True, ray_alive_at_head=True, overlay_ip="100.96.0.7", healthy_gpus=1)
    return Facts(**{**base, **kw})  # type: ignore[arg-type]


def test_the_state_says_quarantined_above_a_pause_and_while_ray_restarts():
    state, message = derive(joined(quarantine=("quarantined", WHY), paused="outside serving hours"))
    assert state is NodeState.QUARANTINED and WHY in message and "operator releases it" in message
    assert derive(joined(quarantine=("quarantined", WHY), ray_running=False))[0] is NodeState.QUARANTINED
    state, message = derive(joined(quarantine=("rechecking", WHY)))
    assert state is NodeState.QUARANTINED and message.startswith("being re-checked")
    # What a person must fix first still comes first: the head unreachable, revoked.
    assert derive(joined(quarantine=("quarantined", WHY), head_reachable=False))[0] is NodeState.DEGRADED
    assert derive(joined())[0] is NodeState.JOINED


def owner_status(quarantine: QuarantineStatus | None) -> Status:
    from tests.unit.test_screen import joined as joined_status

    s = joined_status()
    return replace(s, state=NodeState.QUARANTINED if quarantine else s.state, quarantine=quarantine)


def test_status_and_the_screen_say_why_and_what_the_owner_can_do():
    from garage_node.node import screen, status

    s = owner_status(QUARANTINED)
    text = status.render(s)
    assert f"Audits:    QUARANTINED since 2027-01-15 08:00 UTC: {WHY}" in text
    assert "To do:" in text and "serve the assigned model" in text and "✗ quarantined" in text
    lines = screen.layout(s, width=80, height=30, now=0.0)
    audit = [ln for ln in lines if ln.text.startswith("Audits:")]
    assert audit and audit[0].style == "alert" and "QUARANTINED" in audit[0].text
    assert any(ln.text.startswith("To do:") for ln in lines)
    assert screen.STATE_COLOUR["quarantined"] == "red"
    assert "█" in "".join(ln.text for ln in lines if ln.style == "big")
    plain = status.render(owner_status(None))
    assert "Audits:" not in plain


def test_the_status_document_carries_the_quarantine_through_json():
    from garage_node.core.wire import decode, encode

    s = owner_status(QUARANTINED)
    assert decode(encode(s), Status).quarantine == QUARANTINED
    assert decode(encode(owner_status(None)), Status).quarantine is None


# ---------------------------------------------------------------- the agent


def test_a_quarantined_pc_stops_offering_its_gpus_to_ray_and_offers_them_again_once_released(tmp_path):
    from garage_node.node.status import render
    from testing.agentrig import rig

    r = rig(tmp_path)
    r.head.ray_alive = True
    r.passes(6)
    assert r.agent.state is NodeState.JOINED
    gpus = r.ray.starts[-1][r.ray.starts[-1].index("--num-gpus") + 1]
    assert gpus != "0"
    r.head.quarantine = QUARANTINED
    r.passes(8)  # past the next heartbeat
    s = r.status()
    assert s.state is NodeState.QUARANTINED and WHY in s.message and s.quarantine == QUARANTINED
    argv = r.ray.starts[-1]
    assert argv[argv.index("--num-gpus") + 1] == "0"  # restarted offering Ray no GPU
    assert f"QUARANTINED since 2027-01-15 08:00 UTC: {WHY}" in render(s)
    r.head.quarantine = None  # released by the operator after a passed re-check
    r.passes(8)
    argv = r.ray.starts[-1]
    assert r.status().quarantine is None and argv[argv.index("--num-gpus") + 1] == gpus
    assert r.agent.state is not NodeState.QUARANTINED


def test_status_and_the_screen_say_what_of_the_tokens_is_earned_held_and_frozen():
    from garage_node.core.wire import TokensServed
    from garage_node.node import screen, status

    s = replace(owner_status(None), tokens_served=TokensServed(today=1200, total=3_400_000, earned=3_000_000,
                                                               held=400_000, frozen=0))
    assert "3.0 M earned, 400.0 k held until the region's audits trust them" in status.render(s)
    assert "frozen" not in status.render(s)
    lines = [ln.text for ln in screen.layout(s, width=100, height=40, now=0.0)]
    assert any("3,000,000 earned, 400,000 held" in ln for ln in lines)
    frozen = replace(s, tokens_served=replace(s.tokens_served, held=0, frozen=400_000))
    assert "400.0 k frozen by the quarantine" in status.render(frozen)
    older = replace(s, tokens_served=TokensServed(today=1, total=2))  # a head without audits
    assert "earned" not in status.render(older)
