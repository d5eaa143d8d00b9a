"""Benchmark: how fast a region heals. A real head (Ray head with its Redis, wireguard-go hub) and
three PCs with real agents and Ray workers, in the testbed, at the production heartbeat
settings (5 s, offline after 15 s):

1. the head killed with SIGKILL and started again on the same state: seconds from the new
   head's API answering until the head's Ray lists every PC alive, whether with the same Ray
   node ids (raylets kept) and whether their workers were restarted; then until a Ray task has
   run on every PC (a driver started after the restart; its own start-up time on a healthy
   cluster is printed beside it);
2. a PC's link cut (its bridge port down: HTTPS and WireGuard alike): seconds until the head
   calls it offline, and until Ray calls it dead; cuts of several lengths (--cuts), one shorter
   than Ray's detection among them;
3. that link healed: seconds until Ray lists it alive again, whether with the same node id,
   whether the worker was restarted, and what the PC's status said meanwhile;
4. only WireGuard's UDP blocked on another PC (HTTPS still fine): seconds until its status
   leaves `joined`; unblocked: seconds until it is `joined` and alive in Ray again.

Run as root:  .venv/bin/python bench/recovery.py [--cuts 0,-6,20,60,300] [--no-head-kill] [--no-udp-block]
Prints figures; asserts nothing.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: testing/ is not installed

from testing.region import PYTHON, Testbed, sh  # noqa: E402

OFFLINE_AFTER_S = 15.0

# In the head's namespace: every 0.2 s, the PCs the GCS holds alive ({ray node id: garage node
# id}); a new GCS client whenever the GCS went away (the head's restart).
WATCH = textwrap.dedent("""
    import json, time
    from ray._raylet import GcsClient
    client = None
    while True:
        try:
            if client is None:
                client = GcsClient(address="100.96.0.1:6379")
            infos = client.get_all_node_info(timeout=2).values()
            alive = {i.node_id.hex(): i.labels.get("garage.node_id", "") for i in infos if i.state == 0 and not i.is_head_node}
            print(json.dumps({"t": time.time(), "alive": alive}), flush=True)
        except Exception as e:
            client = None
            print(json.dumps({"t": time.time(), "error": str(e)[:100]}), flush=True)
        time.sleep(0.2)
""")

# In the head's namespace: one Ray task on each PC, pinned by node id; prints the time it took
# from this process's start (import of Ray and connection included).
TASKS = textwrap.dedent("""
    import json, sys, time
    t0 = time.time()
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    ids = json.loads(sys.argv[1])
    while True:
        try:
            ray.init(address="100.96.0.1:6379", logging_level="ERROR", log_to_driver=False)
            break
        except Exception:
            time.sleep(0.2)
    @ray.remote(num_cpus=0)
    def where():
        return ray.get_runtime_context().get_node_id()
    got = ray.get([where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(i, soft=False)).remote() for i in ids],
                  timeout=300)
    print(json.dumps({"t0": t0, "t": time.time(), "ran_on": got}), flush=True)
""")


class Watch:
    def __init__(self, head) -> None:
        (head.dir / "watch.py").write_text(WATCH)
        self.proc = subprocess.Popen(head.wrap([PYTHON, str(head.dir / "watch.py")]), stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env={**head.env_all()}, start_new_session=True)
        self.last: dict = {}
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if "alive" in d:
                with self.lock:
                    self.last = d

    def alive(self) -> dict[str, str]:
        """{garage node id: ray node id} of the PCs alive in Ray, as last seen."""
        with self.lock:
            return {v: k for k, v in self.last.get("alive", {}).items()}

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def until(check, timeout: float, interval: float = 0.1) -> float | None:
    """Seconds until check() is true; None if it never was within timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check():
            return round(time.monotonic() - t0, 1)
        time.sleep(interval)
    return None


def last_seen(head, node_id: str) -> float | None:
    with sqlite3.connect(head.dir / "state" / "registry.sqlite") as db:
        row = db.execute("SELECT last_seen FROM nodes WHERE id=?", (node_id,)).fetchone()
    return row[0] if row else None


def run_tasks(head, ray_ids: list[str]) -> dict:
    (head.dir / "tasks.py").write_text(TASKS)
    out = head.run([PYTHON, str(head.dir / "tasks.py"), json.dumps(ray_ids)], timeout=400).stdout
    return json.loads(out.strip().splitlines()[-1])


