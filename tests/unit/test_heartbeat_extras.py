"""The gateway's part of a heartbeat's answer (HeartbeatExtras): typed, carried by the control
API into the answer, and given at enrollment too (the engine's key)."""

from __future__ import annotations



from garage_node.core.wire import HeartbeatExtras, TokensServed
from garage_node.head.api import ApiHooks
from testing.headapi import enrolled_pc


def test_the_answer_carries_each_pcs_extras_and_the_enrollment_its_engine_key(tmp_path):
    asked = []

    def extras(node_id: str) -> HeartbeatExtras:
        asked.append(node_id)
        return HeartbeatExtras(engine_api_key=f"gne-{node_id}", tokens_served=TokensServed(today=3, total=7))

    pc = enrolled_pc(tmp_path, ApiHooks(node_extras=extras))
    node_id = pc.node_id
    assert pc.enrollment["engine_api_key"] == f"gne-{node_id}"
    reply = pc.beat()
    assert reply.engine_api_key == f"gne-{node_id}" and reply.tokens_served == TokensServed(today=3, total=7)
    assert asked == [node_id, node_id]


def test_without_a_gateway_the_answer_has_no_key_and_no_totals(tmp_path):
    reply = enrolled_pc(tmp_path).beat()
    assert reply.engine_api_key == "" and reply.tokens_served is None


def test_the_gateways_extras_fit_the_typed_shape(tmp_path):
    # service.py hands Gateway.node_extras to the control API as it is.
    from garage_node.head.gateway.gateway import Gateway
    from garage_node.head.config import GatewaySection

    gw = Gateway(GatewaySection(), tmp_path, lambda: {})
    try:
        extras = gw.node_extras("n0123456789")
        assert extras.engine_api_key.startswith("gne-") and extras.tokens_served == TokensServed()
    finally:
        gw.stop()
