"""The control API in-process (FastAPI's TestClient: real app, real registry, no network)."""

import ipaddress

import pytest
from fastapi.testclient import TestClient

from garage_node.head.api import ApiHooks, create_app
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
    reg.add_token("tok001", SECRET, 60, uses=1)
    facts = region_facts(hub=HubInfo("100.96.0.1", public_key_of(generate_private_key()), "203.0.113.10:51820"),
                         region="eu")
    changes = []
    client = TestClient(create_app(reg, facts, b"PEM", ApiHooks(on_change=lambda: changes.append(1))))
    return client, reg, changes


def enroll_body(**kw):
    return {"token_id": "tok001", "secret": SECRET, "name": "pc-1",
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


# ---------------------------------------------------------------- hostile input (#9)

import json  # noqa: E402

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from garage_node.core.wire import GPU, MAX_GPUS  # noqa: E402


def enrolled(client):
    body = client.post("/v1/enroll", json=enroll_body()).json()
    return body["node_id"], {"Authorization": f"Bearer {body['credential']}"}


def test_a_body_over_the_cap_is_413_and_never_parsed(api):
    client, reg, _ = api
    node_id, auth = enrolled(client)
    huge = {"report": {**encode(sample_report()), "message": "x" * 10_000_000}}  # 10 MB
    r = client.post(f"/v1/nodes/{node_id}/heartbeat", json=huge, headers=auth)
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(100):
            yield b"x" * 100_000
    r = client.post("/v1/enroll", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert reg.node(node_id).report == {} and len(reg.nodes()) == 1


def big_gpu(i):
    return GPU(index=i, name="N" * 96, uuid="U" * 96, memory_total_mib=2**31 - 1, memory_free_mib=2**31 - 1,
               compute_capability="9" * 16, temperature_c=999, power_w=999999.0, utilization_pct=100, healthy=False,
               error="E" * 512)


def test_the_largest_valid_report_fits_under_the_body_cap(api):
    client, reg, _ = api
    node_id, auth = enrolled(client)
    from dataclasses import replace
    report = replace(sample_report(), message="M" * 512, gpu_note="G" * 512,
                     gpus=[big_gpu(i) for i in range(MAX_GPUS)], driver_version="D" * 96, cuda_version="C" * 96)
    body = json.dumps({"report": encode(report)})
    assert len(body) < 32768, len(body)
    r = client.post(f"/v1/nodes/{node_id}/heartbeat", content=body, headers={**auth, "content-type": "application/json"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("change", [
    {"message": "x" * 513},
    {"gpus": [encode(big_gpu(i)) for i in range(MAX_GPUS + 1)]},
    {"gpus": [{**encode(big_gpu(0)), "name": "n" * 97}]},
    {"gpus": [{**encode(big_gpu(0)), "memory_total_mib": 2**63}]},
    {"gpus": [{**encode(big_gpu(0)), "utilization_pct": -1}]},
    {"versions": {"agent": "a" * 97, "ray": "2.60.0", "python": "3.11"}},
    {"engine": {"state": "healthy", "model": "m" * 257}},
], ids=["long-message", "too-many-gpus", "long-gpu-name", "huge-int", "negative-pct", "long-version", "long-model"])
def test_a_report_out_of_bounds_is_422_and_never_stored(api, change):
    client, reg, _ = api
    node_id, auth = enrolled(client)
    r = client.post(f"/v1/nodes/{node_id}/heartbeat", json={"report": {**encode(sample_report()), **change}}, headers=auth)
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    assert reg.node(node_id).report == {}


def test_nan_and_infinity_are_refused(api):
    client, reg, _ = api
    node_id, auth = enrolled(client)
    for bad in ("NaN", "Infinity"):
        gpu = json.dumps(encode(big_gpu(0))).replace("999999.0", bad)
        body = json.dumps({"report": encode(sample_report())}).replace('"gpus": []', f'"gpus": [{gpu}]')
        r = client.post(f"/v1/nodes/{node_id}/heartbeat", content=body, headers={**auth, "content-type": "application/json"})
        assert r.status_code == 422, (bad, r.text)
    assert reg.node(node_id).report == {}


@pytest.mark.parametrize("where, field, bad", [
    ("gpus", "healthy", 0), ("gpus", "power_w", True), ("gpus", "memory_total_mib", "8192"),
    ("gpus", "temperature_c", 61.5), ("engine", "draining", "false"), ("ray", "pid", False),
], ids=["0-for-bool", "true-for-number", "string-for-int", "fraction-for-int", "string-for-bool", "false-for-int"])
def test_a_value_of_the_wrong_json_type_is_422_not_coerced(api, where, field, bad):
    """The schema says integer, number or boolean, and the head takes exactly that (issue #23):
    pydantic alone would coerce each of these and store the report."""
    client, reg, _ = api
    node_id, auth = enrolled(client)
    report = encode(sample_report())
    part = {**encode(big_gpu(0)), field: bad} if where == "gpus" else {**(report[where] or {}), field: bad}
    report[where] = [part] if where == "gpus" else part
    r = client.post(f"/v1/nodes/{node_id}/heartbeat", json={"report": report}, headers=auth)
    assert r.status_code == 422, r.text
    assert field in r.json()["message"]
    assert reg.node(node_id).report == {}


def test_a_whole_float_is_an_integer_as_json_schema_says(api):
    client, reg, _ = api
    node_id, auth = enrolled(client)
    report = encode(sample_report())
    report["gpus"] = [{**encode(big_gpu(0)), "temperature_c": 61.0, "memory_total_mib": 8192.0}]
    r = client.post(f"/v1/nodes/{node_id}/heartbeat", json={"report": report}, headers=auth)
    assert r.status_code == 200, r.text
    assert reg.node(node_id).report["gpus"][0]["temperature_c"] == 61


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                    max_leaves=30)
REPORTISH = st.fixed_dictionaries({}, optional={k: JSON for k in ("state", "message", "gpus", "engine", "versions", "ray")})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stored=JSON | REPORTISH)
def test_head_nodes_survives_whatever_the_registry_holds(api, stored):
    client, reg, _ = api
    if not reg.nodes():
        enrolled(client)
    (node,) = reg.nodes()
    reg.record_heartbeat(node.id, stored)
    rows = node_rows(reg, 45.0)
    render_nodes(rows)
    json.dumps(encode(rows))


def test_head_nodes_survives_a_damaged_row(api):
    import sqlite3
    client, reg, _ = api
    node_id, _ = enrolled(client)
    with sqlite3.connect(reg.path) as db:
        db.execute("UPDATE nodes SET report='{not json' WHERE id=?", (node_id,))
    (row,) = node_rows(reg, 45.0)
    assert row.report_error and "could not be read" in row.report_error
    assert node_id in render_nodes([row])


# ---------------------------------------------------------------- idempotent enrollment, credentials (#9)


def test_enrolling_again_with_the_same_key_returns_the_same_identity(api):
    client, reg, changes = api
    body = enroll_body()
    first = client.post("/v1/enroll", json=body).json()
    again = client.post("/v1/enroll", json=body)  # single-use token, first answer lost
    assert again.status_code == 200, again.text
    assert (again.json()["node_id"], again.json()["overlay_ip"]) == (first["node_id"], first["overlay_ip"])
    assert len(reg.nodes()) == 1
    hb = client.post(f"/v1/nodes/{first['node_id']}/heartbeat", json={"report": encode(sample_report())},
                     headers={"Authorization": f"Bearer {again.json()['credential']}"})
    assert hb.status_code == 200
    # Confirmed now: the same request is an attempt to take the node over, and is refused.
    third = client.post("/v1/enroll", json=body)
    assert third.status_code == 401 and third.json()["error"] == "token_used"


def test_credential_renewal_and_wireguard_key_rotation(api):
    client, reg, changes = api
    node_id, auth = enrolled(client)
    hb = client.post(f"/v1/nodes/{node_id}/heartbeat", json={"report": encode(sample_report())}, headers=auth).json()
    assert hb["credential_lifetime_s"] == 30 * 86400 and 0 < hb["credential_expires_in_s"] <= 30 * 86400
    new_key = public_key_of(generate_private_key())
    before = len(changes)
    r = client.post(f"/v1/nodes/{node_id}/credential", json={"wg_public_key": new_key}, headers=auth)
    assert r.status_code == 200, r.text
    renewed = r.json()
    assert renewed["wg_public_key"] == new_key and reg.node(node_id).wg_public_key == new_key
    assert len(changes) == before + 1  # the hub is told at once
    new_auth = {"Authorization": f"Bearer {renewed['credential']}"}
    for headers in (auth, new_auth):  # the old credential works for the overlap
        assert client.post(f"/v1/nodes/{node_id}/heartbeat", json={"report": encode(sample_report())},
                           headers=headers).status_code == 200
    old = client.post(f"/v1/nodes/{node_id}/heartbeat", json={"report": encode(sample_report())}, headers=auth).json()
    assert old["credential_expires_in_s"] <= 3600  # the overlap, so the node renews
    same = client.post(f"/v1/nodes/{node_id}/credential", json={}, headers=new_auth)
    assert same.status_code == 200 and same.json()["wg_public_key"] == new_key
    reg.revoke(node_id)  # revocation works at once, whatever credential is presented
    for headers in (auth, new_auth, {"Authorization": f"Bearer {same.json()['credential']}"}):
        r = client.post(f"/v1/nodes/{node_id}/credential", json={}, headers=headers)
        assert r.status_code in (401, 403)
    assert client.post(f"/v1/nodes/{node_id}/credential", json={}).status_code == 401


def test_an_expired_credential_is_refused(tmp_path):
    reg = Registry(tmp_path / "r.sqlite", ipaddress.IPv4Network("100.96.0.0/16"), credential_lifetime_s=0.05)
    reg.add_token("tok001", SECRET, 60, uses=1)
    client = TestClient(create_app(reg, region_facts(), b"PEM"))
    node_id, auth = enrolled(client)
    import time
    time.sleep(0.1)
    r = client.post(f"/v1/nodes/{node_id}/heartbeat", json={"report": encode(sample_report())}, headers=auth)
    assert r.status_code == 401 and r.json()["error"] == "credential_expired"
    assert "new token" in r.json()["message"]


def test_openapi_documents_every_refusal_and_the_formats(api):
    client, _, _ = api
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    assert set(paths["/v1/enroll"]["post"]["responses"]) >= {"200", "401", "409", "413", "422"}
    assert set(paths["/v1/nodes/{node_id}/heartbeat"]["post"]["responses"]) >= {"200", "401", "403", "413", "422"}
    assert set(paths["/v1/nodes/{node_id}/credential"]["post"]["responses"]) >= {"200", "401", "403", "409", "413", "422"}
    (scheme,) = doc["components"]["securitySchemes"].values()
    assert scheme["scheme"].lower() == "bearer" and "base64url" in scheme["bearerFormat"]
    enroll_schema = doc["components"]["schemas"]["EnrollRequest"]["properties"]
    assert enroll_schema["token_id"]["pattern"] and enroll_schema["secret"]["pattern"]
    assert enroll_schema["wg_public_key"]["pattern"]


def test_each_heartbeat_answered_is_timed_once_with_its_status(tmp_path):
    reg = Registry(tmp_path / "r.sqlite", ipaddress.IPv4Network("100.96.0.0/16"))
    reg.add_token("tok001", SECRET, 60, uses=1)
    timed = []
    client = TestClient(create_app(reg, region_facts(), b"PEM",
                                   ApiHooks(on_heartbeat_s=lambda s, status: timed.append((s, status)))))
    body = client.post("/v1/enroll", json=enroll_body()).json()
    assert timed == []  # an enrollment is not a heartbeat
    url = f"/v1/nodes/{body['node_id']}/heartbeat"
    report = {"report": encode(sample_report())}
    assert client.post(url, json=report, headers={"Authorization": f"Bearer {body['credential']}"}).status_code == 200
    assert client.post(url, json=report, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert [status for _, status in timed] == [200, 401]
    assert all(0 < s < 60 for s, _ in timed)


@pytest.mark.parametrize("depth", [40, 500, 900])
def test_a_deeply_nested_report_is_422_not_500(api, depth):
    """A 1.6 KB report nested 500 deep once reached Python's recursion limit in the strict
    check and came back as a 500."""
    client, reg, _ = api
    node_id, auth = enrolled(client)
    report = encode(sample_report())
    body = json.dumps({"report": report}).replace('"gpus": []', '"gpus": ' + "[" * depth + "]" * depth)
    r = client.post(f"/v1/nodes/{node_id}/heartbeat", content=body, headers={**auth, "content-type": "application/json"})
    assert r.status_code == 422, r.text[:200]
    assert reg.node(node_id).report == {}
