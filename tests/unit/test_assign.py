"""The agent carries out the head's assignment (issue #18), in-process on the agent rig: the real
Agent, EngineManager and node/weights.py, with the head, Docker and the head's model store as
fakes (testing/agentrig.py) on a clock the test moves."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from garage_node.core.wire import Assignment, EngineState, NodeReport
from garage_node.node.config import EngineSection
from garage_node.node.identity import load
from garage_node.node.status import render
from testing.agentrig import Rig, rig
from testing.catalogs import tiny_entries

CATALOG = tiny_entries("tiny-a", "tiny-b", id_prefix="garage/")

IMAGE = "garage-node/vllm-cpu:test"


def engine(tmp_path: Path, **kw) -> EngineSection:
    (tmp_path / "catalog.toml").write_text(CATALOG)
    base = EngineSection(enabled=True, device="cpu", image=IMAGE, catalog=str(tmp_path / "catalog.toml"),
                         cache_dir=tmp_path / "models", weights_dir=tmp_path / "weights", drain_grace_s=60.0)
    return dataclasses.replace(base, **kw)


def assigned(generation: int, model: str | None, weights_path: str | None = None) -> Assignment:
    return Assignment(generation=generation, model=model, weights_path=weights_path,
                      reason=f"demand for {model}" if model else "no demand")


@pytest.fixture
def r(tmp_path) -> Rig:
    r = rig(tmp_path, engine=engine(tmp_path), engine_in_step=True, images=(IMAGE,))
    r.probe.is_ready = True  # every engine the manager starts answers /health
    r.passes()
    return r


def serving(r: Rig) -> str | None:
    """The model the engine container serves (from its labels), None if none runs."""
    c = r.docker.containers.get("garage-engine")
    return c.labels.get("garage-node.model") if c is not None and c.running else None


def until(r: Rig, what, n: int = 30) -> None:
    """Agent passes (each followed by an engine pass) until `what()` holds; a fetch runs in a
    thread of its own, so each pass leaves it a moment."""
    for _ in range(n):
        if what():
            return
        r.passes()
        time.sleep(0.01)
    raise AssertionError(f"not reached in {n} passes")


def last_placement(r: Rig):
    return r.head.heartbeats[-1].placement


def test_a_newer_generation_is_carried_out_and_an_older_one_ignored(r):
    r.head.assignment = assigned(1, "tiny-a")
    until(r, lambda: serving(r) == "garage/tiny-a" and r.status().placement.assignment_generation == 1)
    s = r.status()
    assert s.engine.state is EngineState.HEALTHY and s.assignment.model == "tiny-a"
    assert "serving tiny-a, assigned by the head" in render(s) and "why: demand for tiny-a" in render(s)
    until(r, lambda: last_placement(r).assignment_generation == 1)  # and the head hears it

    r.head.assignment = assigned(2, "tiny-b")
    until(r, lambda: serving(r) == "garage/tiny-b" and r.status().placement.switching_to is None)
    assert r.status().placement.assignment_generation == 2
    r.head.assignment = assigned(1, "tiny-a")  # an older word (a stale answer): ignored
    r.passes(10)
    assert serving(r) == "garage/tiny-b" and r.status().placement.assignment_generation == 2


def test_the_head_hears_of_a_switch_before_the_engine_stops(r):
    r.head.assignment = assigned(1, "tiny-a")
    until(r, lambda: serving(r) == "garage/tiny-a" and r.status().placement.assignment_generation == 1)
    path = r.store.add("tiny-b", {"config.json": b'{"model": "b"}', "model.safetensors": b"\x01" * 4096})
    r.store.gate.clear()  # the download is under way until the test lets it finish
    stops: list[int] = []  # how many reports the head had when the old engine was stopped
    real_stop = r.docker.stop
    r.docker.stop = lambda name, timeout_s: (stops.append(len(r.head.heartbeats)), real_stop(name, timeout_s))[1]
    r.head.assignment = assigned(2, "tiny-b", path)
    until(r, lambda: r.status().placement.switching_to == "tiny-b")
    r.passes(8)  # downloading: the old engine serves on, and is not reported as draining
    s = r.status()
    assert serving(r) == "garage/tiny-a" and s.engine.state is EngineState.HEALTHY and not s.engine.draining
    assert s.placement.fetch_pct is not None and "switching to tiny-b (downloading 0 %)" in render(s)
    assert not last_placement(r).switching_to or not r.head.heartbeats[-1].engine.draining
    assert stops == []

    r.store.gate.set()
    until(r, lambda: serving(r) == "garage/tiny-b" and r.status().placement.switching_to is None)
    told = [i for i, rep in enumerate(r.head.heartbeats)
            if rep.placement and rep.placement.switching_to == "tiny-b" and rep.engine.draining]
    assert told and stops and told[0] < stops[0], (told, stops)  # the head knew first
    body = r.docker.bodies["garage-engine"]
    mount = next(m for m in body["HostConfig"]["Mounts"] if m["Target"] == "/models/served")
    assert Path(mount["Source"]) == r.agent.cfg.engine.weights_dir / "tiny-b" / "model"
    assert (Path(mount["Source"]) / "model.safetensors").read_bytes() == b"\x01" * 4096
    s = r.status()
    assert s.placement.assignment_generation == 2 and not s.engine.draining and s.placement.weights_held == ["tiny-b"]
    until(r, lambda: not r.head.heartbeats[-1].engine.draining and last_placement(r).assignment_generation == 2)


def test_an_unreachable_head_leaves_the_pc_serving_what_it_serves(r):
    r.head.assignment = assigned(1, "tiny-a")
    until(r, lambda: serving(r) == "garage/tiny-a" and r.status().placement.assignment_generation == 1)
    r.head.up = False
    r.passes(30)
    s = r.status()
    assert serving(r) == "garage/tiny-a" and s.engine.state is EngineState.HEALTHY and s.head.reachable is False
    assert "serving tiny-a, assigned by the head" in render(s)
    # A switch whose weights cannot be fetched (the store is the head): the old engine serves on.
    r.head.up = True
    r.store.up = False
    path = r.store.add("tiny-b", {"config.json": b"{}"})
    r.head.assignment = assigned(2, "tiny-b", path)
    until(r, lambda: any(p.source == "placement" for p in r.status().problems))
    r.passes(5)
    s = r.status()
    problem = next(p for p in s.problems if p.source == "placement")
    assert "fetching the weights of tiny-b from the head failed" in problem.message and problem.retry_in_s
    assert serving(r) == "garage/tiny-a" and not s.engine.draining
    r.store.up = True
    until(r, lambda: serving(r) == "garage/tiny-b" and r.status().placement.assignment_generation == 2, n=40)
    assert not any(p.source == "placement" for p in r.status().problems)


def test_without_an_assignment_the_pc_plans_for_itself(tmp_path):
    r = rig(tmp_path, engine=engine(tmp_path, model="tiny-a"), engine_in_step=True, images=(IMAGE,))
    r.probe.is_ready = True
    r.passes(10)
    s = r.status()
    assert serving(r) == "garage/tiny-a" and s.assignment is None and s.placement.assignment_generation == 0
    assert s.placement.pinned_model == "tiny-a" and s.placement.device == "cpu"
    assert "chosen by this PC" in render(s)
    report: NodeReport = r.head.heartbeats[-1]
    assert report.placement is not None and report.placement.pinned_model == "tiny-a"


def test_an_assignment_the_pc_cannot_carry_out_is_refused_visibly(tmp_path):
    # The owner pinned tiny-a: "only this model or nothing".
    r = rig(tmp_path, engine=engine(tmp_path, model="tiny-a"), engine_in_step=True, images=(IMAGE,))
    r.probe.is_ready = True
    r.passes(5)
    r.head.assignment = assigned(1, "tiny-b")
    r.passes(10)
    s = r.status()
    assert serving(r) == "garage/tiny-a" and s.placement.assignment_generation == 0
    problem = next(p for p in s.problems if p.source == "placement")
    assert "refused the head's assignment of tiny-b (generation 1)" in problem.message
    assert "the owner pinned tiny-a" in problem.message
    assert "not carried out, refused: the owner pinned tiny-a" in render(s)
    seen = r.head.heartbeats[-1].placement  # what the head sees: the refusal and why
    assert seen.assignment_generation == 0 and seen.refused_generation == 1
    assert seen.refused_why is not None and seen.refused_why.startswith("the owner pinned tiny-a")
    # The pinned model is carried out, and the refusal is gone.
    r.head.assignment = assigned(3, "tiny-a")
    until(r, lambda: r.status().placement.assignment_generation == 3)
    assert serving(r) == "garage/tiny-a" and not any(p.source == "placement" for p in r.status().problems)
    until(r, lambda: last_placement(r).assignment_generation == 3)
    assert last_placement(r).refused_generation == 0 and last_placement(r).refused_why is None


def test_a_model_outside_the_pcs_catalog_is_refused(r):
    r.head.assignment = assigned(1, "tiny-a")
    until(r, lambda: serving(r) == "garage/tiny-a" and r.status().placement.assignment_generation == 1)
    r.head.assignment = assigned(2, "no-such-model")
    until(r, lambda: bool(r.status().problems))
    s = r.status()
    assert "the assigned model no-such-model is not in this PC's catalog" in s.problems[-1].message
    assert serving(r) == "garage/tiny-a" and s.placement.assignment_generation == 1


def test_weights_that_fail_their_check_are_refused_and_never_served(r):
    r.head.assignment = assigned(1, "tiny-a")
    until(r, lambda: serving(r) == "garage/tiny-a" and r.status().placement.assignment_generation == 1)
    path = r.store.add("tiny-b", {"model.safetensors": b"\x02" * 1024})
    r.store.damaged.add("tiny-b")
    r.head.assignment = assigned(2, "tiny-b", path)
    until(r, lambda: any(p.source == "placement" and "refused" in p.message for p in r.status().problems))
    s = r.status()
    assert "its weights failed the check" in s.problems[-1].message
    assert serving(r) == "garage/tiny-a" and s.placement.switching_to is None and s.placement.weights_held == []
    until(r, lambda: last_placement(r).refused_generation == 2)  # the head hears why
    assert last_placement(r).refused_why.startswith("its weights failed the check")


def test_an_assignment_of_nothing_drains_the_engine(r):
    r.head.assignment = assigned(1, "tiny-a")
    until(r, lambda: serving(r) == "garage/tiny-a" and r.status().placement.assignment_generation == 1)
    r.head.assignment = assigned(2, None)
    until(r, lambda: r.status().placement.assignment_generation == 2)
    s = r.status()
    assert serving(r) is None and s.engine.state is EngineState.DRAINED
    assert "serving nothing, as the head assigned" in render(s)
    assert s.placement.paused is False  # the head's word, not the owner's: it may assign again


def test_plan_explains_the_heads_assignment_then_the_pcs_own_choice(r, tmp_path, capsys):
    import argparse
    import json

    from garage_node.cli.node import plan
    from garage_node.node.localapi import LocalApi, Routes

    r.head.assignment = dataclasses.replace(assigned(4, "tiny-b"), max_model_len=1024)
    until(r, lambda: serving(r) == "garage/tiny-b" and r.status().placement.assignment_generation == 4)
    cfg = r.agent.cfg
    conf = tmp_path / "node.toml"
    conf.write_text(f'[node]\nruntime_dir = "{cfg.node.runtime_dir}"\nstate_dir = "{cfg.node.state_dir}"\n'
                    f'[engine]\ndevice = "cpu"\ncatalog = "{cfg.engine.catalog}"\n')
    api = LocalApi(cfg.socket_path, Routes(status=r.agent.snapshot, reconcile=lambda: None, drain=lambda: None,
                                           resume=lambda: None))
    api.start()
    try:
        args = argparse.Namespace(config=conf, override=tmp_path / "none.toml", json=False)
        assert plan(args) == 0
        out = capsys.readouterr().out
        assert "Assigned by the head (generation 4): tiny-b, context 1024" in out
        assert "why: demand for tiny-b" in out and "now: serving tiny-b, assigned by the head" in out
        assert "--served-model-name garage/tiny-b" in out and "--max-model-len 1024" in out
        assert "Without the head, this PC would choose:" in out
        assert plan(argparse.Namespace(config=conf, override=tmp_path / "none.toml", json=True)) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["decided_by"] == "head" and doc["assignment"]["model"] == "tiny-b"
        assert doc["assignment_carried_out"] is True
    finally:
        api.stop()


def test_an_agent_restarted_under_its_assigned_engine_keeps_it_without_a_switch(r):
    r.head.assignment = assigned(1, "tiny-a")
    until(r, lambda: serving(r) == "garage/tiny-a" and r.status().placement.assignment_generation == 1)
    cid = r.docker.containers["garage-engine"].id
    again = r.restart()
    again.identity = load(again.paths)  # as startup() does
    r.passes(6)
    s = r.status()
    assert r.docker.containers["garage-engine"].id == cid and r.docker.stops == []
    assert s.placement.assignment_generation == 1 and s.placement.switching_to is None
    assert not any(rep.engine.draining for rep in r.head.heartbeats)  # the gateway never lost it


def test_a_new_engine_that_never_becomes_healthy_is_refused_and_the_old_one_comes_back(tmp_path):
    """The switch to tiny-b starts an engine that never answers /health: past [engine]
    startup_timeout_s the agent refuses generation 2 with the engine's last message, goes back
    to tiny-a (generation 1), and tells the head, which reassigns; not 'switching' for ever."""
    r = rig(tmp_path, engine=engine(tmp_path, startup_timeout_s=30.0), engine_in_step=True, images=(IMAGE,))
    r.probe.ready = lambda spec: spec.model != "garage/tiny-b"  # type: ignore[method-assign]
    r.passes()
    r.head.assignment = assigned(1, "tiny-a")
    until(r, lambda: serving(r) == "garage/tiny-a" and r.status().placement.assignment_generation == 1)
    r.head.assignment = assigned(2, "tiny-b")
    until(r, lambda: serving(r) == "garage/tiny-b")  # the switch began: the old engine is gone
    until(r, lambda: last_placement(r).refused_generation == 2, n=80)
    why = last_placement(r).refused_why
    assert why is not None and "its engine did not become healthy" in why and "not answering /health" in why, why
    until(r, lambda: serving(r) == "garage/tiny-a" and r.status().engine.state is EngineState.HEALTHY)
    s = r.status()
    assert s.placement.switching_to is None and s.placement.assignment_generation == 1
    assert "(generation 2); not carried out, refused: its engine did not become healthy" in render(s)
    assert "serves what it served before" in render(s) and s.engine.model == "garage/tiny-a"
    problem = next(p for p in s.problems if p.source == "placement")
    assert "refused the head's assignment of tiny-b (generation 2)" in problem.message
    r.passes(10)  # the refused generation is not tried again while the head still says it
    assert serving(r) == "garage/tiny-a" and last_placement(r).switching_to is None
    # The head reassigns (its placer read the refusal): carried out, the refusal gone.
    r.head.assignment = assigned(3, "tiny-a")
    until(r, lambda: last_placement(r).assignment_generation == 3)
    assert last_placement(r).refused_generation == 0 and serving(r) == "garage/tiny-a"


def test_a_model_imported_at_the_head_reaches_a_pc_whose_catalog_lacks_it(r):
    """tiny-c is in the head's catalog only (`head model import`): the assignment carries its
    entry, and the PC plans and serves it without its stick being touched."""
    from garage_node.core.wire import CatalogModel, CatalogPrecision

    entry = CatalogModel(name="tiny-c", id="garage/tiny-c", parameters=4_200_000, num_layers=2,
                         num_attention_heads=4, num_kv_heads=4, head_dim=16, default_context_length=1024,
                         min_compute_capability="7.5", quantizations=[CatalogPrecision("fp32", 4.0, "float32",
                                                                                       "garage/tiny-c")], cpu=True)
    r.head.assignment = assigned(1, "tiny-c")  # an older head: no entry, so the PC refuses it
    until(r, lambda: last_placement(r).refused_generation == 1)
    assert "not in this PC's catalog" in last_placement(r).refused_why
    r.head.assignment = dataclasses.replace(assigned(2, "tiny-c"), catalog_entry=entry)
    until(r, lambda: serving(r) == "garage/tiny-c" and r.status().placement.assignment_generation == 2)
    cmd = r.docker.bodies["garage-engine"]["Cmd"]
    assert cmd[cmd.index("--max-model-len") + 1] == "1024"  # the head's facts: its default context
    assert not any(p.source == "placement" for p in r.status().problems)
    until(r, lambda: last_placement(r).assignment_generation == 2 and last_placement(r).refused_generation == 0)


def test_a_switch_stuck_without_a_verdict_from_the_engine_is_refused_after_its_time(tmp_path):
    """Docker stops answering mid-switch, so the engine manager never says "degraded": the
    agent's own limit ([engine] drain_grace_s + startup_timeout_s from the switch's start) ends
    it, and once Docker is back the PC serves tiny-a again."""
    r = rig(tmp_path, engine=engine(tmp_path, startup_timeout_s=30.0, drain_grace_s=20.0), engine_in_step=True,
            images=(IMAGE,))
    r.probe.ready = lambda spec: spec.model != "garage/tiny-b"  # type: ignore[method-assign]
    r.passes()
    r.head.assignment = assigned(1, "tiny-a")
    until(r, lambda: serving(r) == "garage/tiny-a" and r.status().placement.assignment_generation == 1)
    r.head.assignment = assigned(2, "tiny-b")
    until(r, lambda: serving(r) == "garage/tiny-b")
    r.docker.down = True
    r.passes(15)  # 30 s: not yet
    assert last_placement(r).refused_generation == 0 and last_placement(r).switching_to == "tiny-b"
    until(r, lambda: last_placement(r).refused_generation == 2, n=30)
    why = last_placement(r).refused_why
    assert why is not None and "not healthy 50 s after the switch began" in why, why
    r.docker.down = False
    until(r, lambda: serving(r) == "garage/tiny-a" and r.status().engine.state is EngineState.HEALTHY)
    assert r.status().placement.switching_to is None and r.status().placement.assignment_generation == 1


def test_the_old_engines_verdict_is_not_taken_for_the_new_ones(r):
    """The engine manager takes the new spec before it acts on it, so for a moment the agent
    may see the new spec with the old engine's state: a switch away from a crash-looping
    ("degraded") engine must not be refused for that; the new engine's own verdict is."""
    from garage_node.core.wire import EngineStatus
    from garage_node.node.engine.spec import assigned_spec

    r.head.assignment = assigned(1, "tiny-a")
    until(r, lambda: serving(r) == "garage/tiny-a" and r.status().placement.assignment_generation == 1)
    part, ident, inv = r.agent.assign, r.agent.identity, r.agent.gpus.inventory
    old_spec = r.agent.engine.spec
    b = assigned(2, "tiny-b")
    new_spec, _ = assigned_spec(r.agent.cfg.engine, inv, ident.overlay_ip, ident.engine_api_key, b)
    old = EngineStatus(state=EngineState.DEGRADED, restarts=3,
                       message="engine keeps crashing (exit code 1, 3 times in 10 min); retrying in 8 s")
    part.step(b, inv, ident, old, old_spec)  # the switch begins while the old engine crash-loops
    assert part.switching_to == "tiny-b"
    part.step(b, inv, ident, old, new_spec)  # the new spec taken, the old verdict still shown
    assert part.switching_to == "tiny-b" and part.refused is None
    new = EngineStatus(state=EngineState.DEGRADED, restarts=4,
                       message="engine running for 31 s but not answering /health; restarting it")
    part.step(b, inv, ident, new, new_spec)
    assert part.refused is not None and part.refused[0] == 2 and "not answering /health" in part.refused[1]
    assert part.switching_to is None


