"""The head's Ray probe reads a real Ray head's cluster id (#10, the fallback to GCS fault
tolerance), and a Ray head that comes back without its GCS state is a new cluster with a new id.

A real `ray start --head` (the head's own command line, without Redis) in a network namespace
of its own with loopback alone, so nothing else on this machine sees its ports. The probe's
watch (what the head runs) reports the cluster id with the nodes; after the Ray head is killed
and started again, the same watch never reports the new cluster's nodes under the old id (the
GCS refuses a client of another cluster): it fails until it gives up, and the next watch
reports the new id. About 30 s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from testing.region import PYTHON, missing_prerequisite

pytestmark = [pytest.mark.testbed, pytest.mark.skipif(bool(missing_prerequisite()), reason=str(missing_prerequisite()))]

# Runs inside the namespace; prints one JSON line per finding.
DRIVER = textwrap.dedent("""
    import json, os, signal, subprocess, sys, time
    from pathlib import Path
    from garage_node.core.raycmd import RAY_PORTS, ray_env, ray_executable
    from garage_node.head.ray import HEALTH_CHECK_ENV, head_argv, parse_watch_line, watch_command
    from ray._raylet import GcsClient

    temp = Path(sys.argv[1])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    address = f"127.0.0.1:{RAY_PORTS.gcs}"
    env = {**ray_env(), **HEALTH_CHECK_ENV}
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_REDIS_ADDRESS"):
        env.pop(k, None)
    procs = []

    def say(**kw):
        print(json.dumps(kw), flush=True)

    def start_head():
        (temp / "ray_current_cluster").unlink(missing_ok=True)
        argv = head_argv(ray_executable(""), "127.0.0.1", RAY_PORTS, temp, "test", num_cpus=1)
        p = subprocess.Popen(argv, stdout=open(temp / "head.log", "ab"), stderr=subprocess.STDOUT,
                             start_new_session=True, env=env)
        procs.append(p)
        return p

    def watch():
        w = subprocess.Popen(watch_command(address, 0.5), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, start_new_session=True, env=env)
        procs.append(w)
        return w

    def first_answer(w):
        for line in w.stdout:
            seen = parse_watch_line(line)
            if seen is not None and any(n.is_head and n.alive for n in seen.nodes):
                return seen
        raise SystemExit("the watch ended without an answer")

    def fresh_client():
        deadline = time.monotonic() + 90
        while True:
            try:
                client = GcsClient(address=address)
                client.get_all_node_info(timeout=2)
                return client
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    try:
        head = start_head()
        w = watch()
        first = first_answer(w)
        say(event="first", cluster_id=first.cluster_id, head_nodes=sum(n.is_head for n in first.nodes))
        old = fresh_client()  # a client of the first cluster, as the watch's is
        os.killpg(head.pid, signal.SIGKILL)  # a crash; nothing kept the GCS state
        head.wait()
        start_head()
        new = fresh_client()
        try:
            old.get_all_node_info(timeout=5)
            refused = ""
        except Exception as e:
            refused = (str(e) or type(e).__name__).splitlines()[0][:200]
        say(event="old_client", refused=refused, cluster_id=old.cluster_id.hex(), new_cluster_id=new.cluster_id.hex())
        after = []
        for line in w.stdout:  # the same watch: until it gives up
            seen = parse_watch_line(line)
            after.append(None if seen is None else seen.cluster_id)
        say(event="old_watch", lines=after, rc=w.wait())
        second = first_answer(watch())
        say(event="second", cluster_id=second.cluster_id)
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
""")


def _end_leftovers(directory: Path) -> None:
    """Processes whose command line names this test's own temp directory (Ray's, if the driver
    was killed before its cleanup), by PID."""
    marker = str(directory).encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) is not installed")
def test_the_probe_reports_the_ray_cluster_id_and_a_restarted_ray_head_is_a_new_cluster():
    temp = Path(tempfile.mkdtemp(prefix="gnrc-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    script = temp / "driver.py"
    script.write_text(DRIVER)
    t0 = time.monotonic()
    try:
        res = subprocess.run(["unshare", "--net", "--kill-child", PYTHON, str(script), str(temp)],
                             capture_output=True, text=True, timeout=150, cwd=Path(__file__).parents[2])
    finally:
        _end_leftovers(temp)
    took = time.monotonic() - t0
    log = (temp / "head.log").read_text(errors="replace")[-3000:] if (temp / "head.log").exists() else ""
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr[-3000:]}\n{log}"
    got = {e["event"]: e for e in map(json.loads, res.stdout.splitlines())}
    first, second = got["first"]["cluster_id"], got["second"]["cluster_id"]
    assert re.fullmatch(r"[0-9a-f]{56}", first) and re.fullmatch(r"[0-9a-f]{56}", second), got
    assert got["first"]["head_nodes"] == 1
    assert second != first  # no GCS state kept: a new cluster
    # A client of the first cluster (the watch's kind) is refused by the new one, and keeps its
    # id: whatever the watch reports, nodes and cluster id come from the same cluster.
    client = got["old_client"]
    assert "WrongClusterID" in client["refused"], client
    assert (client["cluster_id"], client["new_cluster_id"]) == (first, second)
    # The old watch said nothing about the new cluster under the old id, and gave up.
    old = got["old_watch"]
    assert old["rc"] == 1 and old["lines"] and all(c in (None, first) for c in old["lines"]), old
    assert old["lines"][-1] is None
    print(f"took {took:.1f} s")
    shutil.rmtree(temp, ignore_errors=True)
