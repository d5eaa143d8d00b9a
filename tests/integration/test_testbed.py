"""A head and nodes in network namespaces, with real wireguard-go, Ray, head and agents.

The tests share one region (module fixture) and run in file order: joining first, then the
restarts, then revocation. Bad-input cases each get a fresh node host of their own.
"""

from __future__ import annotations

import json
import signal
import subprocess
import textwrap
import time

import pytest

from testing.nvml_double import RTX_3060_12GB, RTX_4060, RTX_4060_TI_16GB, RTX_4090
from testing.region import PYTHON, Testbed, missing_prerequisite, wait_for
from garage_node.core.token import JoinToken, parse

pytestmark = [pytest.mark.testbed, pytest.mark.skipif(bool(missing_prerequisite()), reason=str(missing_prerequisite()))]

BROKEN_4060_TI = RTX_4060_TI_16GB.__class__(**{**RTX_4060_TI_16GB.__dict__, "fail": True})


@pytest.fixture(scope="module")
def region(testbed: Testbed) -> Testbed:
    tb = testbed
    head = tb.start_head()
    token = head.token("--uses", "1")
    n1 = tb.add_node("n1", [RTX_4090, RTX_4060])
    n1.configure(token)
    n2 = tb.add_node("n2", [RTX_3060_12GB, BROKEN_4060_TI])
    n2.configure(head.token("--uses", "1"))
    n1.start()
    n2.start()
    tb.spent_token = token  # single-use, consumed by n1
    return tb


def joined(node, timeout=120):
    return node.wait_state("joined", timeout)


def nodes_by_name(head):
    return {n["name"]: n for n in head.nodes()}


def assert_nothing_written(node, head, peers_before):
    assert not (node.state_dir / "identity.json").exists()
    assert not (node.state_dir / "head-ca.pem").exists()
    assert "garage0" not in node.run(["ip", "-o", "link"]).stdout
    assert sorted(head.hub_peers()) == sorted(peers_before)


# ---------------------------------------------------------------- joining


def test_two_nodes_join_and_ray_lists_them(region):
    head = region.head
    s1, s2 = joined(region.hosts[1]), joined(region.hosts[2])
    assert s1["node_id"] != s2["node_id"]
    assert s1["overlay"]["address"] != s2["overlay"]["address"]
    assert s1["overlay"]["handshake_age_s"] is not None

    listed = nodes_by_name(head)
    assert listed["n1"]["status"] == "online" and listed["n1"]["ray_alive"]
    assert listed["n2"]["status"] == "online" and listed["n2"]["ray_alive"]

    ray = {n["labels"].get("garage.node_id"): n for n in head.ray_nodes() if n["alive"] and not n["is_head"]}
    r1, r2 = ray[s1["node_id"]], ray[s2["node_id"]]
    assert r1["resources"]["vram_mib"] == 24564 + 8188
    assert r1["resources"]["GPU"] == 2
    assert r1["labels"]["garage.gpu"] == "NVIDIA-GeForce-RTX-4090"
    assert r1["labels"]["garage.region"] == "testbed"
    assert r1["address"] == s1["overlay"]["address"]
    # n2's second GPU fails in NVML: quarantined, not offered to Ray.
    assert r2["resources"]["GPU"] == 1
    assert r2["resources"]["vram_mib"] == 12288


def test_failing_gpu_is_reported_not_fatal(region):
    s2 = region.hosts[2].status()
    good, bad = s2["gpus"]
    assert good["healthy"] and good["name"] == "NVIDIA GeForce RTX 3060"
    assert not bad["healthy"] and "GPU is lost" in bad["error"]
    assert s2["ray"]["resources"] == {"GPU": 1, "vram_mib": 12288}
    text = region.hosts[2].run(region.hosts[2].cmd("status")).stdout
    assert "UNHEALTHY" in text and "joined" in text