def fetch_threads(model: str) -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == f"fetch {model}" and t.is_alive()]


def test_a_download_no_longer_wanted_is_stopped_and_the_next_one_proceeds(r):
    """Pulling tiny-a (a long download), the head reassigns to tiny-b: tiny-a's download stops
    (it would otherwise hold the store until all of it arrived) and tiny-b is fetched and served."""
    big = r.store.add("tiny-a", {"model.safetensors": b"\x05" * (32 * 1024 * 1024)})  # 3.2 s at 1 MiB / 0.1 s
    r.store.slow.add("tiny-a")
    r.head.assignment = assigned(1, "tiny-a", big)
    until(r, lambda: (r.status().placement.fetch_pct or 0) > 0, n=100)
    small = r.store.add("tiny-b", {"config.json": b"{}", "model.safetensors": b"\x06" * 4096})
    r.head.assignment = assigned(2, "tiny-b", small)
    until(r, lambda: serving(r) == "garage/tiny-b" and r.status().placement.assignment_generation == 2, n=300)
    # Had tiny-a's download gone on, tiny-b's would have waited for all of it: tiny-a held.
    s = r.status()
    assert s.placement.weights_held == ["tiny-b"], s.placement.weights_held
    deadline = time.monotonic() + 5
    while fetch_threads("tiny-a") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not fetch_threads("tiny-a") and r.agent.cfg.engine.weights_dir.joinpath("tiny-a").exists() is False