def password_files(head) -> list[str]:
    """Which files under the head's directory hold the Redis password (names only), besides
    its own 0600 files: where Ray copies it."""
    password = (head.dir / "state" / "redis" / "password").read_bytes().strip()
    found = []
    for path in head.dir.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 100_000_000 and password in path.read_bytes():
                found.append(str(path.relative_to(head.dir)))
        except OSError:
            pass
    return sorted(found)


def cut_and_heal(tb, head, watch: Watch, pc, nid: str, cut_s: float) -> dict:
    """Cut `pc`'s link (its bridge port down: HTTPS and WireGuard alike) for `cut_s` seconds, or
    until Ray calls it dead if that comes later (0: heal as soon as Ray calls it dead; a cut
    shorter than Ray's detection when `cut_s` is negative, for -cut_s seconds). Then heal it and
    time the way back, with what the PC's status said while it waited."""
    ray_before = watch.alive().get(nid)
    st = pc.status()
    worker_before = (st["ray"]["pid"], st["ray"]["restarts"])
    port = f"p-{pc.name}"[:15]
    seen = last_seen(head, nid) or time.time()
    sh(["ip", "-n", tb.switch, "link", "set", port, "down"])
    t_cut = time.time()
    out: dict = {"cut_s": None, "last_heartbeat_before_cut_s": round(t_cut - seen, 1)}
    if cut_s < 0:
        time.sleep(-cut_s)
        out["dead_in_ray_s"] = None if nid in watch.alive() else "dead"
    else:
        offline = until(lambda: time.time() - (last_seen(head, nid) or 0) > OFFLINE_AFTER_S, 120)
        # Offline at the head is decided at read time from last_seen; count from the cut.
        dead = until(lambda: nid not in watch.alive(), 120 - (time.time() - t_cut))
        out.update(offline_at_head_s=offline,
                   dead_in_ray_s=round(time.time() - t_cut, 1) if dead is not None else None)
        time.sleep(max(0.0, cut_s - (time.time() - t_cut)))
    out["cut_s"] = round(time.time() - t_cut, 1)
    sh(["ip", "-n", tb.switch, "link", "set", port, "up"])
    t_heal = time.time()
    said: list[str] = []

    def back_in_ray() -> bool:
        try:
            msg = pc.status()["message"]
            if not said or said[-1] != msg:
                said.append(msg)
        except Exception:
            pass
        return nid in watch.alive()

    back = until(back_in_ray, 180, interval=0.5)
    joined = until(lambda: pc.status()["state"] == "joined", 120, interval=0.5)
    st = pc.status()
    out["heal"] = {"alive_in_ray_s": back, "same_ray_node_id": watch.alive().get(nid) == ray_before,
                   "worker_restarted": (st["ray"]["pid"], st["ray"]["restarts"]) != worker_before,
                   "status_joined_s": round(time.time() - t_heal, 1) if joined is not None else None,
                   "status_said_meanwhile": said}
    return out


def head_kill(head, pcs, ids, watch: Watch, before: dict, workers: dict, results: dict) -> None:
    head.stop(signal.SIGKILL)
    t_kill = time.time()
    head.start()
    up = time.time()
    took = until(lambda: set(ids.values()) <= set(watch.alive()) and watch.last.get("t", 0) > up, 180)
    after = watch.alive()
    tasks = run_tasks(head, [after.get(i, before[i]) for i in ids.values()])
    results["head_kill"] = {
        "restart_to_api_s": round(up - t_kill, 1),
        "api_to_all_alive_in_ray_s": took,
        "same_ray_node_ids": all(after.get(i) == before[i] for i in ids.values()),
        "workers_restarted": [pc.name for pc in pcs
                              if (pc.status()["ray"]["pid"], pc.status()["ray"]["restarts"]) != workers[pc.name]],
        "api_to_task_ran_on_every_pc_s": round(tasks["t"] - up, 1),
    }
    print(json.dumps(results, indent=2), flush=True)
    for pc in pcs:
        pc.wait_state("joined", 120)


