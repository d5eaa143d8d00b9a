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