def test_a_failed_download_says_so_and_when_it_is_tried_again(r):
    """After a failed download the old engine serves undisturbed: status says the download
    failed and when it is tried again, not that the old engine drains."""
    r.head.assignment = assigned(1, "tiny-a")
    until(r, lambda: serving(r) == "garage/tiny-a" and r.status().placement.assignment_generation == 1)
    r.store.up = False
    path = r.store.add("tiny-b", {"config.json": b"{}"})
    r.head.assignment = assigned(2, "tiny-b", path)
    until(r, lambda: any(p.source == "placement" for p in r.status().problems))
    r.passes()
    text = render(r.status())
    assert "switching to tiny-b (the download of its weights failed, see Problem; tried again in 1" in text, text
    assert "the old engine serves meanwhile" in text and "draining" not in text, text
    assert "fetching the weights of tiny-b from the head failed: the head's model store is unreachable" in text
    assert serving(r) == "garage/tiny-a" and not r.status().engine.draining


def test_status_reads_survive_the_agent_clearing_the_switch_between_two_reads(r):
    """status reads the part on the local API's thread while step() on the agent's thread sets
    `target`, `_fetch`, `carried`, `refused` to None: here each of them vanishes right after
    it is first read, the worst interleaving; a reader that reads one twice fails."""
    from garage_node.node.assign import AssignPart, Phase, _Fetch

    class Vanishing(AssignPart):
        pass

    for name in ("target", "_fetch", "carried", "refused"):
        def get(self, n=name):
            value = self.__dict__.get(n)
            self.__dict__[n] = None  # the agent's thread clears it now
            return value

        def put(self, value, n=name):
            self.__dict__[n] = value
        setattr(Vanishing, name, property(get, put))

    part = r.agent.assign
    for phase, job in ((Phase.FETCHING, _Fetch("tiny-b", pct=40.0)), (Phase.SWITCHING, None)):
        v = Vanishing(part.cfg, part.clock, part.health, part.weights)
        v.target, v.carried, v.refused, v._fetch, v.phase = assigned(2, "tiny-b"), assigned(1, "tiny-a"), \
            (3, "no room"), job, phase
        facts = v.facts(paused=False)
        assert facts.switching_to == "tiny-b" and facts.assignment_generation == 1 and facts.refused_generation == 3
        assert facts.fetch_pct == (40.0 if job is not None else None)
        for reader in ("words", "switching_to", "fetch_pct"):
            v.target, v.carried, v._fetch = assigned(2, "tiny-b"), assigned(1, "tiny-a"), job
            value = getattr(v, reader)
            if callable(value):
                value()


