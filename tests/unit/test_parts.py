"""The agent's parts on their own, each with the fakes of its edges and a test clock: the
overlay (interface, firewall, tunnel probe) and the head session (enrollment, heartbeats,
renewal, revocation). The agent rig (testing/agentrig.py) tests them together."""

from __future__ import annotations

import random

from garage_node.core.backoff import Backoff
from garage_node.core.token import parse
from garage_node.core.wire import NodeState
from garage_node.node import identity
from garage_node.node.config import NodeConfig, NodeSection
from garage_node.node.headclient import BeatTimer
from garage_node.node.health import Health, Source
from garage_node.node.overlay import HUB_PROBE_S, Overlay
from garage_node.node.paths import StatePaths
from garage_node.node.session import HeadSession
from testing.agentrig import TOKEN
from testing.fakes import FakeClock, FakeFirewall, FakeHead, FakeInterface, sample_report


def joined_identity(clock: FakeClock):
    ident, _ = FakeHead(clock).enroll(parse(TOKEN), "pc-1", sample_report(), "k" * 43 + "=")
    return ident


def overlay(clock, iface=None, firewall=None):
    health = Health(clock)
    iface = iface or FakeInterface()
    return Overlay(NodeConfig(), clock, health, iface, firewall or FakeFirewall(),
                   probe_hub=lambda ip: iface.tunnel_carries), health


def test_the_overlay_is_ready_only_with_interface_and_firewall():
    clock = FakeClock()
    firewall = FakeFirewall()
    firewall.fail = "nft: Operation not supported"
    part, health = overlay(clock, firewall=firewall)
    ident = joined_identity(clock)
    part.ensure(ident)
    assert part.interface_ready and not part.ready and health.worst().source is Source.FIREWALL
    firewall.fail = None
    part.ensure(ident)
    assert part.ready and health.worst() is None
    part.down()
    assert not part.ready and firewall.tables == {}


def test_the_tunnel_is_down_after_two_missed_probes_and_up_after_one_answer():
    clock = FakeClock()
    iface = FakeInterface()
    part, health = overlay(clock, iface=iface)
    ident = joined_identity(clock)
    part.ensure(ident)
    iface.tunnel_carries = False
    for _ in range(2):
        clock.advance(HUB_PROBE_S)
        part.ensure(ident)
    assert part.tunnel_down and "2 pings missed" in health.get(Source.TUNNEL).message
    assert "UDP to 10.9.0.1:51820" in health.get(Source.TUNNEL).hint
    iface.tunnel_carries = True
    clock.advance(HUB_PROBE_S)
    part.ensure(ident)
    assert not part.tunnel_down and health.get(Source.TUNNEL) is None


def session(tmp_path, clock, head):
    cfg = NodeConfig(node=NodeSection(join_token=TOKEN, name="pc-1", state_dir=tmp_path / "state"))
    paths = StatePaths(cfg.node.state_dir)
    health = Health(clock)
    return HeadSession(cfg, paths, clock, health, head, BeatTimer(random.Random(0)), Backoff), paths, health


def test_the_session_stores_what_it_returns_and_hands_the_revocation_back(tmp_path):
    clock = FakeClock()
    head = FakeHead(clock)
    s, paths, health = session(tmp_path, clock, head)
    ident = s.enroll(None, sample_report)
    assert ident is not None and identity.load(paths) == ident and s.enrollment is None
    answer = s.heartbeat_if_due(ident, sample_report)
    assert answer is not None and answer.reply is not None and answer.identity.ray_token == "ray-cluster-secret"
    assert s.heartbeat_if_due(ident, sample_report) is None  # not due again yet
    head.revoked = True
    clock.advance(60)
    answer = s.heartbeat_if_due(ident, sample_report)
    assert answer.reply is None and answer.identity.revoked and identity.load(paths).revoked
    assert "revoked" in health.get(Source.HEAD).message


def test_an_unreachable_head_is_a_head_problem_retried_within_a_heartbeat_period(tmp_path):
    clock = FakeClock()
    head = FakeHead(clock)
    s, paths, health = session(tmp_path, clock, head)
    head.up = False
    assert s.enroll(None, sample_report) is None
    assert s.enrollment[0] is NodeState.ENROLLING and health.get(Source.ENROLL).retry_at is not None
    head.up = True
    clock.advance(120)
    ident = s.enroll(None, sample_report)
    assert ident is not None and health.worst() is None
    head.up = False
    clock.advance(60)
    assert s.heartbeat_if_due(ident, sample_report) is None
    problem = health.get(Source.HEAD)
    assert s.link.reachable is False and problem.retry_at - clock.monotonic() <= ident.heartbeat_s
