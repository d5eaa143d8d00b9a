"""The agent's decisions, in-process: the real Agent with fakes at its edges (head, WireGuard
interface, Ray child, Docker) and a clock the test moves. No root, no network, no Ray; the
testbed suite proves the same behaviour on the real parts."""

from __future__ import annotations

import dataclasses

import pytest

from garage_node.core.wire import EngineState, NodeState, RayState, Status, TokensServed, Versions, decode, encode
from garage_node.node.status import render
from garage_node.node.config import EngineSection
from garage_node.node.identity import load
from garage_node.node.ray import ABSENT_RESTART_S, FIRST_JOIN_S
from testing.fakes import (ray_account,
                           region_facts)
from testing.agentrig import TOKEN, Rig, rig


def test_joins_then_is_listed_by_ray(tmp_path):
    r = rig(tmp_path)
    r.passes()
    ident = load(r.agent.paths)
    assert ident is not None and ident.node_id == "n0001" and ident.credential == "cred-secret"
    assert r.iface.is_up and r.iface.peer.endpoint == "10.9.0.1:51820"
    assert len(r.ray.starts) == 1 and "--num-gpus" in r.ray.starts[0]
    assert r.agent.state is NodeState.JOINING  # Ray worker started, not yet listed by the Ray head
    r.head.ray_alive = True
    r.passes(6)  # the next heartbeat is due after heartbeat_s (10 s)
    s = r.status()
    assert s.state is NodeState.JOINED and "100.96.0.2" in s.message and s.ray.state is RayState.ALIVE
    assert s.last_error is None and not r.agent.paths.join_token.exists()


def test_head_unreachable_then_back(tmp_path):
    r = rig(tmp_path)
    r.head.ray_alive = True
    r.passes(6)
    assert r.agent.state is NodeState.JOINED
    r.head.up = False
    r.passes(6)
    s = r.status()
    assert s.state is NodeState.DEGRADED and s.head.reachable is False
    assert "head unreachable" in s.last_error.message and s.last_error.retry_in_s is not None
    assert r.ray.running  # the node keeps its place: no restart of Ray for a head outage
    r.head.up = True
    r.passes(8)
    s = r.status()
    assert s.state is NodeState.JOINED and s.last_error is None and s.head.reachable is True
    assert len(r.ray.starts) == 1


def test_head_down_at_first_join_is_retried_with_backoff(tmp_path):
    r = rig(tmp_path)
    r.head.up = False
    r.passes(1, every_s=0.1)
    s = r.status()
    assert s.state is NodeState.ENROLLING and "head unreachable" in s.message and s.last_error.retry_in_s > 0
    assert r.agent.identity is None and not r.iface.is_up
    r.head.up = True
    r.passes(1, every_s=0.1)  # still in backoff: no new attempt yet
    assert r.head.enrollments == 0
    r.clock.advance(120)
    r.passes(1)
    assert r.head.enrollments == 1 and r.agent.identity is not None


def test_refused_token_is_not_retried_and_writes_nothing(tmp_path):
    r = rig(tmp_path)
    r.head.refuse = "token_used"
    r.passes(3, every_s=300)
    s = r.status()
    assert s.state is NodeState.ERROR and "token_used" in s.message
    assert "new join token" in s.last_error.hint and s.last_error.retry_in_s is None
    assert r.agent.identity is None and not r.agent.paths.identity.exists() and not r.iface.is_up


def test_unusable_token_and_no_token(tmp_path):
    r = rig(tmp_path, token="gn1.damaged")
    r.passes()
    s = r.status()
    assert s.state is NodeState.ERROR and "unusable" in s.last_error.message and "gn1.damaged" not in str(encode(s))
    r = rig(tmp_path / "other", token="")
    r.passes()
    s = r.status()
    assert s.state is NodeState.NEEDS_TOKEN and "join_token" in s.last_error.hint


