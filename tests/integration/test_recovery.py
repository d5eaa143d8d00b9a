"""The head heals (#10), on real parts: a head with its Ray head, its Redis (Ray's GCS store)
and its wireguard-go hub, and two PCs with real agents and Ray workers, each in a namespace.

- A head killed with SIGKILL and started again on the same state keeps the Ray cluster: the
  PCs' raylets reconnect to the new GCS with the node ids they had (Ray's GCS fault tolerance,
  head/gcs.py), their Ray workers are never restarted, and the Redis password is in no log
  of ours nor on the PCs.
- A PC cut off longer than Ray's health checks allow is declared dead by Ray, which never takes
  a dead node back: once the link heals the head says so in its heartbeat answer and the agent
  restarts the worker at once, which rejoins as a new Ray node (#24); when the raylet hears
  it from Ray first and ends itself, the agent starts it again just as well.
- Heartbeats acknowledged from memory are on disk after a clean stop of the head (the last
  batch is written on the way down, head/registry.py).

Not timed: how fast is bench/recovery.py's business.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import textwrap
import time

import pytest

from testing.region import PYTHON, Testbed, missing_prerequisite, sh, wait_for
from garage_node.head.gcs import open_store

pytestmark = [pytest.mark.testbed, pytest.mark.skipif(bool(missing_prerequisite()), reason=str(missing_prerequisite()))]


@pytest.fixture(scope="module")
def region(testbed: Testbed) -> Testbed:
    tb = testbed
    head = tb.add_head()
    with head.config.open("a") as f:  # the gateway is not what this file is about: one listener less
        f.write("\n[gateway]\nenabled = false\n")
    head.init()
    head.start()
    for name in ("r1", "r2"):
        node = tb.add_node(name, [])
        node.configure(head.token("--uses", "1"))
        node.start()
    for node in tb.hosts[1:]:
        node.wait_state("joined", 180)
    return tb


def ray_workers(head) -> dict[str, dict]:
    """The PCs the head's Ray holds alive, by garage node id."""
    return {n["labels"].get("garage.node_id"): n for n in head.ray_nodes() if n["alive"] and not n["is_head"]}


def test_the_head_runs_its_gcs_on_its_own_redis(region):
    head = region.head
    store = open_store(head.dir / "state" / "redis", 6390)
    assert store is not None
    assert (store.paths.password.stat().st_mode & 0o777) == 0o600
    assert (store.paths.config.stat().st_mode & 0o777) == 0o600
    # Redis answers on the head's loopback only, and only with the password.
    probe = textwrap.dedent(f"""
        import json, sys
        from garage_node.head.gcs import ping
        pw = open(sys.argv[1]).read().strip()
        print(json.dumps({{"loopback": ping("127.0.0.1", 6390, pw), "wrong": ping("127.0.0.1", 6390, "x" * 64),
                          "overlay": ping("100.96.0.1", 6390, pw), "underlay": ping({head.ip!r}, 6390, pw)}}))
    """)
    (head.dir / "probe.py").write_text(probe)
    got = json.loads(head.run([PYTHON, str(head.dir / "probe.py"), str(store.paths.password)]).stdout)
    assert got == {"loopback": True, "wrong": False, "overlay": False, "underlay": False}


def test_a_head_killed_with_sigkill_keeps_the_pcs_raylets(region):
    head, pcs = region.head, region.hosts[1:]
    ids = {pc.name: pc.status()["node_id"] for pc in pcs}
    before = ray_workers(head)
    assert set(ids.values()) <= set(before), before
    workers = {pc.name: pc.status()["ray"] for pc in pcs}

    assert head.stop(signal.SIGKILL) == -signal.SIGKILL
    head.start()  # ends what the killed head left (Ray head, Redis) by their PID files, then starts anew

    def all_back() -> bool:
        return set(ids.values()) <= set(ray_workers(head))
    wait_for(all_back, 180, "both PCs alive in the restarted head's Ray", interval=1)
    after = ray_workers(head)
    # The same raylets: the same Ray node ids, at the same overlay addresses.
    for node_id in ids.values():
        assert after[node_id]["ray_node_id"] == before[node_id]["ray_node_id"]
        assert after[node_id]["address"] == before[node_id]["address"]
    # And no PC restarted its Ray worker for it.
    for pc in pcs:
        ray = pc.status()["ray"]
        assert (ray["pid"], ray["restarts"]) == (workers[pc.name]["pid"], workers[pc.name]["restarts"]), ray
    for pc in pcs:
        pc.wait_state("joined", 60)


