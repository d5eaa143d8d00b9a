"""Federation (issue #21) on loopback: three regions, each the real gateway, federation and
nats-server (testing/fedregion.py) with engine stand-ins; no root. The namespace test with
delays between regions is tests/integration/test_federation_netns.py."""

from __future__ import annotations

import os
import shutil
import signal
import time
from dataclasses import replace

import httpx
import pytest

from garage_node.core.settings import ConfigError, parse
from garage_node.head.config import HeadConfig
from garage_node.head.federation import keysync
from garage_node.head.federation.capacity import PeerView
from garage_node.head.federation.fedstore import FedStore
from garage_node.head.federation.records import KeyRecord, ModelCapacity, Summary
from testing.federation import Regions, post, wait_for

pytestmark = pytest.mark.skipif(shutil.which("nats-server") is None, reason="nats-server is not installed")


# ---------------------------------------------------------------- pure parts


def rec(**kw) -> KeyRecord:
    base = KeyRecord(name="alice", hash="h1", hint="gk-abc", models="", rpm=None, tpm=None, quota_tokens=None,
                     created_at=1.0, expires_at=None, revoked_at=None, origin="us", updated_at=10.0)
    return replace(base, **kw)


def test_a_revocation_is_kept_whatever_order_the_versions_arrive_in():
    created, revoked = rec(), rec(revoked_at=20.0, origin="eu", updated_at=20.0)
    # revocation first, then the older creation: still revoked
    after = keysync.merge(None, revoked, 0.0)
    assert after is not None and after.revoked_at == 20.0
    assert keysync.merge(after, created, after.updated_at) is None  # nothing to change
    # creation first, then the revocation
    after2 = keysync.merge(created, revoked, created.updated_at)
    assert after2 is not None and after2.revoked_at == 20.0
    # a newer change of terms from a region that had not heard of the revocation keeps it revoked
    newer = rec(rpm=5, updated_at=30.0, origin="ap")
    after3 = keysync.merge(after2, newer, after2.updated_at)
    assert after3 is not None and after3.rpm == 5 and after3.revoked_at == 20.0


def test_a_key_name_made_in_two_regions_with_other_secrets_is_not_overwritten():
    assert keysync.merge(rec(), rec(hash="h2", updated_at=99.0), 10.0) is None


def test_the_nearest_region_within_the_budget_is_chosen_and_stale_or_full_ones_never():
    v = PeerView(stale_after_s=5.0, default_ttft_ms=150.0)
    cap = ModelCapacity(healthy=1, free_slots=4, queue=0, ttft_p50_ms=100.0)
    for region, rtt in (("eu", 80.0), ("ap", 250.0), ("sa", 60.0), ("af", 30.0)):
        v.rtt(region, rtt)
    v.summary(Summary("eu", 0.0, {"m": cap}), arrived=100.0)
    v.summary(Summary("ap", 0.0, {"m": cap}), arrived=100.0)  # 250 + 100 > 300
    v.summary(Summary("sa", 0.0, {"m": replace(cap, free_slots=0)}), arrived=100.0)  # full
    v.summary(Summary("af", 0.0, {"m": cap}), arrived=90.0)  # stale at 100
    assert [c.region for c in v.choose("m", budget_ms=300.0, now=100.0)] == ["eu"]
    assert [c.region for c in v.choose("m", budget_ms=400.0, now=100.0)] == ["eu", "ap"]
    assert v.choose("other", budget_ms=400.0, now=100.0) == []
    # no TTFT measured yet: the default counts
    v.summary(Summary("eu", 0.0, {"m": replace(cap, ttft_p50_ms=None)}), arrived=100.0)
    assert v.choose("m", budget_ms=200.0, now=100.0) == []  # 80 + 150