def test_ray_worker_exit_is_restarted_after_its_backoff(tmp_path):
    r = rig(tmp_path)
    r.passes()
    r.ray.exit(1)
    r.agent.reconcile_once()
    assert not r.ray.running and r.status().ray.state is RayState.BACKOFF and r.status().ray.restarts == 1
    r.clock.advance(r.ray.restart_delay_s)
    r.agent.reconcile_once()
    assert r.ray.running and len(r.ray.starts) == 2


def test_worker_the_ray_head_lost_is_restarted_after_the_allowance(tmp_path):
    r = rig(tmp_path)
    r.head.ray_alive = True
    r.passes(6)
    r.head.ray_alive = False  # e.g. the Ray head restarted with a new cluster id
    r.passes(int(ABSENT_RESTART_S / 2) - 2)
    assert len(r.ray.starts) == 1  # not yet: Ray itself may still reconnect
    r.passes(10)
    assert len(r.ray.starts) == 2


OLD_CLUSTER, NEW_CLUSTER = "aa" * 28, "bb" * 28


def joined_in(tmp_path, cluster: str) -> Rig:
    r = rig(tmp_path)
    r.head.ray_alive, r.head.ray_cluster_id = True, cluster
    r.passes(6)
    assert r.agent.state is NodeState.JOINED and r.agent.ray.joined_cluster() == cluster and len(r.ray.starts) == 1
    return r


def test_a_new_ray_cluster_at_the_head_restarts_the_worker_at_once(tmp_path):
    r = joined_in(tmp_path, OLD_CLUSTER)
    # The head came back without its GCS state: its Ray head is a new cluster, which does not
    # list this worker. While the head's Ray is starting it knows no id yet: nothing happens.
    r.head.ray_alive, r.head.ray_cluster_id = False, ""
    r.passes(10)
    assert len(r.ray.starts) == 1
    r.head.ray_cluster_id = NEW_CLUSTER
    changed = r.clock.monotonic()
    while len(r.ray.starts) == 1:
        r.passes()
        assert r.clock.monotonic() - changed <= 12.0  # the next heartbeat (10 s) and a pass, never the 60 s
    assert r.clock.monotonic() - changed < ABSENT_RESTART_S / 4
    assert r.ray.running and r.agent.ray.joined_cluster() == ""  # this worker's cluster: not known until listed
    # The new worker joins the new cluster: listed there, it stays.
    r.head.ray_alive = True
    r.passes(10)
    assert len(r.ray.starts) == 2 and r.agent.ray.joined_cluster() == NEW_CLUSTER
    assert r.status().ray.state is RayState.ALIVE


@pytest.mark.parametrize("said", [OLD_CLUSTER, ""])
def test_the_same_or_an_unknown_cluster_id_waits_for_the_allowance(tmp_path, said):
    r = joined_in(tmp_path, OLD_CLUSTER)
    r.head.ray_alive, r.head.ray_cluster_id = False, said  # the same cluster (GCS fault tolerance), or not known
    r.passes(int(ABSENT_RESTART_S / 2) - 2)
    assert len(r.ray.starts) == 1  # Ray itself may still reconnect
    r.passes(10)
    assert len(r.ray.starts) == 2


def test_a_cluster_id_counts_only_for_the_worker_the_head_listed(tmp_path):
    # Never listed: which cluster this worker is in is not known, so a new id does not restart it.
    r = rig(tmp_path)
    r.head.ray_cluster_id = OLD_CLUSTER
    r.passes(6)
    r.head.ray_cluster_id = NEW_CLUSTER
    r.passes(20)
    assert len(r.ray.starts) == 1
    # Listed, then the worker exited and came back by itself: the new process's cluster is not
    # known either (what the head said of the old one does not carry over).
    r = joined_in(tmp_path / "again", OLD_CLUSTER)
    r.ray.exit(1)
    r.clock.advance(r.ray.restart_delay_s)
    r.head.ray_alive, r.head.ray_cluster_id = False, NEW_CLUSTER
    r.passes(20)
    assert len(r.ray.starts) == 2 and r.ray.running


