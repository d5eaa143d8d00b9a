"""The id of the head's Ray cluster (#10, the fallback to GCS fault tolerance): read by the
Ray probe, kept by the head beside the membership, cleared with it, and told to every node in
its heartbeat answer. The agent's side (a worker of another cluster restarted at once) is in
test_agent.py; a real Ray head's id in tests/integration/test_ray_cluster_id.py."""

import ipaddress
import json

import pytest

from garage_node.core.wire import HeartbeatReply, decode, encode
from garage_node.head import rayprobe
from garage_node.head.ray import parse_watch_line
from garage_node.head.registry import Registry
from testing.headapi import enrolled_pc

CLUSTER = "ab" * 28
NODE = {"ray_node_id": "cd" * 28, "address": "100.96.0.2", "alive": True, "is_head": False,
        "labels": {"garage.node_id": "n0001"}, "resources": {"GPU": 1.0}}


class FakeId:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def is_nil(self) -> bool:
        return self.raw == b"\xff" * len(self.raw)

    def hex(self) -> str:
        return self.raw.hex()


class FakeNodeInfo:
    node_id = FakeId(bytes.fromhex("cd" * 28))
    node_manager_address = "100.96.0.2"
    state = 0
    is_head_node = False
    labels = {"garage.node_id": "n0001", "ray.io/node_id": "x"}
    resources_total = {"GPU": 1.0}


class FakeGcsClient:
    def __init__(self, cluster: bytes) -> None:
        self.cluster_id = FakeId(cluster)

    def get_all_node_info(self, timeout: int):
        return {b"1": FakeNodeInfo()}


def test_the_watch_line_carries_the_cluster_id_with_the_nodes():
    line = json.dumps(rayprobe.answer(FakeGcsClient(bytes.fromhex(CLUSTER))))
    seen = parse_watch_line(line)
    assert seen is not None and seen.cluster_id == CLUSTER
    assert [n.labels for n in seen.nodes] == [{"garage.node_id": "n0001"}]
    # A client without a cluster id yet (Ray's nil id) says none.
    assert rayprobe.answer(FakeGcsClient(b"\xff" * 28))["cluster_id"] == ""


def test_parsing_watch_lines():
    assert parse_watch_line(json.dumps({"error": "Timed out while waiting for GCS"})) is None
    assert parse_watch_line(json.dumps({"cluster_id": CLUSTER, "nodes": []})).cluster_id == CLUSTER
    no_id = parse_watch_line(json.dumps({"nodes": [NODE]}))
    assert no_id is not None and no_id.cluster_id == "" and no_id.nodes[0].ray_node_id == NODE["ray_node_id"]
    for bad in ('{"cluster_id": 7, "nodes": []}', '{"cluster_id": "x", "nodes": [{"alive": true}]}', "not json"):
        with pytest.raises((ValueError, TypeError)):
            parse_watch_line(bad)


def test_the_registry_keeps_the_cluster_id_and_clears_it_with_the_membership(tmp_path):
    for batch_s in (None, 60.0):
        reg = Registry(tmp_path / f"r{batch_s}.sqlite", ipaddress.IPv4Network("100.96.0.0/16"), batch_s=batch_s)
        assert reg.ray_cluster_id == ""
        reg.record_ray_membership({"n0001"}, CLUSTER)
        assert reg.ray_cluster_id == CLUSTER
        reg.record_ray_membership(set())  # the Ray head down or restarting, or no answer
        assert reg.ray_cluster_id == ""
        reg.close()


def test_the_heartbeat_answer_tells_the_cluster_id(tmp_path):
    pc = enrolled_pc(tmp_path)
    assert pc.beat().ray_cluster_id == ""  # no Ray head answer yet
    pc.registry.record_ray_membership({pc.node_id}, CLUSTER)
    got = pc.beat()
    assert got.ray_cluster_id == CLUSTER and got.ray_alive
    # An answer from an older head, without the field, reads as "not known".
    old = encode(got)
    del old["ray_cluster_id"]
    assert decode(old, HeartbeatReply).ray_cluster_id == ""


def test_a_node_is_dead_only_when_all_its_ray_nodes_are():
    from garage_node.head.ray import RayNode, garage_ids

    def node(ray_id: str, garage_id: str, alive: bool, head: bool = False) -> RayNode:
        return RayNode(ray_id, "100.96.0.2", alive, head, {"garage.node_id": garage_id} if garage_id else {}, {})

    alive, dead = garage_ids([
        node("r1", "n0001", False), node("r2", "n0001", True),  # restarted: its old Ray node dead, the new alive
        node("r3", "n0002", False),  # cut off past Ray's health checks
        node("r4", "n0003", True), node("r5", "", False), node("r6", "n0009", False, head=True),
    ])
    assert alive == {"n0001", "n0003"} and dead == {"n0002"}


def test_the_heartbeat_answer_says_when_ray_declared_the_node_dead(tmp_path):
    pc = enrolled_pc(tmp_path)
    assert pc.beat().ray_dead is False
    pc.registry.record_ray_membership(set(), CLUSTER, {pc.node_id})
    got = pc.beat()
    assert got.ray_dead and not got.ray_alive
    pc.registry.record_ray_membership(set())  # no answer from the Ray head: nothing is known, nobody is dead
    assert pc.beat().ray_dead is False
    old = encode(got)
    del old["ray_dead"]
    assert decode(old, HeartbeatReply).ray_dead is False  # an older head never says it