def test_federation_config_says_what_is_wrong():
    base = {"enabled": True, "peers": {"eu": {"nats": "nats://10.0.0.2:4222", "gateway": "https://10.0.0.2:8080",
                                              "ca_file": "/etc/garage-node/eu-ca.pem"}}}
    cfg = parse(HeadConfig(), {"federation": base}, "head.toml", error=ConfigError)
    assert cfg.federation.peers["eu"].gateway == "https://10.0.0.2:8080"
    assert not parse(HeadConfig(), {}, "head.toml").federation.enabled  # off by default
    with pytest.raises(ConfigError, match="federation.peers.EU"):
        parse(HeadConfig(), {"federation": {"peers": {"EU": base["peers"]["eu"]}}}, "head.toml", error=ConfigError)
    with pytest.raises(ConfigError, match="federation.peers.eu.nats"):
        parse(HeadConfig(), {"federation": {"peers": {"eu": {"nats": "10.0.0.2", "gateway": "https://x"}}}}, "head.toml", error=ConfigError)
    no_ca = {"enabled": True, "peers": {"eu": {"nats": "nats://10.0.0.2:4222", "gateway": "https://10.0.0.2:8080"}}}
    with pytest.raises(ConfigError, match="federation.peers.eu.ca_file' is missing"):
        parse(HeadConfig(), {"federation": no_ca}, "head.toml", error=ConfigError)
    assert parse(HeadConfig(), {"federation": {**no_ca, "tls": False}}, "head.toml", error=ConfigError).federation


def test_usage_records_are_kept_once_per_id(tmp_path):
    from garage_node.head.federation.records import UsageRecord

    store = FedStore(tmp_path / "f.db")
    r = UsageRecord("id1", "us", 1.0, "alice", "n1", "pc1", "m", 7, 3)
    assert store.add_usage([r, replace(r, id="id2")]) == 2
    assert store.add_usage([r]) == 0  # shipped twice, kept once
    assert store.usage("region") == [("us", 2, 14, 6)]
    # The status's count of records not yet in the stream follows the shipping cursor.
    assert store.own_unshipped_count("us") == 2 and store.own_unshipped_count("eu") == 0
    store.set_cursor("shipped", store.own_unshipped("us")[0][0])
    assert store.own_unshipped_count("us") == len(store.own_unshipped("us")) == 1


# ---------------------------------------------------------------- three regions on loopback


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    # Leases of 30 tokens: the stand-ins bill 10 a request (7 + 3), so a quota's leases run out fast.
    regions = Regions(tmp_path_factory.mktemp("fed"), ["us", "eu", "ap"], lease_tokens=30)
    try:
        regions.start_all(within_s=60)
        yield regions
    finally:
        regions.stop_all()


def test_a_key_made_in_one_region_works_everywhere_and_its_revocation_reaches_every_region(fed):
    key, secret = fed.create_key("us", "alice")
    for region in ("eu", "ap"):
        r = wait_for(lambda region=region: (x := post(fed[region].url, secret)).status_code == 200 and x, 5.0)
        assert r, f"key made in us not valid in {region}"
        assert r.headers["x-garage-region"] == region and r.headers["x-garage-node"].startswith(region)
    fed.revoke_key("ap", "alice")
    # How fast is bench/federation.py's figure; here: it reaches every region, the revoking one too
    # (whose gateway had the key in its 2 s cache).
    for region in ("us", "eu", "ap"):
        assert wait_for(lambda region=region: post(fed[region].url, secret).status_code == 401, 5.0), region
    r = post(fed["us"].url, secret)
    assert r.json()["error"]["code"] == "revoked_api_key" and secret not in r.text


def test_every_request_is_counted_once_in_every_region(fed):
    _, secret = fed.create_key("eu", "bob")
    assert wait_for(lambda: all(post(fed[r].url, secret).status_code == 200 for r in ("us", "ap")), 5.0)
    time.sleep(2.5)  # the checks' records shipped and counted everywhere (status.json: every second)
    before = {r: fed[r].status()["usage_records"] for r in ("us", "eu", "ap")}
    assert before["us"] == before["eu"] == before["ap"], before
    for region in ("us", "eu", "ap"):
        for _ in range(5):
            assert post(fed[region].url, secret, stream=region == "ap").status_code == 200
    want = {r: before["us"].get(r, 0) + 5 for r in ("us", "eu", "ap")}
    assert wait_for(lambda: all(fed[r].status()["usage_records"] == want for r in ("us", "eu", "ap")), 10.0,
                    every_s=0.3), ([fed[r].status()["usage_records"] for r in fed.regions], want)
    store = FedStore(fed["eu"].state / "federation" / "federation.db")
    by_key = {row[0]: row for row in store.usage("key")}
    assert by_key["bob"][1] == 15 + 2 and by_key["bob"][2] == 17 * 7  # the two checks above, too
    by_region = {row[0]: row[1] for row in store.usage("region")}
    assert set(by_region) == {"us", "eu", "ap"}


