"""Benchmark: time from agent start to "node alive at the Ray head", against a bare
`ray start --address` of the same node over the same overlay; agent RSS and idle CPU.

Run as root on the testbed:  .venv/bin/python bench/join_time.py [--rounds 3]
Prints figures; asserts nothing. Goals (issue #2): ratio <= 1.3, agent RSS <= 60 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: testing/ is not installed

from testing.nvml_double import RTX_4090  # noqa: E402
from testing.region import PYTHON, Testbed, wait_for  # noqa: E402

# Runs in the head's namespace: polls the GCS every 100 ms and prints a line whenever a new
# Ray node comes alive, with the wall-clock time it was first seen.
WATCH = textwrap.dedent("""
    import json, sys, time
    from ray._raylet import GcsClient
    c = GcsClient(address="100.96.0.1:6379")
    seen = set()
    while True:
        try:
            infos = c.get_all_node_info(timeout=5).values()
        except Exception:
            time.sleep(0.1); continue
        for i in infos:
            nid = i.node_id.hex()
            if i.state == 0 and not i.is_head_node and nid not in seen:
                seen.add(nid)
                print(json.dumps({"t": time.time(), "ray_node_id": nid, "ip": i.node_manager_address}), flush=True)
        time.sleep(0.1)
""")

# Runs in the node's namespace: the same WireGuard setup the agent does, from the agent's own
# identity, then a bare `ray start --block` with the same arguments the agent would use.
BARE = textwrap.dedent("""
    import json, os, signal, subprocess, sys, time
    from pathlib import Path
    from garage_node.node.identity import load
    from garage_node.node.paths import StatePaths
    from garage_node.core.wireguard import Interface, Peer
    ident = load(StatePaths(Path(sys.argv[1])))
    argv = json.loads(sys.argv[2])
    iface = Interface("garage0")
    iface.up(ident.wg_private_key, f"{ident.overlay_ip}/{ident.prefix_len}")
    iface.set_peer(Peer(ident.hub_public_key, (f"{ident.hub_ip}/{ident.prefix_len}",), ident.hub_endpoint, 25))
    # As the agent runs it: as the Ray worker's account, with the cluster token's file.
    token = sys.argv[3]
    owner = os.stat(token)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token, "HOME": "/tmp"}
    t0 = time.time()
    proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, user=owner.st_uid, group=owner.st_gid)
    # Blocked only now, or Ray would inherit the mask and ignore SIGTERM; sigwait needs it blocked.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    print(json.dumps({"t_start": t0}), flush=True)
    signal.sigwait({signal.SIGTERM})
    os.killpg(proc.pid, signal.SIGTERM); proc.wait()
    iface.down()
""")


def new_alive_after(watch_log: Path, t0: float, ip: str, timeout: float = 180) -> float:
    found: list[float] = []

    def check() -> bool:
        for line in watch_log.read_text().splitlines():
            ev = json.loads(line)
            if ev["ip"] == ip and ev["t"] >= t0:
                found.append(ev["t"])
                return True
        return False
    wait_for(check, timeout, f"a new Ray node at {ip}", interval=0.1)
    return found[0]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle-seconds", type=float, default=30)
    args = ap.parse_args()

    with Testbed() as tb:
        head = tb.start_head()
        wait_for(lambda: head.run([PYTHON, "-m", "garage_node.head.rayprobe", "100.96.0.1:6379"], check=False).returncode == 0,
                 120, "the Ray head")
        watch = head.spawn([PYTHON, "-c", WATCH], "watch.log")
        watch_log = head.dir / "watch.log"
        node = tb.add_node("n1", [RTX_4090])
        node.configure(head.token("--uses", "1"))

        t0 = time.time()
        node.start()
        first = new_alive_after(watch_log, t0, "100.96.0.2") - t0
        node.wait_state("joined", 60)
        print(f"first join (enroll + overlay + Ray): {first:.2f} s", flush=True)

        pid = node.proc.pid
        time.sleep(5)
        rss = rss_mb(pid)
        c0, w0 = cpu_seconds(pid), time.monotonic()
        time.sleep(args.idle_seconds)
        idle_cpu = (cpu_seconds(pid) - c0) / (time.monotonic() - w0) * 100
        # The exact command line the agent gave its Ray worker, for the bare run.
        ray_pid = node.status()["ray"]["pid"]
        argv = [a for a in Path(f"/proc/{ray_pid}/cmdline").read_text().split("\0") if a]
        environ = dict(kv.split("=", 1) for kv in Path(f"/proc/{ray_pid}/environ").read_text().split("\0") if "=" in kv)
        token_path = environ["RAY_AUTH_TOKEN_PATH"]
        # The agent runs Ray's CLI through garage_node.node.raystart; the baseline is Ray's own `ray`.
        if argv[1:3] == ["-m", "garage_node.node.raystart"]:
            argv = [str(Path(argv[0]).with_name("ray")), *argv[3:]]

        agent_times, bare_times = [], []
        for i in range(args.rounds):
            node.stop()
            time.sleep(2)
            t0 = time.time()
            node.start()
            agent_times.append(new_alive_after(watch_log, t0, "100.96.0.2") - t0)
            node.wait_state("joined", 60)
            node.stop()
            time.sleep(2)
            bare = node.spawn([PYTHON, "-c", BARE, str(node.state_dir), json.dumps(argv), token_path], "bare.log")
            starts: list[float] = []

            def bare_started() -> bool:
                starts[:] = [json.loads(ln)["t_start"] for ln in (node.dir / "bare.log").read_text().splitlines() if "t_start" in ln]
                return len(starts) == i + 1  # bare.log keeps earlier rounds' lines
            wait_for(bare_started, 30, "bare setup")
            tb_start = starts[-1]
            bare_times.append(new_alive_after(watch_log, tb_start, "100.96.0.2") - tb_start)
            bare.terminate()
            bare.wait(30)
            print(f"round {i + 1}: agent {agent_times[-1]:.2f} s, bare ray start {bare_times[-1]:.2f} s", flush=True)
        watch.terminate()

    a, b = statistics.median(agent_times), statistics.median(bare_times)
    print("\n== garage-node join benchmark (testbed, wireguard-go, Ray 2.60) ==")
    print(f"agent start -> alive at Ray head (rejoin, median of {args.rounds}): {a:.2f} s")
    print(f"bare `ray start --address` -> alive (same overlay, same args):   {b:.2f} s")
    print(f"ratio agent / bare: {a / b:.2f}   (goal <= 1.3)")
    print(f"first join incl. enrollment: {first:.2f} s")
    print(f"agent RSS (Python process only, Ray excluded): {rss:.1f} MB   (goal <= 60 MB)")
    print(f"agent idle CPU over {args.idle_seconds:.0f} s: {idle_cpu:.2f} % of one core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
