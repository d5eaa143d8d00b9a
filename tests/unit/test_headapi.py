"""The control API in-process (FastAPI's TestClient: real app, real registry, no network)."""

import ipaddress

import pytest
from fastapi.testclient import TestClient

from garage_node.head.api import create_app
from garage_node.core.wire import HubInfo
from garage_node.head.registry import Registry
from garage_node.core.wireguard import generate_private_key, public_key_of
from garage_node.core.wire import NodeState, encode
from garage_node.head.fleet import node_rows, render_nodes
from testing.fakes import region_facts, sample_report

SECRET = "s" * 43


@pytest.fixture
def api(tmp_path):
    reg = Registry(tmp_path / "r.sqlite", ipaddress.IPv4Network("100.96.0.0/16"))
    reg.add_token("tok1", SECRET, 60, uses=1)
    facts = region_facts(hub=HubInfo("100.96.0.1", public_key_of(generate_private_key()), "203.0.113.10:51820"),
                         region="eu")
    changes = []
    client = TestClient(create_app(reg, facts, b"PEM", lambda: changes.append(1)))
    return client, reg, changes


def enroll_body(**kw):
    return {"token_id": "tok1", "secret": SECRET, "name": "pc-1",
            "wg_public_key": public_key_of(generate_private_key()), **kw}


def test_enroll_then_heartbeat(api):
    client, reg, changes = api
    r = client.post("/v1/enroll", json=enroll_body(report=encode(sample_report(NodeState.ENROLLING))))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["overlay_ip"] == "100.96.0.2" and body["hub"]["endpoint"] == "203.0.113.10:51820"
    assert body["versions"] == {"ray": "2.60.0", "python": "3.11"} and changes == [1]
    joined = encode(sample_report(NodeState.JOINED))
    hb = client.post(f"/v1/nodes/{body['node_id']}/heartbeat", json={"report": joined},
                     headers={"Authorization": f"Bearer {body['credential']}"})
    assert hb.status_code == 200 and hb.json()["state"] == "active"
    assert reg.node(body["node_id"]).report == joined


def test_token_reuse_and_bad_credential_and_revoke(api):
    client, reg, _ = api
    body = client.post("/v1/enroll", json=enroll_body()).json()
    again = client.post("/v1/enroll", json=enroll_body())
    assert again.status_code == 401 and again.json()["error"] == "token_used"
    url = f"/v1/nodes/{body['node_id']}/heartbeat"
    report = {"report": encode(sample_report())}
    bad = client.post(url, json=report, headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json()["error"] == "unauthorized"
    reg.revoke(body["node_id"])
    gone = client.post(url, json=report, headers={"Authorization": f"Bearer {body['credential']}"})
    assert gone.status_code == 403 and gone.json()["error"] == "revoked"


@pytest.mark.parametrize("change, field", [
    ({"wg_public_key": "not-a-key"}, "wg_public_key"),
    ({"name": "bad name!"}, "name"),
    ({"secret": "short"}, "secret"),
])
def test_invalid_requests_name_the_field_and_never_echo(api, change, field):
    client, reg, _ = api
    r = client.post("/v1/enroll", json=enroll_body(**change))
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    assert field in r.json()["message"]
    assert SECRET not in r.text and "short" not in r.json()["message"].replace("at least", "")
    assert reg.nodes() == []


def test_openapi_and_ca(api):
    client, _, _ = api
    assert "/v1/enroll" in client.get("/openapi.json").json()["paths"]
    assert client.get("/v1/ca").text == "PEM"


@pytest.mark.parametrize("change", [
    {"gpus": "oops"}, {"gpus": [{}]}, {"engine": "up"}, {"state": "dancing"}, {"ray": None},
], ids=["gpus-not-a-list", "gpu-empty", "engine-not-a-table", "unknown-state", "ray-null"])
def test_malformed_report_is_refused_and_never_stored(api, change):
    client, reg, _ = api
    body = client.post("/v1/enroll", json=enroll_body()).json()
    good = encode(sample_report())
    hb = client.post(f"/v1/nodes/{body['node_id']}/heartbeat", json={"report": {**good, **change}},
                     headers={"Authorization": f"Bearer {body['credential']}"})
    assert hb.status_code == 422 and hb.json()["error"] == "invalid_request"
    assert reg.node(body["node_id"]).report == {}
    assert "oops" not in hb.text  # the input is never echoed


def test_fleet_rows_survive_whatever_the_registry_holds(api):
    client, reg, _ = api
    body = client.post("/v1/enroll", json=enroll_body()).json()
    reg.record_heartbeat(body["node_id"], {"state": "joined", "gpus": "oops"})  # written by an older head, say
    (row,) = node_rows(reg, 45.0)
    assert row.node_state is None and row.gpus == [] and "could not be read" in row.report_error
    assert body["node_id"] in render_nodes([row])