def test_first_join_gets_the_long_allowance(tmp_path):
    r = rig(tmp_path)
    r.passes(int(FIRST_JOIN_S / 2) - 5)  # never listed: a slow first start (an emulated PC)
    assert len(r.ray.starts) == 1
    r.passes(10)
    assert len(r.ray.starts) == 2


def test_revoked_takes_the_node_out(tmp_path):
    r = rig(tmp_path)
    r.passes(6)
    r.head.revoked = True
    r.passes(6)
    s = r.status()
    assert s.state is NodeState.REVOKED and not r.iface.is_up and not r.ray.running
    assert load(r.agent.paths).revoked and "new join token" in s.last_error.hint


def test_version_mismatch_keeps_ray_stopped_and_says_what_to_install(tmp_path):
    r = rig(tmp_path)
    r.head.facts = region_facts(versions=Versions("9.9.9", "3.11"))
    r.passes(2)
    s = r.status()
    assert s.state is NodeState.DEGRADED and "ray==9.9.9" in s.message
    assert s.ray.state is RayState.VERSION_MISMATCH and not r.ray.running and r.ray.starts == []


def test_overlay_failure_is_shown_then_cleared(tmp_path):
    r = rig(tmp_path)
    r.iface.fail = "wireguard-go: /dev/net/tun missing"
    r.passes()
    s = r.status()
    assert s.state is NodeState.JOINING and "could not be set up" in s.last_error.message and not r.ray.running
    r.iface.fail = None
    r.passes()
    assert r.status().last_error is None and r.ray.running


def test_identity_survives_a_restart_without_a_token(tmp_path):
    r = rig(tmp_path)
    r.passes()
    node_id = r.agent.identity.node_id
    again = rig(tmp_path, token="")
    again.agent.identity = load(again.agent.paths)
    again.passes()
    assert again.agent.identity.node_id == node_id and again.head.enrollments == 0 and again.iface.is_up


def test_status_document_has_every_key(tmp_path):
    r = rig(tmp_path)
    r.passes()
    doc = encode(r.agent.snapshot())
    for key in ("state", "message", "node_id", "name", "region", "gpus", "gpu_note", "driver_version", "cuda_version",
                "overlay", "head", "ray", "engine", "versions", "last_error", "agent"):
        assert key in doc
    assert "cred-secret" not in str(doc) and TOKEN not in str(doc) and "ray-cluster-secret" not in str(doc)
    # and the report the head receives carries no secret either
    assert "cred-secret" not in str(encode(r.head.heartbeats[0]))


# ------------------------------------------------------------------ the engine, through the agent

CPU_ENGINE = EngineSection(enabled=True, device="cpu", image="garage-node/vllm-cpu:test", model="tiny-llama-test",
                           drain_grace_s=60.0, crash_loop_restarts=3)


@pytest.fixture
def engine_rig(tmp_path):
    r = rig(tmp_path, engine=dataclasses.replace(CPU_ENGINE, cache_dir=tmp_path / "models"))
    r.docker.images.add(CPU_ENGINE.image)
    r.passes()  # joined: the overlay address is there for the engine to bind
    return r


def engine_pass(r: Rig, n: int = 1, every_s: float = 2.0) -> None:
    for _ in range(n):
        r.agent.engine.reconcile_safely()
        r.clock.advance(every_s)


def test_engine_waits_for_the_join_then_serves(tmp_path):
    r = rig(tmp_path, token="", engine=dataclasses.replace(CPU_ENGINE, cache_dir=tmp_path / "models"))
    engine_pass(r)
    assert r.agent.engine.snapshot().state is EngineState.STARTING and r.docker.containers == {}