def test_the_redis_password_is_in_no_log_and_no_status(region):
    head, pcs = region.head, region.hosts[1:]
    password = (head.dir / "state" / "redis" / "password").read_text().strip()
    assert len(password) >= 32
    ours = [head.dir / "head.log", *sorted((head.dir / "state" / "logs").glob("*"))]
    for pc in pcs:
        ours += [pc.dir / "agent.log", *sorted((pc.state_dir / "logs").glob("*"))]
    assert ours and all(p.exists() for p in ours[:1])
    for path in ours:
        assert password not in path.read_text(errors="replace"), path
    # The PCs never get it: not in their status, not in anything their Ray wrote.
    for pc in pcs:
        assert password not in json.dumps(pc.status())
        for path in (pc.dir / "ray").rglob("*"):
            if path.is_file() and path.stat().st_size < 50_000_000:
                assert password.encode() not in path.read_bytes(), path
    assert password not in head.cli("head", "nodes", "--json", "--config", str(head.config)).stdout


def test_a_pc_ray_declared_dead_in_a_cut_rejoins_as_a_new_ray_node(region):
    head, pc = region.head, region.hosts[1]
    pc.wait_state("joined", 60)
    node_id = pc.status()["node_id"]
    wait_for(lambda: node_id in ray_workers(head), 60, "the PC alive in Ray", interval=1)
    before = ray_workers(head)[node_id]["ray_node_id"]
    port = f"p-{pc.name}"[:15]
    agent_log = pc.dir / "agent.log"
    cut_at = agent_log.stat().st_size
    sh(["ip", "-n", region.switch, "link", "set", port, "down"])  # HTTPS and WireGuard alike
    try:
        wait_for(lambda: node_id not in ray_workers(head), 90, "Ray declaring the cut PC dead", interval=1)
        # The head's own record too: its membership watch lags Ray by up to a poll, and a
        # heartbeat answered in that lag still says "alive".
        wait_for(lambda: not any(r["node_id"] == node_id and r["ray_alive"] for r in head.nodes()), 30,
                 "the head recording the death", interval=1)
    finally:
        sh(["ip", "-n", region.switch, "link", "set", port, "up"])
    wait_for(lambda: node_id in ray_workers(head), 120, "the PC alive in Ray again", interval=1)
    assert ray_workers(head)[node_id]["ray_node_id"] != before  # a new Ray node: the old one stays dead
    log = agent_log.read_bytes()[cut_at:].decode(errors="replace")
    # Two routes back, both fine: the head's word in the first heartbeat answer (#24), or, when
    # the raylet hears it from Ray's GCS first, the raylet ending itself and the agent starting
    # it again. Either way the agent's log says why the worker restarted.
    by_head = "declared this PC's Ray node dead" in log
    by_raylet = "ray worker exited with code" in log
    assert by_head or by_raylet, log[-3000:]
    pc.wait_state("joined", 60)


HEARTBEAT = """
import json, ssl, sys, httpx
url, node_id, body = sys.argv[2], sys.argv[3], json.loads(open(sys.argv[4]).read())
cred = open(sys.argv[1]).read().strip()
r = httpx.post(f"{url}/v1/nodes/{node_id}/heartbeat", json={"report": body}, verify=False,
               headers={"Authorization": f"Bearer {cred}"}, timeout=20)
print(r.status_code)
"""


def test_heartbeats_held_in_memory_are_written_on_a_clean_stop(region):
    head, pc = region.head, region.hosts[2]
    node_id = pc.status()["node_id"]
    pc.stop()  # its own heartbeats would overwrite ours
    # A batch far longer than this test: only the write on the way down can save the heartbeat.
    assert head.stop(signal.SIGTERM) == 0
    head.config.write_text(head.config.read_text().replace("[options]\n", "[options]\nheartbeat_batch_s = 600.0\n"))
    head.start()
    registry = head.dir / "state" / "registry.sqlite"
    with sqlite3.connect(registry) as db:
        report = json.loads(db.execute("SELECT report FROM nodes WHERE id=?", (node_id,)).fetchone()[0])
    marker = f"last words {time.time():.3f}"
    report["message"] = marker
    body, secret = pc.dir / "report.json", pc.dir / "hb.secret"
    body.write_text(json.dumps(report))
    secret.write_text(json.loads((pc.state_dir / "identity.json").read_text())["credential"])
    secret.chmod(0o600)
    (pc.dir / "hb.py").write_text(HEARTBEAT)
    # Acknowledged from memory, and not written before the head is told to stop.
    out = pc.run([PYTHON, str(pc.dir / "hb.py"), str(secret), f"https://{head.ip}:8443", node_id, str(body)])
    assert out.stdout.strip() == "200"
    with sqlite3.connect(registry) as db:
        held = json.loads(db.execute("SELECT report FROM nodes WHERE id=?", (node_id,)).fetchone()[0])
    assert held["message"] != marker  # held in memory, not yet in the file
    assert head.stop(signal.SIGTERM) == 0
    with sqlite3.connect(registry) as db:
        stored = json.loads(db.execute("SELECT report FROM nodes WHERE id=?", (node_id,)).fetchone()[0])
    assert stored["message"] == marker