def test_an_agent_restarted_while_the_head_is_down_keeps_its_assigned_engine(r):
    """The assignment is kept in the state directory: an agent restarted while the head is
    unreachable goes on with the last one (no switch to its own plan, no drain), and the head's
    answer without an assignment, once it comes, hands the PC back to its own plan."""
    r.head.assignment = assigned(1, "tiny-b")
    until(r, lambda: serving(r) == "garage/tiny-b" and r.status().placement.assignment_generation == 1)
    cid = r.docker.containers["garage-engine"].id
    r.head.up = False
    again = r.restart(new_engine=True)  # the agent's process restarted: its engine manager too
    again.identity = load(again.paths)  # as startup() does
    r.passes(10)
    s = r.status()
    assert s.head.reachable is False and r.docker.containers["garage-engine"].id == cid and r.docker.stops == []
    assert s.engine.state is EngineState.HEALTHY and not s.engine.draining and serving(r) == "garage/tiny-b"
    assert s.placement.assignment_generation == 1 and "serving tiny-b, assigned by the head" in render(s)
    # The head back, answering without an assignment (placement turned off): the own plan.
    r.head.assignment = None
    r.head.up = True
    until(r, lambda: r.status().assignment is None and r.status().placement.assignment_generation == 0)
    again = r.restart()  # and a restart now does not bring the old assignment back
    again.identity = load(again.paths)
    r.head.up = False
    r.passes(3)
    assert r.status().assignment is None