def test_engine_becomes_healthy_on_the_overlay_address(engine_rig):
    r = engine_rig
    engine_pass(r)
    body = r.docker.bodies["garage-engine"]
    assert body["HostConfig"]["PortBindings"]["8000/tcp"][0]["HostIp"] == "100.96.0.2"
    r.probe.is_ready = True
    engine_pass(r)
    e = r.status().engine
    assert e.state is EngineState.HEALTHY and e.endpoint == "http://100.96.0.2:8000" and e.healthy_since


def test_engine_crash_loop_turns_degraded_with_its_logs(engine_rig):
    r = engine_rig
    engine_pass(r)
    for _ in range(3):
        r.docker.crash("garage-engine", 137)
        engine_pass(r)  # sees the exit, schedules the restart
        assert r.agent.engine.snapshot().state in (EngineState.RESTARTING, EngineState.DEGRADED)
        r.clock.advance(30)  # past the backoff, within the crash window
        engine_pass(r)  # restarts it
    e = r.status().engine
    assert e.state is EngineState.STARTING and e.restarts == 3
    r.docker.crash("garage-engine", 137)
    engine_pass(r)
    e = r.status().engine
    assert e.state is EngineState.DEGRADED and "keeps crashing" in e.message and e.last_log_lines


def test_drain_waits_for_running_requests_then_stops(engine_rig):
    r = engine_rig
    engine_pass(r)
    r.probe.is_ready = True
    engine_pass(r)
    from garage_node.node.engine.metrics import Metrics

    r.probe.current = Metrics(running=2, waiting=1, generation_tokens_total=10.0)
    r.agent.drain()
    start = r.clock.monotonic()
    # The drain polls metrics until the requests are done; here they never finish, so the
    # grace period ends it (the fake clock skips the waiting).
    engine_pass(r)
    assert r.clock.monotonic() - start >= CPU_ENGINE.drain_grace_s
    assert r.docker.containers == {} and r.agent.engine.snapshot().state is EngineState.DRAINED
    assert r.status().engine.draining is True
    r.agent.resume()
    engine_pass(r)
    assert "garage-engine" in r.docker.containers


def test_drain_stops_as_soon_as_requests_finish(engine_rig):
    r = engine_rig
    engine_pass(r)
    r.probe.is_ready = True
    engine_pass(r)
    r.agent.drain()
    start = r.clock.monotonic()
    engine_pass(r, every_s=0)
    assert r.clock.monotonic() - start < 1 and r.docker.containers == {}


def test_running_engine_is_adopted_not_replaced(engine_rig):
    r = engine_rig
    engine_pass(r)
    cid = r.docker.containers["garage-engine"].id
    # A new agent (the first one crashed) finds the engine running with the same spec.
    again = rig(r.agent.paths.state_dir.parent, token="", engine=r.agent.cfg.engine)
    again.docker, again.agent.engine.docker = r.docker, r.docker
    again.agent.identity = load(again.agent.paths)
    again.passes(2)  # this head's hub has a new key: the first heartbeat re-applies the peer
    again.probe.is_ready = True
    engine_pass(again)
    e = again.agent.engine.snapshot()
    assert e.container_id == cid and e.state is EngineState.HEALTHY and r.docker.stops == []


def test_changed_spec_replaces_the_container(engine_rig):
    r = engine_rig
    engine_pass(r)
    old = r.docker.containers["garage-engine"].id
    r.agent.engine.cfg = dataclasses.replace(r.agent.engine.cfg, extra_args=("--seed", "7"))
    r.agent.cfg = dataclasses.replace(r.agent.cfg, engine=r.agent.engine.cfg)
    r.agent.reconcile_once()  # the engine runs the plan of the agent's last pass
    engine_pass(r)
    assert r.docker.containers["garage-engine"].id != old and "garage-engine" in r.docker.stops


