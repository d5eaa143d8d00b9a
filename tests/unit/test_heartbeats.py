"""The heartbeat buffer (head/heartbeats.py) and the registry's one read path: a read after a
heartbeat held in memory sees it, whichever read it is."""

from __future__ import annotations

import inspect
import ipaddress
from dataclasses import replace

from garage_node.head import registry as registry_module
from garage_node.head.heartbeats import Batch, Beat, Held, Membership, fold
from garage_node.head.registry import NodeRow, Registry

NET = ipaddress.IPv4Network("100.96.0.0/24")
NEVER = 3600.0


def test_every_read_of_the_registry_sees_a_heartbeat_held_in_memory(tmp_path):
    reg = Registry(tmp_path / "r.sqlite", NET, batch_s=NEVER)
    reg.add_token("t", "secret-secret-secret", 60, uses=None)
    e = reg.enroll("t", "secret-secret-secret", "pc", "eu", "k")
    reg.record_heartbeat(e.node.id, {"n": 1})
    reg.record_ray_membership({e.node.id})
    auth = reg.authenticate(e.node.id, e.credential)
    assert auth is not None
    reads = [reg.node(e.node.id), reg.find_node("pc"), reg.nodes()[0], auth.node, reg.active_peers()[0]]
    assert all(n.last_seen is not None and n.confirmed_at is not None and n.ray_alive for n in reads)
    assert [n.report for n in reads] == [{"n": 1}] * 4 + [{}]  # active_peers reads no reports
    assert Registry(tmp_path / "r.sqlite", NET).node(e.node.id).last_seen is None  # the file: not yet
    reg.close()


def test_node_rows_are_made_in_one_place_only():
    # The guard behind "a new query cannot forget the buffer": a NodeRow is built from a file
    # row by _file_row alone, and only _select calls it, after laying the buffer over it.
    source = inspect.getsource(registry_module)
    assert source.count("_file_row(") == 2  # its definition and the call in _select
    assert "_file_row(" in inspect.getsource(Registry._select)
    assert source.count("NodeRow(") == 1  # in _file_row


def _row(**kw) -> NodeRow:
    base = NodeRow(id="n1", name="pc", region="eu", wg_public_key="k", overlay_ip="100.96.0.2", enrolled_at=1.0,
                   last_seen=10.0, revoked_at=None, report={"file": True}, ray_alive=False, ray_checked_at=10.0,
                   confirmed_at=None)
    return replace(base, **kw)


def test_the_newest_value_wins_by_its_own_timestamp():
    older = Held({"n1": [Beat(5.0, {"held": True}, 5.0)]}, [Membership(frozenset({"n1"}), 5.0)])
    got = older.lay_over(_row())
    assert got.report == {"file": True} and not got.ray_alive  # the file is newer
    assert got.confirmed_at == 5.0  # a confirmation is never undone by an older time
    newer = Held({"n1": [Beat(20.0, {"held": True}, None)]}, [Membership(frozenset({"n1"}), 20.0)])
    got = older.then(newer).lay_over(_row())
    assert (got.report, got.last_seen, got.ray_alive, got.confirmed_at) == ({"held": True}, 20.0, True, 5.0)
    assert newer.lay_over(_row(), reports=False).report == {"file": True}


def test_fold_keeps_the_latest_beat_and_the_first_confirmation():
    acc = Batch()
    fold(acc, Batch(beats={"a": Beat(1.0, {"n": 1}, None)}))
    fold(acc, Batch(beats={"a": Beat(2.0, {"n": 2}, 2.0)}))
    fold(acc, Batch(beats={"a": Beat(3.0, {"n": 3}, 3.0)}, ray=Membership(frozenset(), 3.0)))
    assert acc.beats["a"] == Beat(3.0, {"n": 3}, 2.0) and acc.ray is not None
    assert not Batch() and acc