def test_an_unusable_kept_assignment_is_ignored_with_a_warning(r, caplog):
    r.agent.paths.assignment.write_text("{not json")
    again = r.restart()
    again.identity = load(again.paths)
    assert again.session.assignment is None
    assert any("ignoring" in m and "assignment.json" in m for m in caplog.messages), caplog.messages


def test_an_agent_restarted_mid_download_with_the_head_down_keeps_serving_the_old_model(r):
    """Restarted while fetching generation 2's weights, the head and its store down: the engine
    of generation 1 (what was carried out, kept too) serves on; generation 2 waits for its weights."""
    r.head.assignment = assigned(1, "tiny-a")
    until(r, lambda: serving(r) == "garage/tiny-a" and r.status().placement.assignment_generation == 1)
    cid = r.docker.containers["garage-engine"].id
    path = r.store.add("tiny-b", {"model.safetensors": b"\x07" * (8 * 1024 * 1024)})
    r.store.slow.add("tiny-b")
    r.head.assignment = assigned(2, "tiny-b", path)
    until(r, lambda: r.status().placement.switching_to == "tiny-b")
    r.head.up = r.store.up = False
    again = r.restart(new_engine=True)
    again.identity = load(again.paths)
    r.passes(20)
    s = r.status()
    assert r.docker.containers["garage-engine"].id == cid and r.docker.stops == [] and serving(r) == "garage/tiny-a"
    assert s.placement.assignment_generation == 1 and s.placement.switching_to == "tiny-b" and not s.engine.draining