def test_docker_down_and_missing_image_are_engine_states(engine_rig):
    r = engine_rig
    r.docker.down = True
    engine_pass(r)
    e = r.agent.engine.snapshot()
    assert e.state is EngineState.ERROR and "systemctl start docker" in e.message
    r.docker.down = False
    r.docker.images.clear()
    engine_pass(r)
    e = r.agent.engine.snapshot()
    assert e.state is EngineState.ERROR and "could not be pulled" in e.message
    assert r.agent.state is NodeState.JOINING  # the agent runs on; the engine is one part of it


def test_status_with_the_agent_down_has_the_same_keys(tmp_path):
    from garage_node.node.status import offline_status, render

    r = rig(tmp_path)
    r.passes()
    running = encode(r.agent.snapshot())
    down = encode(offline_status(r.agent.cfg, "cannot reach the agent"))

    def shape(doc, path=""):
        if isinstance(doc, dict):
            return {path} | set().union(*(shape(v, f"{path}.{k}") for k, v in doc.items()))
        return {path}

    # Null only where only a running agent can know (itself, Ray's resources); every key there.
    missing = shape(running) - shape(down) - {".agent.pid", ".agent.uptime_s", ".ray.resources.GPU", ".ray.resources.vram_mib"}
    assert not missing, f"keys missing with the agent down: {sorted(missing)}"
    assert down["state"] == "agent-down" and down["engine"]["state"] == "unknown" and down["node_id"] == "n0001"
    assert "agent not running" in render(decode(down, Status))


# ------------------------------------------------------------------ doors (issue #9)


def test_firewall_before_ray_and_removed_on_the_way_out(tmp_path):
    r = rig(tmp_path, engine=dataclasses.replace(CPU_ENGINE, cache_dir=tmp_path / "models"))
    r.passes()
    (rules,) = r.firewall.tables.values()
    assert rules.overlay_interface == "garage0" and rules.overlay_cidr == "100.96.0.0/16"
    assert (6379, 6385) in rules.ray_ports and rules.open_tcp == (22,) and not rules.hub
    assert r.ray.running
    r.head.revoked = True
    r.passes(6)
    assert r.firewall.tables == {} and not r.ray.running


def test_no_firewall_no_ray_and_no_engine(tmp_path):
    r = rig(tmp_path, engine=dataclasses.replace(CPU_ENGINE, cache_dir=tmp_path / "models"))
    r.firewall.fail = "nft: Operation not supported"
    r.passes()
    s = r.status()
    assert "firewall could not be set up" in s.last_error.message and not r.ray.running
    assert r.agent.plan.engine_wanted() is None
    r.firewall.fail = None
    r.passes()
    assert r.ray.running and r.status().last_error is None


def test_flushed_firewall_is_put_back(tmp_path):
    r = rig(tmp_path)
    r.passes()
    r.firewall.tables.clear()  # someone ran `nft flush ruleset`
    r.passes(20)
    assert r.firewall.tables and r.firewall.applied == 2


def test_ray_runs_as_its_own_account_with_the_cluster_token(tmp_path):
    r = rig(tmp_path)
    r.passes()
    token_file = r.agent.ray_part.token_path
    assert token_file.read_text() == "ray-cluster-secret" and oct(token_file.stat().st_mode & 0o777) == "0o600"
    argv = " ".join(r.ray.starts[0])
    assert r.ray.run_as.user == "garage-ray" and r.ray.run_as.uid != 0
    assert "ray-cluster-secret" not in argv  # never on a command line
    assert "--node-manager-port 6380" in argv and "--min-worker-port 10002" in argv
    # A rotated token reaches the worker: it restarts with the new one.
    r.head.ray_token = "rotated-secret"
    r.passes(6)
    assert token_file.read_text() == "rotated-secret" and len(r.ray.starts) == 2


