"""The control API in-process (FastAPI's TestClient: real app, real registry, no network)."""

import ipaddress

import pytest
from fastapi.testclient import TestClient

from garage_node.headapi import HubInfo, create_app
from garage_node.raycluster import Versions
from garage_node.registry import Registry
from garage_node.wireguard import generate_private_key, public_key_of

SECRET = "s" * 43


@pytest.fixture
def api(tmp_path):
    reg = Registry(tmp_path / "r.sqlite", ipaddress.IPv4Network("100.96.0.0/16"))
    reg.add_token("tok1", SECRET, 60, uses=1)
    hub = HubInfo("100.96.0.1", 16, public_key_of(generate_private_key()), "203.0.113.10:51820",
                  "100.96.0.1:6379", "eu", 10.0, Versions("2.60.0", "3.11"))
    changes = []
    client = TestClient(create_app(reg, hub, b"PEM", lambda: changes.append(1)))
    return client, reg, changes


def enroll_body(**kw):
    return {"token_id": "tok1", "secret": SECRET, "name": "pc-1",
            "wg_public_key": public_key_of(generate_private_key()), **kw}


def test_enroll_then_heartbeat(api):
    client, reg, changes = api
    r = client.post("/v1/enroll", json=enroll_body(report={"state": "enrolling"}))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["overlay_ip"] == "100.96.0.2" and body["hub"]["endpoint"] == "203.0.113.10:51820"
    assert body["versions"] == {"ray": "2.60.0", "python": "3.11"} and changes == [1]
    hb = client.post(f"/v1/nodes/{body['node_id']}/heartbeat", json={"report": {"state": "joined"}},
                     headers={"Authorization": f"Bearer {body['credential']}"})
    assert hb.status_code == 200 and hb.json()["state"] == "active"
    assert reg.node(body["node_id"]).report == {"state": "joined"}


def test_token_reuse_and_bad_credential_and_revoke(api):
    client, reg, _ = api
    body = client.post("/v1/enroll", json=enroll_body()).json()
    again = client.post("/v1/enroll", json=enroll_body())
    assert again.status_code == 401 and again.json()["error"] == "token_used"
    url = f"/v1/nodes/{body['node_id']}/heartbeat"
    bad = client.post(url, json={}, headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json()["error"] == "unauthorized"
    reg.revoke(body["node_id"])
    gone = client.post(url, json={}, headers={"Authorization": f"Bearer {body['credential']}"})
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
