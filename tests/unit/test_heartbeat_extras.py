"""The gateway's part of a heartbeat's answer (HeartbeatExtras): typed, carried by the control
API into the answer, and given at enrollment too (the engine's key)."""

from __future__ import annotations

import ipaddress

from fastapi.testclient import TestClient

from garage_node.core.wire import HeartbeatExtras, HeartbeatReply, TokensServed, decode, encode
from garage_node.core.wireguard import generate_private_key, public_key_of
from garage_node.head.api import ApiHooks, create_app
from garage_node.head.registry import Registry
from testing.fakes import region_facts, sample_report


def test_the_answer_carries_each_pcs_extras_and_the_enrollment_its_engine_key(tmp_path):
    reg = Registry(tmp_path / "r.sqlite", ipaddress.IPv4Network("100.96.0.0/16"))
    reg.add_token("tok001", "s" * 43, 60, uses=1)
    asked = []

    def extras(node_id: str) -> HeartbeatExtras:
        asked.append(node_id)
        return HeartbeatExtras(engine_api_key=f"gne-{node_id}", tokens_served=TokensServed(today=3, total=7))

    client = TestClient(create_app(reg, region_facts(), b"PEM", ApiHooks(node_extras=extras)))
    body = client.post("/v1/enroll", json={"token_id": "tok001", "secret": "s" * 43, "name": "pc-1",
                                           "wg_public_key": public_key_of(generate_private_key())}).json()
    node_id = body["node_id"]
    assert body["engine_api_key"] == f"gne-{node_id}"
    r = client.post(f"/v1/nodes/{node_id}/heartbeat", json={"report": encode(sample_report())},
                    headers={"Authorization": f"Bearer {body['credential']}"})
    assert r.status_code == 200, r.text
    reply = decode(r.json(), HeartbeatReply)
    assert reply.engine_api_key == f"gne-{node_id}" and reply.tokens_served == TokensServed(today=3, total=7)
    assert asked == [node_id, node_id]


def test_without_a_gateway_the_answer_has_no_key_and_no_totals(tmp_path):
    reg = Registry(tmp_path / "r.sqlite", ipaddress.IPv4Network("100.96.0.0/16"))
    reg.add_token("tok001", "s" * 43, 60, uses=1)
    client = TestClient(create_app(reg, region_facts(), b"PEM"))
    body = client.post("/v1/enroll", json={"token_id": "tok001", "secret": "s" * 43, "name": "pc-1",
                                           "wg_public_key": public_key_of(generate_private_key())}).json()
    r = client.post(f"/v1/nodes/{body['node_id']}/heartbeat", json={"report": encode(sample_report())},
                    headers={"Authorization": f"Bearer {body['credential']}"})
    reply = decode(r.json(), HeartbeatReply)
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
