"""core/errors.py: the API's error codes, one enum for the head that sends them and the node
that acts on them."""

from __future__ import annotations

import json

import httpx

from garage_node.core.errors import CONFLICTS, ErrorCode
from garage_node.node.headclient import Refused, error_of


def test_a_code_is_its_own_json_string_and_equals_it():
    assert ErrorCode.KEY_IN_USE == "key_in_use"
    assert json.dumps({"error": ErrorCode.REVOKED}) == '{"error": "revoked"}'
    assert "network_full" in CONFLICTS


def test_the_node_reads_known_codes_as_members_and_keeps_unknown_ones():
    r = httpx.Response(409, json={"error": "key_in_use", "message": "make a new key"})
    code, message = error_of(r)
    assert code is ErrorCode.KEY_IN_USE and message == "make a new key"
    code, _ = error_of(httpx.Response(409, json={"error": "from_a_newer_head", "message": "?"}))
    assert code == "from_a_newer_head" and not isinstance(code, ErrorCode)
    code, _ = error_of(httpx.Response(502, text="<html>bad gateway</html>"))
    assert code == "502"


def test_a_refusal_carries_the_code_the_agent_compares_with_strings():
    e = Refused("the head refused", code=ErrorCode.of("key_in_use"))
    assert e.code == "key_in_use" and not e.retry


def test_the_head_answers_with_codes_it_names(tmp_path):
    import ipaddress

    from fastapi.testclient import TestClient

    from garage_node.core.errors import SENT_BY_HEAD
    from garage_node.core.wireguard import generate_private_key, public_key_of
    from garage_node.head.api import create_app
    from garage_node.head.registry import Registry
    from garage_node.core.wire import encode
    from testing.fakes import region_facts, sample_report

    reg = Registry(tmp_path / "r.sqlite", ipaddress.IPv4Network("100.96.0.0/16"))
    client = TestClient(create_app(reg, region_facts(), b"PEM", max_body_bytes=4096))
    enroll = {"token_id": "tok001", "secret": "s" * 43, "name": "pc-1",
              "wg_public_key": public_key_of(generate_private_key())}
    answers = [
        client.post("/v1/enroll", json=enroll),  # unknown token
        client.post("/v1/nodes/n0123456789/heartbeat", json={"report": encode(sample_report())},
                    headers={"Authorization": "Bearer x"}),
        client.post("/v1/enroll", content=b"{not json", headers={"content-type": "application/json"}),
        client.post("/v1/enroll", json={**enroll, "name": "x" * 5000}),
    ]
    codes = [r.json()["error"] for r in answers]
    assert codes == ["token_unknown", "unauthorized", "invalid_request", "body_too_large"]
    assert set(codes) <= SENT_BY_HEAD
