"""The agent's side of idempotent enrollment and credential rotation (issue #9), in-process
with the agent rig (testing/agentrig.py). The testbed (tests/integration/test_head_hardening.py) proves
both on the real head, WireGuard and Ray."""

from __future__ import annotations

import json
import stat

from garage_node.core.wire import NodeState
from garage_node.core.wireguard import public_key_of
from garage_node.node.identity import load
from testing.agentrig import rig


def restart(r, tmp_path):
    """A new agent on the same state directory, as after a crash (the fakes live on)."""
    agent = r.restart()
    agent.identity = load(agent.paths)
    return agent


def test_the_key_is_stored_before_the_head_is_asked(tmp_path):
    r = rig(tmp_path)
    r.head.lose_answers = 1  # the head commits the row, the answer never arrives (a crash, a cut link)
    r.passes()
    pending = r.agent.paths.enroll_key
    assert pending.exists() and stat.S_IMODE(pending.stat().st_mode) == 0o600
    assert not r.agent.paths.identity.exists()
    key = json.loads(pending.read_text())["wg_private_key"]
    assert public_key_of(key) in r.head.keys  # the head knows exactly the stored key

    agent = restart(r, tmp_path)
    r.passes(3)
    ident = load(agent.paths)
    assert ident is not None and ident.node_id == "n0001" and ident.overlay_ip == "100.96.0.2"
    assert ident.wg_private_key == key and r.head.enrollments == 1  # one row, one use
    assert not pending.exists() and not agent.paths.join_token.exists()
    assert agent.state in (NodeState.JOINING, NodeState.JOINED)


def test_a_new_token_after_revocation_gets_a_new_key(tmp_path):
    r = rig(tmp_path)
    r.passes()
    first = load(r.agent.paths)
    r.head.revoked = True
    r.passes(6)
    assert r.agent.state is NodeState.REVOKED
    r.head.revoked = False
    from garage_node.core.token import new_token
    r.agent.paths.join_token.write_text(new_token("https://10.9.0.1:8443", "sha256:" + "1" * 64).encode())
    r.passes(2)
    second = load(r.agent.paths)
    assert second.node_id != first.node_id and second.wg_private_key != first.wg_private_key


def test_credential_and_wireguard_key_are_renewed_while_running_without_a_failed_heartbeat(tmp_path):
    r = rig(tmp_path)
    r.head.ray_alive = True
    r.head.credential_lifetime_s = 30.0  # renewed when 10 s are left, i.e. every 20 s
    r.passes()
    first = load(r.agent.paths)
    r.passes(12)  # 24 s
    assert len(r.head.renewals) == 1
    ident = load(r.agent.paths)
    assert ident.node_id == first.node_id and ident.overlay_ip == first.overlay_ip
    assert ident.credential != first.credential and ident.wg_private_key != first.wg_private_key
    assert r.head.renewals[-1] == public_key_of(ident.wg_private_key)
    assert r.head.credentials[ident.node_id] == ident.credential
    assert not r.agent.paths.rotate_key.exists()
    beats = len(r.head.heartbeats)
    for _ in range(10):  # 100 s: four or five more rotations, and every heartbeat answered
        r.passes(5)
        assert r.agent.snapshot().last_error is None and r.agent.session.link.reachable
    assert len(r.head.renewals) >= 5
    assert len(r.head.heartbeats) >= beats + 9 and r.head.credentials[ident.node_id] == load(r.agent.paths).credential
    assert len(r.ray.starts) == 1  # Ray was never restarted by a rotation


def test_an_interrupted_rotation_is_finished_after_a_restart(tmp_path):
    r = rig(tmp_path)
    r.passes()
    ident = load(r.agent.paths)
    # The agent stored its next key and crashed before (or after) the head took it.
    from garage_node.node import keys
    new_key = keys.pending_key(r.agent.paths.rotate_key, ident.node_id)
    agent = restart(r, tmp_path)
    r.passes(2)
    assert r.head.renewals == [public_key_of(new_key)]
    assert load(agent.paths).wg_private_key == new_key and not agent.paths.rotate_key.exists()
