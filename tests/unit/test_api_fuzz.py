"""The head's control API against its own OpenAPI description, fuzzed by schemathesis (issue #9):
every operation, with data that fits the description and data that does not, without a node
credential and with a real one (a node that enrolled). No answer may be a 5xx, and every
status code, content type and body must be one the description lists.

In-process (the ASGI app, a real registry in a temporary directory): the same routes, body cap
and error handlers as `head run`; the connection guard in front of them is tested on a real
server in test_connguard.py.
"""

from __future__ import annotations

import ipaddress

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from garage_node.core.wireguard import generate_private_key, public_key_of
from garage_node.head.api import create_app
from garage_node.head.registry import Registry
from testing.fakes import region_facts

SECRET = "s" * 43
CASES_PER_OPERATION = 100  # per operation, mode and credential: well over 1,000 cases in all
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

ran: list[str] = []


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    reg = Registry(tmp_path_factory.mktemp("fuzz") / "r.sqlite", ipaddress.IPv4Network("100.96.0.0/16"),
                   credential_overlap_s=86400)  # renewals by the fuzzer must not lock it out
    reg.add_token("tok001", SECRET, 3600, uses=None)
    app = create_app(reg, region_facts(), b"PEM")
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    enrolled = reg.enroll("tok001", SECRET, "fuzz-node", "testland", public_key_of(generate_private_key()))
    return schema, enrolled


POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
# Operations without parameters or body have one request each and nothing to negate.
OPERATIONS = [("GET", "/v1/ca", POSITIVE), ("GET", "/v1/health", POSITIVE)] + [
    ("POST", path, mode) for path in ("/v1/enroll", "/v1/nodes/{node_id}/heartbeat", "/v1/nodes/{node_id}/credential")
    for mode in (POSITIVE, NEGATIVE)]


@pytest.mark.parametrize("credential", [False, True], ids=["anonymous", "with-credential"])
@pytest.mark.parametrize("method, path, mode", OPERATIONS, ids=[f"{m} {p} {g.value}" for m, p, g in OPERATIONS])
def test_fuzz(head, method, path, mode, credential):
    schema, enrolled = head
    operation = schema[path][method]
    kwargs = {}
    if credential and "{node_id}" in path:
        kwargs["path_parameters"] = {"node_id": enrolled.node.id}
    strategy = operation.as_strategy(generation_mode=mode, **kwargs)

    @settings(max_examples=CASES_PER_OPERATION, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case):
        headers = {}
        if credential:
            headers["Authorization"] = f"Bearer {enrolled.credential}"  # stays valid: a renewal keeps it for the overlap
        response = case.call(headers=headers)
        # (schemathesis' negative_data_rejection is not used: it does not count 413, the body
        # cap's correct answer to an oversized invalid body, as a refusal.)
        case.validate_response(response, checks=CHECKS, headers=headers)
        ran.append(f"{method} {path} {'with' if credential else 'without'} credential -> {response.status_code}")

    run()


def test_at_least_a_thousand_cases_ran():
    from collections import Counter
    assert len(ran) >= 1000, len(ran)
    summary = Counter(ran)
    print(f"\nschemathesis: {len(ran)} cases")
    for line, n in sorted(summary.items()):
        print(f"  {n:4d}  {line}")
    # The authenticated routes were reached with the node's credential, not only refused.
    assert summary["POST /v1/nodes/{node_id}/heartbeat with credential -> 200"] > 0
    assert summary["POST /v1/nodes/{node_id}/credential with credential -> 200"] > 0
