"""Rollouts at the head (head/rollout.py, rolloutstore.py, rolloutkeeper.py, rolloutops.py): a
region of 1,000 simulated PCs (testing/rolloutsim.py) heartbeating through the head's report
fan-out and heartbeat extras, a real SQLite file, the operator's commands through a second
connection to it as the CLI makes them, a stored release signed with a throwaway gpg key; and
`update_target` in a real heartbeat answer of the control API."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import pytest

from garage_node.core import wire
from garage_node.core.wire import UpdateOutcome, UpdateStatus
from garage_node.head.api import ApiHooks
from garage_node.head.registry import NodeRow
from garage_node.head.releases import ReleaseStore
from garage_node.head.reports import Reports
from garage_node.head.rollout import MemberState, Rollout, RolloutError, RolloutPlan, RolloutState, wave_sizes
from garage_node.head.reports import with_extra
from garage_node.head.rolloutkeeper import RolloutKeeper
from garage_node.head.rolloutops import command, start, summary
from garage_node.head.rolloutstore import RolloutStore
from testing.headapi import enrolled_pc
from testing.releases import SigningKey, make_key, make_release
from testing.rolloutsim import ROUND_S, Behaviour, Region, SimPC

N = 1000
V2 = "v2"
PLAN = RolloutPlan(version=V2, canary=1, waves=(1, 10, 50, 100), max_failures_pct=2,
                   start_timeout_s=10 * ROUND_S, update_timeout_s=15 * ROUND_S)


@pytest.fixture(scope="module")
def key(tmp_path_factory) -> Iterator[SigningKey]:
    k = make_key(tmp_path_factory.mktemp("key"))
    yield k
    k.close()


@pytest.fixture
def releases(tmp_path, key) -> ReleaseStore:
    store = ReleaseStore(tmp_path / "releases")
    store.trust_key(key.public)
    store.add(make_release(tmp_path / "src", V2, key))
    return store


def node_row(pc: SimPC, now: float) -> NodeRow:
    return NodeRow(id=pc.node_id, name=pc.node_id, region="r", wg_public_key="k", overlay_ip="100.96.0.2",
                   enrolled_at=0.0, last_seen=now, revoked_at=None, report={"update": wire.encode(pc.facts())},
                   ray_alive=True, ray_checked_at=None)


def region(tmp_path: Path, releases: ReleaseStore, behaviours: dict[int, Behaviour] | None = None,
           default: Behaviour = Behaviour.HEALTHY, plan: RolloutPlan = PLAN, **pc_kw) -> Region:
    clock = [1_000_000.0]
    pcs = [SimPC(f"n{i:010d}", (behaviours or {}).get(i, default), **pc_kw) for i in range(N)]
    start(operator(tmp_path), releases, [node_row(pc, clock[0]) for pc in pcs], plan, clock[0], offline_after_s=60)
    store = RolloutStore(tmp_path / "rollout.sqlite", synchronous="NORMAL")  # as the head's keeper opens it
    return Region(RolloutKeeper(store, clock=lambda: clock[0]), pcs, clock)


def operator(tmp_path: Path) -> RolloutStore:
    """The CLI's own connection to the rollout's file."""
    return RolloutStore(tmp_path / "rollout.sqlite")


def test_wave_sizes():
    assert wave_sizes(1000, PLAN) == [1, 9, 90, 400, 500]
    assert wave_sizes(5, PLAN) == [1, 1, 1, 1, 1]  # at least one PC a wave while PCs are left
    assert wave_sizes(300, PLAN) == [1, 2, 27, 120, 150]
    assert wave_sizes(1, PLAN) == [1, 0, 0, 0, 0]
    for bad, match in (({"canary": 0}, "--canary"), ({"waves": (10, 5, 100)}, "rising"),
                       ({"waves": (1, 50)}, "end at 100"), ({"max_failures_pct": 101}, "--max-failures")):
        with pytest.raises(RolloutError, match=match):
            RolloutPlan(V2, **bad).check()  # type: ignore[arg-type]


def test_a_failing_canary_touches_at_most_12_pcs_and_stops_the_rollout(tmp_path, releases):
    t0 = time.monotonic()
    reg = region(tmp_path, releases, default=Behaviour.BROKEN)
    reg.run(40)
    r = reg.keeper.store.current()
    assert r is not None and r.state == RolloutState.HALTED
    assert "the canary failed" in r.reason or "of the canary failed" in r.reason
    assert reg.began() <= 12 and r.touched() <= 12, (reg.began(), r.touched())
    assert reg.began() == 1  # the canary alone
    canary = next(pc for pc in reg.pcs if pc.began_round is not None)
    # Back on v1 after its tries: never targeted with v2 again, in this rollout or the next.
    assert reg.extras(canary.node_id).update_target is None
    assert (canary.node_id, V2) in reg.keeper.store.blocked()
    assert all(reg.extras(pc.node_id).update_target is None for pc in reg.pcs)
    print(f"\nfailing canary: {reg.began()} PC touched, halted after {reg.rnd} rounds "
          f"({time.monotonic() - t0:.1f} s for {N} PCs)")


def test_a_canary_that_passes_then_a_failing_first_wave_stops_within_12(tmp_path, releases):
    # Every PC but the canary fails: the canary (1) comes back, the 1 % wave (9) begins and fails.
    probe = Rollout.start(PLAN, [f"n{i:010d}" for i in range(N)], 0.0)
    canary_index = int(next(m.node_id for m in probe.members.values() if m.wave == 0)[1:])
    reg = region(tmp_path, releases, behaviours={canary_index: Behaviour.HEALTHY}, default=Behaviour.BROKEN)
    reg.run(40)
    r = reg.keeper.store.current()
    assert r is not None and r.state == RolloutState.HALTED and "wave 1 (1 %)" in r.reason
    assert reg.began() <= 12 and reg.began() == 10


def test_a_canary_that_does_not_come_back_in_time_stops_the_rollout(tmp_path, releases):
    reg = region(tmp_path, releases, default=Behaviour.SILENT)
    reg.run(30)
    r = reg.keeper.store.current()
    assert r is not None and r.state == RolloutState.HALTED
    assert "did not come back on the new version within 15 min" in r.reason
    assert reg.began() == 1


def test_all_healthy_the_waves_complete_in_the_order_given(tmp_path, releases):
    t0 = time.monotonic()
    reg = region(tmp_path, releases)
    reg.run(80)
    r = reg.keeper.store.current()
    assert r is not None and r.state == RolloutState.DONE, summary(r) if r else None
    assert all(pc.os_version == V2 for pc in reg.pcs)
    assert r.wave_sizes == [1, 9, 90, 400, 500] and r.counts()["ok"] == N
    by_wave: dict[int, list[SimPC]] = {}
    for pc in reg.pcs:
        by_wave.setdefault(r.members[pc.node_id].wave, []).append(pc)
    assert [len(by_wave[w]) for w in sorted(by_wave)] == [1, 9, 90, 400, 500]
    for w in range(1, 5):
        # No PC of a wave was told before every PC of the wave before it was back, blessed.
        prev_done = max(pc.done_round for pc in by_wave[w - 1] if pc.done_round is not None)
        first_told = min(pc.first_target_round for pc in by_wave[w] if pc.first_target_round is not None)
        assert first_told > prev_done, (w, first_told, prev_done)
    print(f"\nall healthy: {N} PCs on {V2} after {reg.rnd} rounds ({time.monotonic() - t0:.1f} s)")
    # A PC that was off during the whole rollout catches up when it comes back.
    late = SimPC("n9999999999")
    reg.pcs.append(late)
    reg.run(8)
    assert late.os_version == V2 and reg.keeper.store.current().counts()["ok"] == N + 1  # type: ignore[union-attr]


def test_pause_resume_and_abort_do_what_they_say(tmp_path, releases):
    reg = region(tmp_path, releases)
    while reg.keeper.store.current().open_waves < 3:  # type: ignore[union-attr]
        reg.round()
    cli = operator(tmp_path)
    assert command(cli, "pause", reg.clock[0]).state == RolloutState.PAUSED
    began = reg.began()
    reg.run(30)  # longer than the start timeout: paused PCs are not passed over either
    r = reg.keeper.store.current()
    assert r is not None and r.state == RolloutState.PAUSED
    assert reg.began() == began  # no PC began while paused
    assert r.counts()["passed-over"] == 0
    started_ok = sum(1 for pc in reg.pcs if pc.os_version == V2)
    assert started_ok == began  # those that had begun finished
    with pytest.raises(RolloutError, match="not running: nothing to pause"):
        command(cli, "pause", reg.clock[0])
    assert command(cli, "resume", reg.clock[0]).state == RolloutState.RUNNING
    reg.run(5)
    assert reg.began() > began  # it goes on
    # Abort: nobody else begins, nobody not begun is told.
    command(cli, "abort", reg.clock[0])
    began = reg.began()
    reg.run(20)
    r = reg.keeper.store.current()
    assert r is not None and r.state == RolloutState.ABORTED and reg.began() == began < N
    assert all(reg.extras(pc.node_id).update_target is None for pc in reg.pcs if pc.began_round is None)
    with pytest.raises(RolloutError, match="already aborted"):
        command(cli, "abort", reg.clock[0])
    with pytest.raises(RolloutError, match="aborted, not paused"):
        command(cli, "resume", reg.clock[0])


def test_pcs_outside_their_window_are_passed_over_and_catch_up(tmp_path, releases):
    # 5 % of the PCs (one in each twenty) have their update window closed for the first 60 rounds.
    reg = region(tmp_path, releases, behaviours={i: Behaviour.DEFER for i in range(0, N, 20)}, defer_until_round=60)
    reg.run(60)
    r = reg.keeper.store.current()
    assert r is not None and r.state == RolloutState.DONE  # they held no wave back
    assert r.counts()["passed-over"] == N // 20
    reg.run(10)
    assert all(pc.os_version == V2 for pc in reg.pcs)  # the last wave kept their target
    assert reg.keeper.store.current().counts()["ok"] == N  # type: ignore[union-attr]


def test_start_refuses_what_it_cannot_do(tmp_path, releases):
    store = RolloutStore(tmp_path / "r.sqlite")
    pcs = [SimPC(f"n{i:010d}") for i in range(3)]
    now = 1_000_000.0
    with pytest.raises(RolloutError, match="holds no release v9.*head release add"):
        start(store, releases, [node_row(pc, now) for pc in pcs], RolloutPlan("v9"), now, 60)
    with pytest.raises(RolloutError, match="no PC can take v2"):
        start(store, releases, [node_row(SimPC("n0000000001", os_version=V2), now)], RolloutPlan(V2), now, 60)
    start(store, releases, [node_row(pc, now) for pc in pcs], RolloutPlan(V2), now, 60)
    with pytest.raises(RolloutError, match="is running: abort it first"):
        start(store, releases, [node_row(pc, now) for pc in pcs], RolloutPlan(V2), now, 60)
    # Offline PCs, another variant, an owner who said "never": not in it.
    store2 = RolloutStore(tmp_path / "r2.sqlite")
    rows = [node_row(SimPC("n0000000001"), now - 3600),
            NodeRow("n0000000002", "b", "r", "k", "ip", 0.0, now, None,
                    {"update": wire.encode(UpdateStatus(os_version="v1", variant="nvidia"))}, True, None),
            NodeRow("n0000000003", "c", "r", "k", "ip", 0.0, now, None,
                    {"update": wire.encode(UpdateStatus(os_version="v1", variant="base", policy="never"))}, True, None),
            NodeRow("n0000000004", "d", "r", "k", "ip", 0.0, now, None, {"state": "older agent"}, True, None)]
    with pytest.raises(RolloutError, match="no PC can take v2"):
        start(store2, releases, rows, RolloutPlan(V2), now, 60)


def test_a_pc_that_rolled_back_is_not_targeted_by_a_new_rollout_of_that_version(tmp_path, releases):
    reg = region(tmp_path, releases, default=Behaviour.BROKEN)
    reg.run(20)
    cli = operator(tmp_path)
    command(cli, "abort", reg.clock[0]) if cli.current().state != RolloutState.HALTED else None  # type: ignore[union-attr]
    canary = next(pc for pc in reg.pcs if pc.began_round is not None)
    r = start(cli, releases, [node_row(pc, reg.clock[0]) for pc in reg.pcs], PLAN, reg.clock[0], 120)
    assert canary.node_id not in r.members and len(r.members) == N - 1


def test_the_heartbeat_answer_carries_the_target(tmp_path, releases):
    store = RolloutStore(tmp_path / "rollout.sqlite")
    keeper = RolloutKeeper(store)
    reports = Reports()
    reports.subscribe(keeper.on_report)
    pc = enrolled_pc(tmp_path, ApiHooks(reports=reports, node_extras=with_extra(lambda _: wire.HeartbeatExtras(),
                                                                                 "update_target", keeper.target)))
    report = wire.encode(wire.replace(pc_report(), update=UpdateStatus(os_version="v1", variant="base", blessed=True,
                                                                          policy="idle")))

    def beat() -> wire.HeartbeatReply:
        r = pc.client.post(f"/v1/nodes/{pc.node_id}/heartbeat", json={"report": report},
                           headers={"Authorization": f"Bearer {pc.enrollment['credential']}"})
        assert r.status_code == 200, r.text
        return wire.decode(r.json(), wire.HeartbeatReply)

    assert beat().update_target is None  # no rollout yet
    pc.registry.flush()
    start(operator(tmp_path), releases, pc.registry.nodes(), RolloutPlan(V2), time.time(), 60)  # as the CLI does
    assert beat().update_target == V2
    # The PC reports it is installing, then is back on v2, blessed: the rollout is done.
    report["update"] = wire.encode(UpdateStatus(os_version="v1", variant="base", blessed=True, last_version=V2,
                                                last_outcome=UpdateOutcome.INSTALLING))
    beat()
    assert keeper.store.current().members[pc.node_id].state == MemberState.STARTED  # type: ignore[union-attr]
    report["update"] = wire.encode(UpdateStatus(os_version=V2, variant="base", blessed=True, last_version=V2,
                                                last_outcome=UpdateOutcome.OK))
    beat()
    keeper.tick()
    assert keeper.store.current().state == RolloutState.DONE  # type: ignore[union-attr]


def pc_report() -> wire.NodeReport:
    from testing.fakes import sample_report
    return sample_report()


def test_head_rollout_commands(tmp_path, key, capsys):
    from garage_node.cli import main
    from garage_node.core.wireguard import generate_private_key, public_key_of
    from garage_node.head import setup
    from garage_node.head.config import load_head_config

    conf = tmp_path / "head.toml"
    conf.write_text(f'[head]\nstate_dir = "{tmp_path / "state"}"\n[api]\nadvertise_host = "203.0.113.7"\n')
    args = ["--config", str(conf)]
    assert main(["head", "rollout", "status", *args]) == 69  # not initialised
    assert "head init" in capsys.readouterr().err
    cfg = load_head_config(conf)
    setup.init(cfg)
    reg = setup.open_registry(cfg)
    reg.add_token("tok001", "s" * 43, 600, uses=None)
    ids = []
    for i in range(3):
        e = reg.enroll("tok001", "s" * 43, f"pc-{i}", cfg.head.region, public_key_of(generate_private_key()))
        reg.record_heartbeat(e.node.id, {**wire.encode(pc_report()), "update": wire.encode(
            UpdateStatus(os_version="v1", variant="base", blessed=True, policy="window"))})
        ids.append(e.node.id)
    assert main(["head", "rollout", "status", *args]) == 0
    assert "no rollout yet" in capsys.readouterr().out
    assert main(["head", "rollout", "start", V2, *args]) == 2
    assert "holds no release v2" in capsys.readouterr().err
    assert main(["head", "release", "trust-key", str(key.public), *args]) == 0
    assert main(["head", "release", "add", str(make_release(tmp_path / "src", V2, key)), *args]) == 0
    capsys.readouterr()
    assert main(["head", "rollout", "start", V2, "--waves", "50,100", *args]) == 0
    assert "started over 3 PCs (canary (1): 1, 50 %: 1, 100 %: 1)" in capsys.readouterr().out
    assert main(["head", "rollout", "pause", *args]) == 0
    assert main(["head", "rollout", "status", *args]) == 0
    out = capsys.readouterr().out
    assert f"rollout of {V2} (base): paused" in out and "canary (1)" in out
    assert main(["head", "rollout", "start", V2, *args]) == 2
    assert "is paused: abort it first" in capsys.readouterr().err
    assert main(["head", "rollout", "resume", *args]) == 0
    assert main(["head", "rollout", "abort", *args]) == 0
    capsys.readouterr()
    assert main(["head", "rollout", "status", "--json", *args]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["state"] == "aborted" and doc["version"] == V2 and [w["size"] for w in doc["waves"]] == [1, 1, 1]
    assert main(["head", "rollout", "start", V2, "--waves", "5,1", *args]) == 2
    assert "--waves must be rising" in capsys.readouterr().err


def test_head_nodes_shows_the_os_version_and_the_update(tmp_path):
    from garage_node.head.fleet import render_nodes, row_of

    def row(u: UpdateStatus) -> str:
        report = {**wire.encode(pc_report()), "update": wire.encode(u)}
        n = NodeRow("n0000000001", "pc-1", "r", "k", "100.96.0.2", 0.0, 100.0, None, report, True, None)
        return render_nodes([row_of(n, 100.0, 15.0)])

    table = row(UpdateStatus(os_version="2026.12.1", variant="base", blessed=True))
    assert "OS" in table.splitlines()[0] and "2026.12.1" in table
    assert "rolled back from v2: v2 did not pass" in row(UpdateStatus(
        os_version="v1", last_version="v2", last_outcome=UpdateOutcome.ROLLED_BACK,
        last_why="v2 did not pass its health check within its tries: back on v1"))
    assert "updating to v2" in row(UpdateStatus(os_version="v1", last_version="v2",
                                                last_outcome=UpdateOutcome.INSTALLING))
    assert "update to v2 waits: outside the update window" in row(UpdateStatus(
        os_version="v1", target="v2", pending_why="outside the update window daily 03:00-06:00"))
    assert "update" not in row(UpdateStatus(os_version="v2", target="v2", last_version="v2",
                                            last_outcome=UpdateOutcome.OK)).split("\n")[1]


def test_a_failure_left_from_an_aborted_rollout_does_not_stop_the_next(tmp_path, releases):
    # Every PC last said "update to v2 failed" (say, the head's disk was full during a rollout
    # the operator aborted). A new rollout of v2 must not halt on that old word: each PC tries
    # again, and only a failure after it began counts.
    clock = [1_000_000.0]
    pcs = [SimPC(f"n{i:010d}", last_version=V2, last_outcome=UpdateOutcome.FAILED) for i in range(50)]
    r = start(operator(tmp_path), releases, [node_row(pc, clock[0]) for pc in pcs], PLAN, clock[0], 60)
    assert all(m.stale_failure for m in r.members.values())
    reg = Region(RolloutKeeper(RolloutStore(tmp_path / "rollout.sqlite", "NORMAL"), clock=lambda: clock[0]), pcs, clock)
    reg.run(60)
    assert reg.keeper.store.current().state == RolloutState.DONE  # type: ignore[union-attr]
    assert all(pc.os_version == V2 for pc in pcs)
    # A PC that then begins and fails again does count: broken PCs halt the next rollout.
    clock2 = [clock[0]]
    pcs2 = [SimPC(f"m{i:010d}", Behaviour.BROKEN, last_version=V2, last_outcome=UpdateOutcome.FAILED)
            for i in range(50)]
    (tmp_path / "b").mkdir()
    start(operator(tmp_path / "b"), releases, [node_row(pc, clock2[0]) for pc in pcs2], PLAN, clock2[0], 60)
    reg2 = Region(RolloutKeeper(RolloutStore(tmp_path / "b" / "rollout.sqlite", "NORMAL"), clock=lambda: clock2[0]),
                  pcs2, clock2)
    reg2.run(20)
    assert reg2.keeper.store.current().state == RolloutState.HALTED and reg2.began() == 1  # type: ignore[union-attr]


def test_the_fleet_page_shows_the_rollout_and_each_pcs_versions(tmp_path, releases):
    """The page's JSON (head/fleetpage/view.py) carries the keeper's rollout as `head rollout
    status` summarises it, and each PC's OS versions and its update in words."""
    from garage_node.head.fleetpage import History
    from garage_node.head.fleetpage.view import fleet

    reg = region(tmp_path, releases, default=Behaviour.BROKEN)
    reg.run(40)
    canary = next(pc for pc in reg.pcs if pc.began_round is not None)
    rows = [full_row(pc, reg.clock[0]) for pc in reg.pcs[:3] + [canary]]
    page = fleet(rows, reg.clock[0], 60.0, History(60.0), rollout=reg.keeper.current)
    r = page["rollout"]
    assert r["version"] == V2 and r["state"] == "halted" and "canary" in r["reason"]
    assert r["counts"] == summary(reg.keeper.store.current())["counts"] and r["counts"]["failed"] == 1
    assert [w["size"] for w in r["waves"]] == [1, 9, 90, 400, 500] and r["waves"][0]["failed"] == 1
    assert r["failed"] == [{"node_id": canary.node_id, "wave": 0, "why": r["failed"][0]["why"]}]
    pcs = {p["id"]: p for p in page["pcs"]}
    os = pcs[canary.node_id]["os"]
    assert os["version"] == "v1" and os["note"] == f"rolled back from {V2}", os
    assert all(p["os"]["version"] == "v1" and p["os"]["note"] is None for i, p in pcs.items() if i != canary.node_id)
    # No rollout yet, and a PC that is no stick with versions: nothing is made up.
    empty = fleet([replace_report(rows[0], {})], reg.clock[0], 60.0, History(60.0), rollout=lambda: None)
    assert empty["rollout"] is None and empty["pcs"][0]["os"] is None


def full_row(pc: SimPC, now: float) -> NodeRow:
    """A PC's row with a whole report (the page reads the report as the registry stores it)."""
    from dataclasses import replace

    from testing.fakes import sample_report

    return replace(node_row(pc, now), report=wire.encode(replace(sample_report(), update=pc.facts())))


def replace_report(row: NodeRow, report: dict) -> NodeRow:
    from dataclasses import replace

    return replace(row, report=report)
