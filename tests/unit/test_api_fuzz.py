"""The head's control API against its own OpenAPI description, fuzzed by schemathesis (issue #9):
every operation, with data that fits the description and data that does not, without a node
credential and with a real one (a node that enrolled). No answer may be a 5xx, and every
status code, content type and body must be one the description lists. What the API accepts
is what it describes (issue #23): a request that breaks the description is refused (ST201,
negative_data_rejection) and one that keeps it is not refused as malformed (ST202,
positive_data_acceptance), for schemathesis' random cases and for its coverage cases (every
field given each wrong JSON type in turn, which found 27 accepted: `true` for a number, `0` for
a boolean).

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
from schemathesis.config import SchemathesisConfig
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               positive_data_acceptance, response_schema_conformance,
                                               status_code_conformance)

from garage_node.core.wireguard import generate_private_key, public_key_of
from garage_node.head.api import create_app
from garage_node.head.registry import Registry
from testing.fakes import region_facts

SECRET = "s" * 43
CASES_PER_OPERATION = 100  # per operation, mode and credential: well over 1,000 cases in all
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection, positive_data_acceptance]
# schemathesis' list of refusals, plus 413: the body cap's correct answer to an oversized body,
# valid or not (before the cap, nothing has parsed it).
REFUSALS = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]
CONFIG = {"checks": {"negative_data_rejection": {"expected-statuses": REFUSALS},
                     "positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "409", "413"]}}}

ran: list[str] = []


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    reg = Registry(tmp_path_factory.mktemp("fuzz") / "r.sqlite", ipaddress.IPv4Network("100.96.0.0/16"),
                   credential_overlap_s=86400)  # renewals by the fuzzer must not lock it out
    reg.add_token("tok001", SECRET, 3600, uses=None)
    app = create_app(reg, region_facts(), b"PEM")
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=SchemathesisConfig.from_dict(CONFIG))
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
        case.validate_response(response, checks=CHECKS, headers=headers)
        ran.append(f"{method} {path} {'with' if credential else 'without'} credential -> {response.status_code}")

    run()


@pytest.mark.parametrize("path", [p for m, p, g in OPERATIONS if g is NEGATIVE])
def test_coverage_cases(head, path):
    """schemathesis' coverage phase (what `st run` does first): each field of the body given
    every JSON type it must not have, each bound crossed, each required field left out. The
    node's routes are called with its id and credential, so a body that breaks the schema and
    is not refused gets a 200 (an ST201 failure), not a 401."""
    schema, enrolled = head
    operation = schema[path]["POST"]
    headers = {"Authorization": f"Bearer {enrolled.credential}"}
    generation = schema.config.generation_for(operation=operation)
    failures, count = [], 0
    for case in schema.iter_coverage_cases(operation, generation_modes=[POSITIVE, NEGATIVE], generation_config=generation):
        if "{node_id}" in path:
            if getattr(case.meta.phase.data, "parameter_location", None) == ParameterLocation.PATH:
                continue  # a malformed id is refused before any body is read (test_fuzz covers it)
            case.path_parameters = {"node_id": enrolled.node.id}
        response = case.call(headers=headers)
        count += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except BaseException as e:  # schemathesis raises an exception group
            failures.append(f"{response.status_code}: " + next(
                (line.strip() for line in str(e).splitlines() if "Invalid component" in line), str(e).splitlines()[0]))
        ran.append(f"{path} coverage -> {response.status_code}")
    assert count > 10  # every field of the body was tried
    assert not failures, f"{len(failures)} of {count} coverage cases:\n" + "\n".join(failures)


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