def udp_block(pc2, ids: dict, watch: Watch, results: dict) -> None:
    """Only WireGuard's UDP blocked on `pc2` (HTTPS still fine), then unblocked."""
    nid2 = ids[pc2.name]
    pc2.wait_state("joined", 120)
    table = "gnt-bench-block"
    rules = f"table inet {table} {{\n chain out {{\n  type filter hook output priority 0;\n  udp dport 51820 drop\n }}\n}}\n"
    subprocess.run(pc2.wrap(["nft", "-f", "-"]), input=rules, text=True, check=True)
    t_block = time.time()
    try:
        left = until(lambda: pc2.status()["state"] != "joined", 120, interval=0.3)
        state = pc2.status()
        dead2 = until(lambda: nid2 not in watch.alive(), 60)
        results["udp_block"] = {"status_left_joined_s": left, "now": f"{state['state']}: {state['message']}",
                                "dead_in_ray_s": round(time.time() - t_block, 1) if dead2 is not None else None}
    finally:
        subprocess.run(pc2.wrap(["nft", "delete", "table", "inet", table]), check=False)
    t_unblock = time.time()
    back2 = until(lambda: nid2 in watch.alive(), 180)
    joined2 = until(lambda: pc2.status()["state"] == "joined", 120, interval=0.5)
    results["udp_unblock"] = {"alive_in_ray_s": back2,
                              "status_joined_s": round(time.time() - t_unblock, 1) if joined2 is not None else None}


def parse_args(argv: list[str]):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cuts", default="0,-6",
                   help="link cuts to time, in seconds, comma-separated: 0 heals as soon as Ray calls the PC "
                        "dead, N > 0 cuts for N s (at least until Ray calls it dead), -N cuts for N s, shorter "
                        "than Ray's detection (default: 0,-6; the issue's set is 0,-6,20,60,300)")
    p.add_argument("--no-head-kill", action="store_true", help="skip the head's SIGKILL and restart")
    p.add_argument("--no-udp-block", action="store_true", help="skip the WireGuard-only block")
    return p.parse_args(argv)


def main() -> int:
    args = parse_args(sys.argv[1:])
    cuts = [float(c) for c in args.cuts.split(",") if c.strip()]
    results: dict = {}
    with Testbed() as tb:
        head = tb.add_head()
        text = head.config.read_text().replace("heartbeat_s = 2.0", "heartbeat_s = 5.0")
        text = text.replace("offline_after_s = 15.0", f"offline_after_s = {OFFLINE_AFTER_S}")
        text += "\n[gateway]\nenabled = false\n"  # not what this measures: one listener less on 2 cores
        head.config.write_text(text)
        head.init()
        head.start()
        head.env_all = lambda: {**__import__("os").environ, **head.env}  # type: ignore[attr-defined]
        pcs = []
        for name in ("pc1", "pc2", "pc3"):
            pc = tb.add_node(name, [])
            pc.configure(head.token("--uses", "1"))
            pc.start()
            pcs.append(pc)
        for pc in pcs:
            pc.wait_state("joined", 180)
        ids = {pc.name: pc.status()["node_id"] for pc in pcs}
        watch = Watch(head)
        if until(lambda: set(ids.values()) <= set(watch.alive()), 60) is None:
            raise SystemExit("the PCs never showed alive in the watch")
        before = watch.alive()
        workers = {pc.name: (pc.status()["ray"]["pid"], pc.status()["ray"]["restarts"]) for pc in pcs}
        baseline = run_tasks(head, [before[i] for i in ids.values()])
        results["driver_on_a_healthy_cluster_s"] = round(baseline["t"] - baseline["t0"], 1)

        # 1. head SIGKILL + restart
        if not args.no_head_kill:
            head_kill(head, pcs, ids, watch, before, workers, results)

        # 2-3. a PC's link cut, and healed: once as soon as Ray declares it dead, then for each
        # --cuts length (longer than Ray's detection: Ray never takes the node back), and once
        # shorter than Ray's detection (no restart expected).
        pc3 = pcs[2]
        for cut_s in cuts:
            pc3.wait_state("joined", 180)
            until(lambda: ids[pc3.name] in watch.alive(), 60)
            results[f"link_cut_{cut_s:g}s" if cut_s else "link_cut"] = cut_and_heal(tb, head, watch, pc3, ids[pc3.name], cut_s)
            print(json.dumps(results, indent=2), flush=True)

        # 4. only WireGuard's UDP blocked
        if not args.no_udp_block:
            udp_block(pcs[1], ids, watch, results)
        watch.stop()
        results["files_holding_the_redis_password"] = password_files(head)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