def test_ray_task_asking_for_vram_runs_on_a_node(region):
    head, n1 = region.head, region.hosts[1]
    driver = textwrap.dedent("""
        import json, ray
        ray.init(address="100.96.0.1:6379", _node_ip_address="100.96.0.1", log_to_driver=False)
        @ray.remote(num_cpus=0, resources={"vram_mib": 20000})
        def where():
            return ray.get_runtime_context().get_node_id()
        node = ray.get(where.remote(), timeout=120)
        labels = {n["NodeID"]: n.get("Labels", {}) for n in ray.nodes()}
        print(json.dumps(labels[node]))
    """)
    out = head.run([PYTHON, "-c", driver], timeout=180).stdout.strip().splitlines()[-1]
    # Only n1 (4090 + 4060 = 32 GB) has 20000 MiB of VRAM to give.
    assert json.loads(out)["garage.node_id"] == n1.status()["node_id"]


def test_node_reaches_node_over_the_overlay(region):
    n1, n2 = region.hosts[1], region.hosts[2]
    target = n2.status()["overlay"]["address"]
    res = n1.run(["ping", "-c", "2", "-W", "3", target], check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_status_json_has_stable_keys(region):
    s = region.hosts[1].status()
    for key in ("state", "node_id", "gpus", "overlay", "ray", "head", "engine", "last_error", "message"):
        assert key in s
    assert s["head"]["reachable"] is True
    assert s["ray"]["state"] == "alive"
    assert s["last_error"] is None


# ---------------------------------------------------------------- restarts


def test_agent_restart_rejoins_with_same_identity(region):
    n1, head = region.hosts[1], region.head
    before = n1.status()
    assert n1.stop(signal.SIGTERM) == 0  # a clean exit on SIGTERM
    # Stopped cleanly: the overlay interface and the Ray worker are gone, the identity stays.
    assert "garage0" not in n1.run(["ip", "-o", "link"]).stdout
    assert (n1.state_dir / "identity.json").exists()
    down = n1.status()
    assert down["state"] == "agent-down" and down["node_id"] == before["node_id"]
    assert len(down["gpus"]) == 2  # still read locally
    assert parse(region.spent_token)  # the token n1 used is single-use and spent

    n1.start()
    after = joined(n1)
    assert after["node_id"] == before["node_id"]
    assert after["overlay"]["address"] == before["overlay"]["address"]
    assert len(head.nodes()) == 2


def test_head_restart_nodes_come_back_by_themselves(region):
    head, n1, n2 = region.head, region.hosts[1], region.hosts[2]
    ids = {n1.status()["node_id"], n2.status()["node_id"]}
    assert head.stop(signal.SIGTERM) == 0
    restarted = time.time()
    head.start()
    # Never a value older than the Ray head it came from: right after the restart no node may
    # show alive on the old Ray head's word.
    stale = [r for r in head.nodes() if r["ray_alive"] and (r["ray_checked_at"] or 0) < restarted]
    assert not stale, stale

    def both_alive():
        rows = head.nodes()
        return all(r["ray_alive"] for r in rows if r["node_id"] in ids)
    wait_for(both_alive, 240, "both nodes alive in the restarted Ray head", interval=2)
    joined(n1, 60)
    joined(n2, 60)


def test_blocked_wireguard_udp_gives_an_honest_status(region):
    # Only WireGuard's UDP is blocked (HTTPS to the head still works): the PC must not keep
    # saying "joined", and the head must hear that it is degraded.
    head, n2 = region.head, region.hosts[2]
    table = "gnt-block-wg"
    script = f"table inet {table} {{\n chain out {{\n  type filter hook output priority 0;\n  udp dport 51820 drop\n }}\n}}\n"
    subprocess.run(n2.wrap(["nft", "-f", "-"]), input=script, text=True, check=True)
    try:
        t0 = time.monotonic()
        s = n2.wait_state("degraded", 60, predicate=lambda s: "overlay down" in s["message"])
        took = time.monotonic() - t0
        assert "UDP to" in s["last_error"]["hint"], s["last_error"]
        wait_for(lambda: nodes_by_name(head)["n2"]["node_state"] == "degraded", 30, "the head to see n2 degraded")
        print(f"UDP blocked -> status 'degraded: overlay down' after {took:.1f} s")
    finally:
        subprocess.run(n2.wrap(["nft", "delete", "table", "inet", table]), check=False)
    joined(n2, 120)


# ---------------------------------------------------------------- revoke


def test_revoke_removes_peer_refuses_heartbeats(region):
    head, n2 = region.head, region.hosts[2]
    s2 = n2.status()
    key_count = len(head.hub_peers())
    head.revoke(s2["node_id"])
    wait_for(lambda: len(head.hub_peers()) == key_count - 1, 15, "the hub to drop n2's peer")
    st = n2.wait_state("revoked", 30)
    assert "revoked" in st["last_error"]["message"]
    assert "new join token" in st["last_error"]["hint"]
    assert st["ray"]["state"] in ("stopped", "backoff") and st["ray"]["pid"] is None
    assert nodes_by_name(head)["n2"]["status"] == "revoked"


# ---------------------------------------------------------------- bad input


def _fresh_node(region, name, token):
    node = region.add_node(name, [RTX_4060])
    node.configure(token)
    return node


def test_malformed_token_is_refused_and_nothing_written(region):
    head = region.head
    peers = head.hub_peers()
    node = _fresh_node(region, "bad1", "gn1.this-is-not-base64-json!!")
    node.start()
    st = node.wait_state("error", 30)
    assert "unusable" in st["last_error"]["message"] and "damaged" in st["last_error"]["message"]
    assert_nothing_written(node, head, peers)
    node.stop()


def test_expired_token(region):
    head = region.head
    tok = head.token("--ttl", "1s")
    time.sleep(1.5)
    peers = head.hub_peers()
    node = _fresh_node(region, "bad2", tok)
    node.start()
    st = node.wait_state("error", 30)
    assert "expired" in st["last_error"]["message"]
    assert parse(tok).secret not in json.dumps(st)
    assert_nothing_written(node, head, peers)
    node.stop()


def test_reused_single_use_token(region):
    head = region.head
    peers = head.hub_peers()
    node = _fresh_node(region, "bad3", region.spent_token)
    node.start()
    st = node.wait_state("error", 30)
    assert "already used" in st["last_error"]["message"]
    assert_nothing_written(node, head, peers)
    node.stop()


def test_head_certificate_not_matching_pin(region):
    head = region.head
    good = parse(head.token())
    forged = JoinToken(good.api_url, "sha256:" + "0" * 64, good.token_id, good.secret).encode()
    peers = head.hub_peers()
    before = {r["node_id"] for r in head.nodes()}
    node = _fresh_node(region, "bad4", forged)
    node.start()
    st = node.wait_state("error", 30)
    assert "does not match the token's pin" in st["last_error"]["message"]
    assert_nothing_written(node, head, peers)
    assert {r["node_id"] for r in head.nodes()} == before  # the secret never reached the head
    node.stop()


def test_unreachable_head_keeps_retrying(region):
    head = region.head
    good = parse(head.token())
    nowhere = JoinToken(good.api_url.replace(".1:8443", ".99:8443"), good.ca_pin, good.token_id, good.secret).encode()
    peers = head.hub_peers()
    node = _fresh_node(region, "bad5", nowhere)
    node.start()
    st = node.wait_state("enrolling", 30, predicate=lambda s: bool(s["last_error"]))
    assert "unreachable" in st["last_error"]["message"]
    assert st["last_error"]["retry_in_s"] is not None
    time.sleep(3)
    again = node.status()
    assert again["state"] == "enrolling" and node.proc.poll() is None  # still running, still trying
    assert_nothing_written(node, head, peers)
    node.stop()


def test_invalid_config_names_file_and_key(region):
    node = _fresh_node(region, "bad6", "")
    node.override.write_text('[node]\nname = "x"\njoin_tokn = "gn1.abc"\n')
    res = node.run(node.cmd("run"), check=False, timeout=30)
    assert res.returncode == 78
    assert str(node.override) in res.stderr and "join_tokn" in res.stderr
    assert "gn1.abc" not in res.stderr
    assert not (node.state_dir / "identity.json").exists()


def test_join_cli_rejects_bad_token_without_echoing_it(region):
    node = _fresh_node(region, "bad7", "")
    secretish = "gn1." + "A" * 40
    res = node.run(node.cmd("join", secretish), check=False)
    assert res.returncode == 2
    assert "damaged" in res.stderr and secretish not in res.stderr
    assert not (node.state_dir / "join-token").exists()