def test_a_region_that_cannot_serve_replays_to_the_nearest_that_can_else_429(fed):
    _, secret = fed.create_key("us", "carol")
    assert wait_for(lambda: post(fed["eu"].url, secret).status_code == 200, 5.0)
    try:
        fed["us"].all_pcs("busy")
        # Once us' own PCs report a queue: served elsewhere, saying where.
        r = wait_for(lambda: (x := post(fed["us"].url, secret)).headers.get("x-garage-spilled-from") and x, 5.0)
        assert r and r.status_code == 200 and r.headers["x-garage-region"] in ("eu", "ap")
        assert r.headers["x-garage-node"].startswith(r.headers["x-garage-region"])
        s = post(fed["us"].url, secret, stream=True)
        assert s.status_code == 200 and s.headers["x-garage-region"] != "us" and s.text.endswith("data: [DONE]\n\n")
        fed["eu"].all_pcs("down")
        fed["ap"].all_pcs("busy")
        # Every region busy (their summaries say so within a couple of seconds): 429 at once.
        r = wait_for(lambda: (x := post(fed["us"].url, secret)).status_code == 429 and x, 10.0, every_s=0.3)
        assert r and r.headers["retry-after"] and r.json()["error"]["code"] == "no_capacity"
        # A replay without the region credential is refused.
        bad = httpx.post(fed["ap"].url + "/v1/completions", json={"model": "tiny", "prompt": "x"},
                         headers={"authorization": f"Bearer {secret}", "x-garage-spilled-from": "us",
                                  "x-garage-region-auth": "guess"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_region_credential"
    finally:
        for region in ("us", "eu", "ap"):
            fed[region].all_pcs("healthy")


def test_nats_down_the_region_serves_its_keys_says_it_is_degraded_and_ships_its_usage_later(fed):
    _, secret = fed.create_key("ap", "dave")
    assert wait_for(lambda: post(fed["eu"].url, secret).status_code == 200, 5.0)
    pid = fed["eu"].nats_pid()
    assert pid
    os.kill(pid, signal.SIGSTOP)  # eu's NATS hangs: eu is cut off from the federation
    try:
        r = wait_for(lambda: (x := post(fed["eu"].url, secret)).headers.get("x-garage-federation") and x, 15.0,
                     every_s=0.3)
        assert r and r.status_code == 200 and r.headers["x-garage-federation"] == "degraded"
        assert wait_for(lambda: fed["eu"].status()["degraded"], 3.0)
        us_before = fed["us"].status()["usage_records"].get("eu", 0)
        for _ in range(4):
            assert post(fed["eu"].url, secret).status_code == 200
    finally:
        os.kill(pid, signal.SIGCONT)
    # Every record eu served while cut off reaches us once eu's NATS is back, each once.
    assert wait_for(lambda: fed["us"].status()["usage_records"].get("eu", 0)
                    == fed["eu"].status()["usage_records"].get("eu", -1) >= us_before + 4, 15.0, every_s=0.3)
    assert wait_for(lambda: not fed["eu"].status()["degraded"], 15.0, every_s=0.3)


def test_cli_makes_the_secret_once_and_prints_the_global_ledger(tmp_path, capsys):
    from garage_node.cli import main
    from garage_node.head.federation.records import UsageRecord

    state = tmp_path / "state"
    cfg = tmp_path / "head.toml"
    cfg.write_text(f'[head]\nregion = "eu"\nstate_dir = "{state}"\n[api]\nadvertise_host = "127.0.0.1"\n'
                   "[federation]\nenabled = true\n")
    assert main(["head", "federation", "secret", "--config", str(cfg)]) == 0
    secret = state / "federation" / "secret"
    assert secret.stat().st_mode & 0o777 == 0o600 and len(secret.read_text().strip()) >= 32
    assert main(["head", "federation", "secret", "--config", str(cfg)]) == 2  # never replaced by mistake
    store = FedStore(state / "federation" / "federation.db")
    store.add_usage([UsageRecord("a", "us", time.time(), "alice", "n1", "us-pc1", "m", 7, 3),
                     UsageRecord("b", "eu", time.time(), "alice", "n2", "eu-pc1", "m", 1, 1)])
    capsys.readouterr()
    assert main(["head", "usage", "--global", "--by", "region", "--json", "--config", str(cfg)]) == 0
    rows = {r["region"]: r for r in __import__("json").loads(capsys.readouterr().out)}
    assert rows["us"]["total_tokens"] == 10 and rows["eu"]["requests"] == 1
    assert main(["head", "usage", "--by", "region", "--config", str(cfg)]) == 2  # needs --global


def test_a_quota_is_spent_across_regions_through_leases_and_never_overshot(fed):
    _, secret = fed.create_key("us", "quota", quota_tokens=100)
    assert wait_for(lambda: all(post(fed[r].url, secret).status_code in (200, 429) for r in ("eu", "ap"))
                    and post(fed["eu"].url, secret).status_code != 401, 5.0)
    served = 0
    refused: dict[str, str] = {}
    for _ in range(30):
        for region in ("us", "eu", "ap"):
            r = post(fed[region].url, secret)
            if r.status_code == 200:
                served += 1
            else:
                assert r.status_code == 429, r.text
                refused[region] = r.json()["error"]["code"]
        if len(refused) == 3:
            break
    # Every request above and the checks before it: 10 tokens each, 100 in all, wherever served.
    time.sleep(2)
    total = {row[0]: row for row in FedStore(fed["ap"].state / "federation" / "federation.db").usage("key")}["quota"]
    assert total[2] + total[3] == 100, total
    assert set(refused.values()) == {"insufficient_quota"}


def test_a_regions_nats_takes_only_tls_with_its_ca_and_the_federation_secret(fed):
    import asyncio

    import nats

    from garage_node.head.federation.natsd import client_tls

    secret = fed.secret_file.read_text().strip()
    eu_ca, us_ca = fed["eu"].state / "pki" / "ca.pem", fed["us"].state / "pki" / "ca.pem"
    tries = {"plain, with the secret": {"user": "federation", "password": secret},
             "TLS, another region's CA": {"tls": client_tls(us_ca), "user": "federation", "password": secret},
             "TLS, a wrong password": {"tls": client_tls(eu_ca), "user": "federation", "password": "x" * 43},
             "TLS, its CA, the secret": {"tls": client_tls(eu_ca), "user": "federation", "password": secret}}

    async def connect(kw) -> bool:
        try:
            nc = await nats.connect(fed["eu"].nats_url, connect_timeout=2, allow_reconnect=False,
                                    max_reconnect_attempts=0, **kw)
        except Exception:
            return False
        await nc.close()
        return True

    got = {name: asyncio.run(connect(kw)) for name, kw in tries.items()}
    assert got == {"plain, with the secret": False, "TLS, another region's CA": False, "TLS, a wrong password": False,
                   "TLS, its CA, the secret": True}
    conf = (fed["eu"].state / "federation" / "nats.conf")
    assert conf.stat().st_mode & 0o077 == 0 and "tls {" in conf.read_text()


def test_a_head_that_cannot_federate_says_what_to_do_before_it_starts(tmp_path):
    from garage_node.head.federation.config import FederationSection
    from garage_node.head.federation.natsd import make_secret
    from garage_node.head.federation.service import Federation
    from garage_node.head.setup import SetupError  # `head run` prints these and exits, no traceback

    plain = FederationSection(enabled=True, tls=False)
    with pytest.raises(SetupError, match="head federation secret"):
        Federation(plain, "eu", tmp_path, None, None)  # type: ignore[arg-type]
    make_secret(tmp_path / "federation" / "secret")
    with pytest.raises(SetupError, match="head init"):
        Federation(FederationSection(enabled=True), "eu", tmp_path, None, None)  # type: ignore[arg-type]
    with pytest.raises(SetupError, match="cannot be used in a federation"):
        Federation(plain, "Home Region", tmp_path, None, None)  # type: ignore[arg-type]
    (tmp_path / "federation" / "secret").chmod(0o644)
    with pytest.raises(SetupError, match="chmod 600"):
        Federation(plain, "eu", tmp_path, None, None)  # type: ignore[arg-type]