def test_missing_or_root_account_keeps_ray_stopped(tmp_path):
    def missing(user, groups=()):
        raise KeyError(user)

    r = rig(tmp_path, account=missing)
    r.passes()
    s = r.status()
    assert not r.ray.running and "does not exist" in s.last_error.message and "useradd" in s.last_error.hint
    r = rig(tmp_path / "root", account=lambda user, groups=(): dataclasses.replace(ray_account(user), uid=0))
    r.passes()
    assert not r.ray.running and "root" in r.status().last_error.message


def test_blocked_tunnel_is_not_called_joined(tmp_path):
    # WireGuard's UDP blocked while HTTPS to the head still works: the head answers heartbeats,
    # but the hub does not answer through the tunnel. Status must not say "joined".
    r = rig(tmp_path)
    r.head.ray_alive = True
    r.passes(6)
    assert r.agent.state is NodeState.JOINED
    r.iface.tunnel_carries = False
    r.passes(3, every_s=5.0)  # two probes missed, 5 s apart
    s = r.status()
    assert s.state is NodeState.DEGRADED and "overlay down" in s.message
    assert "UDP to 10.9.0.1:51820" in s.last_error.hint
    r.passes(3, every_s=5.0)  # the next heartbeat (every 10 s ±10 %, headclient.BeatTimer) carries it
    assert r.head.heartbeats[-1].state is NodeState.DEGRADED  # the head hears it too
    r.iface.tunnel_carries = True
    r.passes(3, every_s=5.0)
    assert r.agent.state is NodeState.JOINED and r.status().last_error is None


def test_the_engine_gets_the_key_the_head_gave_and_status_shows_tokens_served(tmp_path):
    r = rig(tmp_path, engine=dataclasses.replace(CPU_ENGINE, cache_dir=tmp_path / "models"))
    r.head.tokens_served = TokensServed(today=1200, total=3_400_000)
    r.passes(4)
    assert r.agent.identity.engine_api_key == "gne-engine-key"
    spec, _ = r.agent.plan.engine_wanted()
    assert spec.api_key == "gne-engine-key" and "gne-engine-key" not in repr(spec)
    s = r.status()
    assert s.tokens_served == TokensServed(today=1200, total=3_400_000)
    assert "1.2 k tokens today, 3.4 M in all" in render(s)
    # A new key from the head replaces the engine's spec (its hash), so the container is made again.
    r.head.engine_api_key = "gne-rotated"
    r.passes(8)  # past the next heartbeat
    new, _ = r.agent.plan.engine_wanted()
    assert new.spec_hash != spec.spec_hash and new.api_key == "gne-rotated"


def test_two_outages_at_once_keep_one_problem_each_and_log_once(tmp_path, caplog):
    # A joined PC loses its network: the head is unreachable and the tunnel blocked together.
    # Before problems were kept per source, last_error flipped between the two 20 times in
    # 120 s and 32 warnings were logged; now each source has its entry, each logged once.
    r = rig(tmp_path)
    r.head.ray_alive = True
    r.passes(6)
    assert r.agent.state is NodeState.JOINED
    r.head.up, r.iface.tunnel_carries = False, False
    seen = []
    with caplog.at_level("INFO", logger="garage_node"):
        for _ in range(60):  # 120 s of 2 s passes
            r.passes()
            err = r.status().last_error
            seen.append(err.message if err else None)
        s = r.status()
        assert [p.source for p in s.problems] == ["head", "tunnel"]  # both, the worst first
        assert s.last_error == s.problems[0] and "head unreachable" in s.last_error.message
        # Once the first heartbeat failed, last_error never changed hands.
        first = next(i for i, m in enumerate(seen) if m and "head unreachable" in m)
        assert all("head unreachable" in m for m in seen[first:])
        warnings = [rec for rec in caplog.records if rec.levelname == "WARNING"]
        assert len(warnings) == 2, [w.getMessage() for w in warnings]
        assert "resolved" not in caplog.text
        r.head.up, r.iface.tunnel_carries = True, True
        r.passes(10)
    assert r.status().problems == [] and r.status().last_error is None
    resolved = [rec.getMessage() for rec in caplog.records if "resolved" in rec.getMessage()]
    assert len(resolved) == 2, resolved  # once each
    assert "Problem:" in render(s) and render(s).count("To fix:") == 2


