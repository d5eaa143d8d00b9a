"""The fleet page without a browser: the history store's bounds and inferred offline changes,
what the page's JSON says about a region (problems first, totals), the admin key and its
sessions, and that node-sent text reaches the page as data only."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from garage_node.core.settings import ConfigError
from garage_node.core.wire import (GPU, AgentVersions, EngineReport, EngineState, NodeReport, NodeState, RayState,
                                   RayStatus, TokensServed, encode)
from garage_node.head.config import HeadConfig, load_head_config
from garage_node.head.fleetpage import History, create_fleet_app
from garage_node.head.fleetpage.auth import KEY_PREFIX, SESSION_COOKIE, key_file, make_key
from garage_node.head.fleetpage.history import MAX_SAMPLES
from garage_node.head.fleetpage.view import HOT_C
from garage_node.head.registry import NodeRow
from garage_node.head.reports import Reports

OFFLINE_AFTER_S = 30.0


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def gpu(index: int = 0, name: str = "NVIDIA GeForce RTX 4090", temp: int | None = 50, healthy: bool = True,
        error: str | None = None, util: int | None = 10) -> GPU:
    return GPU(index=index, name=name, uuid=f"GPU-{index}", memory_total_mib=24564, memory_free_mib=20000,
               compute_capability="8.9", temperature_c=temp, power_w=120.0, utilization_pct=util,
               healthy=healthy, error=error)


def report(state: NodeState = NodeState.JOINED, gpus: list[GPU] | None = None, engine: EngineState = EngineState.HEALTHY,
           model: str | None = "garage/tiny-llama", running: int | None = 2, waiting: int | None = 0,
           message: str = "joined as 100.96.0.2") -> NodeReport:
    return NodeReport(
        state=state, message=message, gpus=[gpu()] if gpus is None else gpus, gpu_note=None,
        driver_version="550.54.14", cuda_version="12.4", versions=AgentVersions("0.1.0", "2.60.0", "3.11"),
        ray=RayStatus(state=RayState.ALIVE),
        engine=EngineReport(state=engine, model=model, endpoint="http://100.96.0.2:8000", draining=False,
                            requests_running=running, requests_waiting=waiting))


class FakeRegistry:
    """The registry as the page reads it: NodeRows (what the head's Registry.nodes() returns)."""

    def __init__(self) -> None:
        self.rows: dict[str, NodeRow] = {}

    def put(self, node_id: str, name: str, last_seen: float | None, rep: NodeReport | dict | str | None,
            revoked_at: float | None = None) -> None:
        self.rows[node_id] = NodeRow(
            id=node_id, name=name, region="testland", wg_public_key="k" * 43 + "=",
            overlay_ip=f"100.96.0.{len(self.rows) + 2}", enrolled_at=1_700_000_000.0, last_seen=last_seen,
            revoked_at=revoked_at, report=encode(rep) if isinstance(rep, NodeReport) else rep,
            ray_alive=True, ray_checked_at=None)

    def nodes(self) -> list[NodeRow]:
        return list(self.rows.values())


# ---------------------------------------------------------------- history


def test_history_buckets_samples_and_keeps_the_window() -> None:
    clock = Clock()
    h = History(OFFLINE_AFTER_S, window_s=3600, clock=clock)
    assert h.bucket_s == 3600 / MAX_SAMPLES
    for i in range(2000):  # a heartbeat every 2 s for 4000 s, hotter each time
        h.record("n1", report(gpus=[gpu(temp=40 + i % 50)], running=i % 5))
        clock.t += 2
    samples = h.node_history("n1")["samples"]
    assert len(samples) <= MAX_SAMPLES + 1
    assert samples[0][0] >= clock.t - 3600  # nothing older than the window
    # A bucket keeps its hottest reading and busiest moment, not the last one.
    assert max(s[1] for s in samples) == 89
    assert all(s[3] == 4 for s in samples[1:-1])


def test_history_changes_record_state_and_engine_changes_once() -> None:
    clock = Clock()
    h = History(OFFLINE_AFTER_S, clock=clock)
    for _ in range(5):
        h.record("n1", report())
        clock.t += 2
    h.record("n1", report(engine=EngineState.DEGRADED))
    clock.t += 2
    h.record("n1", report(state=NodeState.DEGRADED, message="degraded: overlay down"))
    changes = h.node_history("n1")["changes"]
    assert [c["state"] for c in changes] == ["joined · engine healthy", "joined · engine degraded",
                                             "degraded · engine healthy"]
    assert changes[-1]["message"] == "degraded: overlay down"


def test_history_infers_offline_dated_when_the_head_began_to_say_so() -> None:
    clock = Clock()
    h = History(OFFLINE_AFTER_S, clock=clock)
    h.record("n1", report())
    last = clock.t
    clock.t += 500
    # The page looks: the registry says offline.
    h.observe("n1", "offline", last, None)
    h.observe("n1", "offline", last, None)  # once, however often the page looks
    clock.t += 100
    h.record("n1", report())  # back
    changes = h.node_history("n1")["changes"]
    assert [c["state"] for c in changes] == ["joined · engine healthy", "offline", "joined · engine healthy"]
    assert changes[1]["t"] == pytest.approx(last + OFFLINE_AFTER_S)
    assert changes[2]["t"] == pytest.approx(clock.t)


def test_history_infers_offline_from_a_gap_nobody_watched() -> None:
    clock = Clock()
    h = History(OFFLINE_AFTER_S, clock=clock)
    h.record("n1", report())
    last = clock.t
    clock.t += 1000
    h.record("n1", report())
    changes = h.node_history("n1")["changes"]
    assert [c["state"] for c in changes] == ["joined · engine healthy", "offline", "joined · engine healthy"]
    assert changes[1]["t"] == pytest.approx(last + OFFLINE_AFTER_S)


def test_history_bounds_changes_and_nodes() -> None:
    clock = Clock()
    h = History(OFFLINE_AFTER_S, max_changes=10, max_nodes=50, clock=clock)
    for i in range(100):
        h.record("n1", report(state=NodeState.JOINED if i % 2 else NodeState.DEGRADED))
        clock.t += 1
    assert len(h.node_history("n1")["changes"]) == 10
    for i in range(200):
        h.record(f"m{i}", report())
        clock.t += 1
    assert len(h) == 50
    assert h.latest("m199") is not None and h.latest("m0") is None  # the longest-silent went first
    h.forget_missing({"m199"})
    assert len(h) == 1


def test_history_drops_old_changes_but_keeps_the_current_state() -> None:
    clock = Clock()
    h = History(OFFLINE_AFTER_S, window_s=600, clock=clock)
    h.record("n1", report(state=NodeState.DEGRADED))
    h.record("n1", report())
    clock.t += 10_000
    assert [c["state"] for c in h.node_history("n1")["changes"]] == ["joined · engine healthy"]
    assert h.node_history("n1")["samples"] == []


def test_history_is_fed_through_the_reports_fanout() -> None:
    h = History(OFFLINE_AFTER_S)
    reports = Reports()
    reports.subscribe(h.record)
    reports.publish("n1", report(model="m-from-fanout"))
    assert h.latest("n1")[1].engine.model == "m-from-fanout"


def test_history_reads_throughput_only_where_the_engine_reports_it() -> None:
    from garage_node.head.fleetpage.history import tokens_per_s

    rep = report()
    assert tokens_per_s(rep) is None  # today's EngineReport has no such field: tolerated

    class WithRate:  # a newer report that carries vLLM's generation rate
        engine = type("E", (), {"generation_tokens_per_s": 123.5})()
    assert tokens_per_s(WithRate()) == 123.5  # type: ignore[arg-type]


# ---------------------------------------------------------------- the app


def fleet_app(reg: FakeRegistry, clock: Clock, tmp_path: Path | None = None, require_key: bool = False,
              usage=None, history: History | None = None) -> tuple[TestClient, History]:
    history = history or History(OFFLINE_AFTER_S, clock=clock)
    app = create_fleet_app(reg, history, OFFLINE_AFTER_S, region="testland",
                           key_path=key_file(tmp_path) if tmp_path else None, require_key=require_key,
                           usage=usage, poll_s=2.0, clock=clock)
    return TestClient(app), history


def region(clock: Clock) -> FakeRegistry:
    reg = FakeRegistry()
    now = clock.t
    reg.put("n-ok", "alice-pc", now - 3, report(gpus=[gpu(0, temp=61), gpu(1, "NVIDIA GeForce RTX 4060", temp=55)]))
    reg.put("n-off", "bob-pc", now - 300, report(running=5))
    reg.put("n-hot", "carol-pc", now - 2, report(gpus=[gpu(temp=HOT_C + 3)]))
    reg.put("n-sick", "dave-pc", now - 2, report(gpus=[gpu(0, healthy=False, error="fell off the bus")]))
    reg.put("n-rev", "eve-pc", now - 9999, report(), revoked_at=now - 5000)
    reg.put("n-deg", "frank-pc", now - 1, report(state=NodeState.DEGRADED, message="degraded: overlay down"))
    reg.put("n-eng", "gina-pc", now - 1, report(engine=EngineState.REFUSED, model=None))
    reg.put("n-bad", "hank-pc", now - 1, {"state": "exploded"})  # a report that no longer decodes
    reg.put("n-new", "ivan-pc", None, None)  # enrolled, never heard from
    return reg


def test_fleet_lists_problems_first_with_the_reason(tmp_path: Path) -> None:
    clock = Clock()
    client, _ = fleet_app(region(clock), clock)
    data = client.get("/api/fleet").json()
    pcs = {p["name"]: p for p in data["pcs"]}
    assert pcs["alice-pc"]["problem"] is None and pcs["alice-pc"]["status"] == "online"
    assert pcs["bob-pc"]["status"] == "offline" and pcs["bob-pc"]["problem"] == "offline: no heartbeat"
    assert pcs["carol-pc"]["problem"] == f"GPU 0 (NVIDIA GeForce RTX 4090) at {HOT_C + 3} °C"
    assert pcs["dave-pc"]["problem"] == "GPU 0 (NVIDIA GeForce RTX 4090) unhealthy: fell off the bus"
    assert pcs["eve-pc"]["status"] == "revoked" and pcs["eve-pc"]["problem"] is None
    assert pcs["frank-pc"]["problem"] == "degraded: overlay down"
    assert pcs["gina-pc"]["problem"] == "engine refused"
    assert pcs["hank-pc"]["problem"] == "its last report could not be read"
    assert pcs["ivan-pc"]["problem"] == "offline: no heartbeat" and pcs["ivan-pc"]["last_seen"] is None
    order = [p["name"] for p in data["pcs"]]
    # Problems (by name), then the healthy, then the revoked.
    assert order == ["bob-pc", "carol-pc", "dave-pc", "frank-pc", "gina-pc", "hank-pc", "ivan-pc", "alice-pc", "eve-pc"]
    # An offline PC serves nothing now, whatever its last report said.
    assert pcs["bob-pc"]["engine"]["requests_running"] is None
    assert pcs["alice-pc"]["temp_max_c"] == 61 and len(pcs["alice-pc"]["gpus"]) == 2


def test_fleet_totals(tmp_path: Path) -> None:
    clock = Clock()
    client, _ = fleet_app(region(clock), clock)
    t = client.get("/api/fleet").json()["totals"]
    assert t["pcs"] == 8 and t["pcs_online"] == 6  # revoked not counted; bob and ivan offline
    assert t["problems"] == 7
    assert t["gpus"] == 2 + 1 + 1 + 1 + 1  # alice 2, carol, dave, frank, gina (hank's report is unreadable)
    assert t["gpus_healthy"] == t["gpus"] - 1
    assert t["models"] == ["garage/tiny-llama"]
    assert t["tokens_per_s"] is None  # no engine reports a rate: shown as such, not as 0
    assert t["requests_running"] == 2 * 5  # alice, carol, dave, frank, gina; bob is offline
    assert t["tokens_served_today"] is None


def test_fleet_shows_tokens_served_from_the_ledger_and_survives_its_failure() -> None:
    clock = Clock()
    reg = FakeRegistry()
    reg.put("n1", "alice-pc", clock.t, report())
    reg.put("n2", "bob-pc", clock.t, report())

    ledger: dict[str, TokensServed] = {"n1": TokensServed(today=1200, total=98000)}
    broken = False

    def usage() -> dict[str, TokensServed]:
        if broken:
            raise RuntimeError("ledger hiccup")
        return ledger

    client, _ = fleet_app(reg, clock, usage=usage)
    data = client.get("/api/fleet").json()
    pcs = {p["name"]: p for p in data["pcs"]}
    assert pcs["alice-pc"]["tokens_served"] == {"today": 1200, "total": 98000}
    assert pcs["bob-pc"]["tokens_served"] == {"today": 0, "total": 0}  # not in the ledger: served nothing yet
    assert data["totals"]["tokens_served_today"] == 1200
    assert data["totals"]["tokens_served_total"] == 98000
    broken = True
    clock.t += 5
    data = client.get("/api/fleet").json()
    # A ledger that fails: unknown, not zero, and the rest of the page is there.
    assert [p["tokens_served"] for p in data["pcs"]] == [None, None] and len(data["pcs"]) == 2
    assert data["totals"]["tokens_served_today"] is None


def test_fleet_prefers_the_fresher_report_from_the_fanout() -> None:
    clock = Clock()
    reg = FakeRegistry()
    reg.put("n1", "alice-pc", clock.t - 5, report(model="old-model"))
    client, history = fleet_app(reg, clock)
    history.record("n1", report(model="new-model"))
    clock.t += 2
    pc = client.get("/api/fleet").json()["pcs"][0]
    assert pc["engine"]["model"] == "new-model"


def test_pc_page_has_details_and_history() -> None:
    clock = Clock()
    reg = region(clock)
    client, history = fleet_app(reg, clock)
    for temp in (50, 60, 70):
        history.record("n-ok", report(gpus=[gpu(temp=temp)]))
        clock.t += 60
    reg.put("n-ok", "alice-pc", clock.t, report())
    data = client.get("/api/pc/n-ok").json()
    assert data["pc"]["name"] == "alice-pc"
    temps = [s[1] for s in data["history"]["samples"]]
    assert temps == [50, 60, 70]
    assert data["history"]["changes"][0]["state"] == "joined · engine healthy"
    assert client.get("/api/pc/nope").status_code == 404
    # The offline PC's page says when it went offline.
    changes = client.get("/api/pc/n-off").json()["history"]["changes"]
    assert changes[-1]["state"] == "offline"
    assert changes[-1]["t"] == pytest.approx(reg.rows["n-off"].last_seen + OFFLINE_AFTER_S)


def test_pages_and_assets_are_served_with_a_strict_policy() -> None:
    clock = Clock()
    client, _ = fleet_app(region(clock), clock)
    for path, kind in (("/", "text/html"), ("/pc/n-ok", "text/html"), ("/app.js", "text/javascript"),
                       ("/style.css", "text/css")):
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
    assert client.get("/nothing-here").status_code == 404
    assert client.get("/../pyproject.toml").status_code == 404
    # The page must not need anything the policy forbids: no inline script or style.
    html = client.get("/").text
    assert not re.search(r"<script>(?!\s*</script>)|<script(?![^>]*\bsrc=)|\sstyle=|\son[a-z]+=", html)
    assert client.get("/api/config").json()["key"] is False


def test_no_route_changes_the_region() -> None:
    clock = Clock()
    client, _ = fleet_app(region(clock), clock)
    for path in ("/api/fleet", "/api/pc/n-ok", "/"):
        assert client.post(path).status_code == 405
        assert client.delete(path).status_code == 405


def test_node_sent_text_stays_data() -> None:
    """A hostile PC names itself with markup: the JSON carries it as a string, and the page's
    script only ever sets it as text."""
    clock = Clock()
    reg = FakeRegistry()
    evil = '<img src=x onerror="alert(1)">'
    reg.put("n1", evil, clock.t, report(message=evil, model=evil, state=NodeState.DEGRADED))
    client, _ = fleet_app(reg, clock)
    pc = client.get("/api/fleet").json()["pcs"][0]
    assert pc["name"] == evil and pc["message"] == evil
    js = client.get("/app.js").text
    assert "innerHTML" not in js and "outerHTML" not in js and "insertAdjacentHTML" not in js
    assert "eval(" not in js and "document.write" not in js


# ---------------------------------------------------------------- the admin key


def test_key_is_stored_hashed_and_private(tmp_path: Path) -> None:
    key = make_key(tmp_path)
    stored = key_file(tmp_path)
    assert key.startswith(KEY_PREFIX) and len(key) > 40
    assert stored.stat().st_mode & 0o777 == 0o600
    assert key not in stored.read_text() and key[len(KEY_PREFIX):] not in stored.read_text()
    assert make_key(tmp_path) != key


def test_key_required_everywhere_but_the_form(tmp_path: Path) -> None:
    clock = Clock()
    client, _ = fleet_app(region(clock), clock, tmp_path, require_key=True)
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    for path in ("/api/fleet", "/api/pc/n-ok", "/api/config"):
        assert client.get(path).status_code == 401
    assert client.get("/app.js", follow_redirects=False).status_code == 303
    # No key made yet: the form says how to make one.
    assert "garage-node head fleet-key" in client.get("/login").text


def test_login_with_the_key_then_logout(tmp_path: Path) -> None:
    clock = Clock()
    client, _ = fleet_app(region(clock), clock, tmp_path, require_key=True)
    key = make_key(tmp_path)
    r = client.post("/login", data={"key": "gfk1.wrong"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?error=wrong"
    assert SESSION_COOKIE not in r.cookies
    assert "not the admin key" in client.get("/login?error=wrong").text
    assert client.get("/api/fleet").status_code == 401

    r = client.post("/login", data={"key": key}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert key not in r.headers["set-cookie"]
    client.cookies.set(SESSION_COOKIE, r.cookies[SESSION_COOKIE])
    assert client.get("/api/fleet").status_code == 200
    assert client.get("/api/config").json()["key"] is True

    client.post("/logout", follow_redirects=False)
    client.cookies.set(SESSION_COOKIE, r.cookies[SESSION_COOKIE])  # the old cookie, kept by hand
    assert client.get("/api/fleet").status_code == 401


def test_a_new_key_ends_sessions_opened_with_the_old(tmp_path: Path) -> None:
    clock = Clock()
    client, _ = fleet_app(region(clock), clock, tmp_path, require_key=True)
    key = make_key(tmp_path)
    sid = client.post("/login", data={"key": key}, follow_redirects=False).cookies[SESSION_COOKIE]
    client.cookies.set(SESSION_COOKIE, sid)
    assert client.get("/api/fleet").status_code == 200
    make_key(tmp_path)
    assert client.get("/api/fleet").status_code == 401
    # Sessions also end with their lifetime.
    new_key = make_key(tmp_path)
    sid = client.post("/login", data={"key": new_key}, follow_redirects=False).cookies[SESSION_COOKIE]
    client.cookies.set(SESSION_COOKIE, sid)
    assert client.get("/api/fleet").status_code == 200
    clock.t += 13 * 3600
    assert client.get("/api/fleet").status_code == 401


def test_login_refuses_a_huge_body(tmp_path: Path) -> None:
    clock = Clock()
    client, _ = fleet_app(region(clock), clock, tmp_path, require_key=True)
    make_key(tmp_path)
    assert client.post("/login", content=b"key=" + b"a" * 10000,
                       headers={"content-type": "application/x-www-form-urlencoded"}).status_code == 413


def test_loopback_page_without_a_key_sends_login_home() -> None:
    clock = Clock()
    client, _ = fleet_app(region(clock), clock)
    assert client.get("/login", follow_redirects=False).headers["location"] == "/"


# ---------------------------------------------------------------- config


def write_head(tmp_path: Path, fleet: str) -> Path:
    p = tmp_path / "head.toml"
    p.write_text(f'[api]\nadvertise_host = "10.0.0.1"\n\n[fleet]\n{fleet}')
    return p


def test_fleet_config_defaults_to_loopback_without_a_key() -> None:
    f = HeadConfig().fleet
    assert f.enabled and f.listen_host == "127.0.0.1" and f.port == 8444 and not f.needs_key


def test_fleet_config_needs_a_key_off_loopback(tmp_path: Path) -> None:
    cfg = load_head_config(write_head(tmp_path, 'listen_host = "100.96.0.1"\nport = 9000\n'))
    assert cfg.fleet.needs_key and cfg.fleet.port == 9000
    assert load_head_config(write_head(tmp_path, 'listen_host = "::1"\n')).fleet.needs_key is False
    assert load_head_config(write_head(tmp_path, "require_key = true\n")).fleet.needs_key is True
    assert replace(cfg.fleet, listen_host="127.0.0.2").needs_key is False


@pytest.mark.parametrize("line", ['listen_host = "localhost"', "port = 0", "history_hours = 100", "colour = 1"])
def test_fleet_config_errors_name_the_key(tmp_path: Path, line: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_head_config(write_head(tmp_path, line + "\n"))
    assert "fleet." in str(e.value)


def test_owner_pauses_are_shown_not_counted_as_problems_and_quarantined_gpus_are() -> None:
    """The owner's serving hours and heat guard (NodeReport.serving) and a quarantined GPU
    (GPU.quarantined), as the PC reports them."""
    clock = Clock()
    reg = FakeRegistry()
    paused = encode(report(engine=EngineState.DRAINED, model=None))
    paused["serving"] = {"serving": False, "paused": "outside serving hours until 23:00"}
    reg.put("n1", "alice-pc", clock.t, paused)
    quarantined = encode(report(gpus=[gpu(0), gpu(1, "NVIDIA GeForce RTX 4060")]))
    quarantined["gpus"][1].update(quarantined=True, healthy=False, error="Xid 79: fallen off the bus")
    reg.put("n2", "bob-pc", clock.t, quarantined)
    client, _ = fleet_app(reg, clock)
    data = client.get("/api/fleet").json()
    pcs = {p["name"]: p for p in data["pcs"]}
    assert pcs["alice-pc"]["paused"] == "outside serving hours until 23:00"
    assert pcs["alice-pc"]["problem"] is None and pcs["alice-pc"]["rank"] == 1
    assert data["totals"]["paused"] == 1
    assert pcs["bob-pc"]["problem"] == "GPU 1 (NVIDIA GeForce RTX 4060) quarantined: Xid 79: fallen off the bus"
    assert pcs["bob-pc"]["gpus"][1]["quarantined"] is True