def listed_then_cut(tmp_path, cut_s: float) -> Rig:
    """A joined PC listed alive in Ray, then its network cut for `cut_s` (no heartbeat gets
    through) and healed."""
    r = rig(tmp_path)
    r.head.ray_alive = True
    r.passes(6)
    assert r.agent.state is NodeState.JOINED and len(r.ray.starts) == 1
    r.head.up = False
    r.passes(int(cut_s / 2))
    r.head.up = True
    return r


def test_a_worker_ray_declared_dead_in_a_cut_restarts_at_the_first_heartbeat(tmp_path):
    # A cut longer than Ray's health checks: Ray declared the node dead and never takes it
    # back (#24). The worker restarts as soon as the head says so, not after 60 s unlisted.
    r = listed_then_cut(tmp_path, 30)
    r.head.ray_alive, r.head.ray_dead = False, True
    beats = len(r.head.heartbeats)
    for _ in range(5):  # 10 s: the first heartbeat after the cut comes within a period (5 s cap)
        r.passes()
        if len(r.ray.starts) == 2:
            break
    assert len(r.ray.starts) == 2 and len(r.head.heartbeats) > beats
    s = r.status()
    assert s.state is NodeState.JOINING and "Ray declared the last one dead" in s.message
    # The head still lists the old Ray node dead until the new one registers: no second restart.
    r.passes(10)
    assert len(r.ray.starts) == 2
    r.head.ray_alive, r.head.ray_dead = True, False
    r.passes(6)
    assert r.agent.state is NodeState.JOINED and "dead" not in r.status().message


def test_a_worker_that_died_in_a_long_cut_starts_at_once_when_the_head_is_back(tmp_path):
    # Cut off for minutes the raylet gives up, and each `ray start` fails: the restart delay
    # grows. Once the head answers again the worker starts at once, not after that delay.
    r = listed_then_cut(tmp_path, 4)
    r.head.up = False
    r.ray.restart_delay_s = 300.0  # what the backoff grew to
    r.ray.exit(1)
    r.passes(60)  # two minutes cut
    assert not r.ray.running
    r.head.up = True
    r.head.ray_alive = False
    r.passes(3)
    assert r.ray.running and len(r.ray.starts) == 2


def test_no_restart_for_a_cut_shorter_than_rays_detection(tmp_path):
    r = listed_then_cut(tmp_path, 8)  # Ray still holds the node alive
    r.passes(10)
    assert len(r.ray.starts) == 1 and r.ray.running and r.agent.state is NodeState.JOINED


def test_not_listed_is_not_dead(tmp_path):
    # A head back from a restart lists nobody until its Ray probe answers: that is no verdict,
    # and the worker (whose raylet survives with GCS fault tolerance) keeps running.
    r = listed_then_cut(tmp_path, 20)
    r.head.ray_alive = False
    r.passes(20)  # 40 s, under the 60 s a listed worker may go unlisted
    assert len(r.ray.starts) == 1 and r.ray.running


def test_a_dead_verdict_waits_for_the_tunnel(tmp_path):
    # Only WireGuard's UDP blocked: the head still answers over HTTPS and says Ray declared the
    # node dead, but a new worker could not reach Ray either. It restarts once the hub answers
    # through the tunnel again.
    r = rig(tmp_path)
    r.head.ray_alive = True
    r.passes(6)
    r.iface.tunnel_carries = False
    r.passes(4, every_s=5.0)
    r.head.ray_alive, r.head.ray_dead = False, True
    r.passes(6, every_s=5.0)
    assert len(r.ray.starts) == 1 and "overlay down" in r.status().message
    r.iface.tunnel_carries = True
    r.passes(3, every_s=5.0)
    assert len(r.ray.starts) == 2
