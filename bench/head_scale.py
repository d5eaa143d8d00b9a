"""Benchmark: how many PCs one head holds. A real head (API over HTTPS, wireguard-go hub with a
peer per PC, Ray head with its Redis) in the testbed; N simulated PCs enroll through the HTTPS
API, each with its own WireGuard key, then heartbeat every `--period` s (±10 %, the agent's own
BeatTimer) for `--duration` s with their own credentials, from a client namespace of their own.

Run as root:  .venv/bin/python bench/head_scale.py [--pcs 1000] [--duration 120] [--period 5]
                  [--gateway] [--pin]

`--pin` puts the head's namespace on the last CPU and the simulated PCs on the others (printed).
The client processes do not collect garbage while they measure: each stands in for hundreds of
agents, and its own full collections (120-145 ms at 1,000 PCs) were counted as the head's.

The PCs are asyncio tasks with httpx in `--procs` client processes (each PC keeps its own
kept-alive connection, as an agent does), spread over source addresses so the head's cap of
32 connections per address is not what is measured. Prints heartbeat latency p50/p99/max,
errors, enrollment time, head CPU (% of one core) and RSS (idle, under load, after), and the
time `head nodes --json` takes. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: testing/ is not installed

from testing.region import PYTHON, Testbed, sh  # noqa: E402

PER_ADDRESS = 25  # simulated PCs per source address (the head allows 32 connections per address)

CLIENT = textwrap.dedent("""
    import asyncio, gc, json, random, ssl, sys, time
    import httpx
    from garage_node.core.wireguard import generate_private_key, public_key_of
    from garage_node.node.headclient import BeatTimer

    cfg = json.loads(open(sys.argv[1]).read())
    url, token_id, period = cfg["url"], cfg["token_id"], cfg["period"]
    secret = open(cfg["secret_file"]).read().strip()
    report = cfg["report"]
    ctx = ssl.create_default_context(cadata=open(cfg["ca"]).read())
    ctx.check_hostname = False  # the certificate names the head's advertised address; we pin the CA

    def client(addr):
        return httpx.AsyncClient(verify=ctx, timeout=httpx.Timeout(30.0, connect=10.0),
                                 limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                                 transport=httpx.AsyncHTTPTransport(verify=ctx, local_address=addr, retries=0))

    async def enroll(i, addr, sem, out):
        async with sem:
            c = client(addr)
            body = {"token_id": token_id, "secret": secret, "name": f"sim{cfg['first'] + i}",
                    "wg_public_key": public_key_of(generate_private_key()), "report": report}
            t = time.monotonic()
            try:
                r = await c.post(f"{url}/v1/enroll", json=body)
                ok = r.status_code == 200
                out.append((c, r.json() if ok else None, time.monotonic() - t, None if ok else r.status_code))
            except Exception as e:
                out.append((c, None, time.monotonic() - t, type(e).__name__))

    async def beat(c, node, stop_at, lat, errs):
        timer = BeatTimer()
        await asyncio.sleep(timer.next_in(period))  # the first beat was the enrollment: scatter
        headers = {"Authorization": "Bearer " + node["credential"]}
        path = f"{url}/v1/nodes/{node['node_id']}/heartbeat"
        while time.monotonic() < stop_at:
            t = time.monotonic()
            try:
                try:
                    r = await c.post(path, json={"report": report}, headers=headers)
                except httpx.RemoteProtocolError:  # as the agent does: one retry on a kept-alive connection the head closed
                    r = await c.post(path, json={"report": report}, headers=headers)
                lat.append(time.monotonic() - t)
                if r.status_code != 200:
                    errs.append(str(r.status_code))
            except Exception as e:
                lat.append(time.monotonic() - t)
                errs.append(type(e).__name__)
            await asyncio.sleep(timer.next_in(period))

    async def main():
        addrs = cfg["addresses"]
        n = cfg["pcs"]
        sem = asyncio.Semaphore(cfg["enroll_concurrency"])
        out = []
        t0 = time.monotonic()
        await asyncio.gather(*(enroll(i, addrs[i // cfg["per_address"]], sem, out) for i in range(n)))
        enroll_s = time.monotonic() - t0
        enrolled = [(c, node) for c, node, _, _ in out if node]
        enroll_errors = [e for _, _, _, e in out if e]
        print(json.dumps({"phase": "enrolled", "enroll_s": enroll_s, "ok": len(enrolled), "errors": enroll_errors[:10],
                          "n_errors": len(enroll_errors)}), flush=True)
        # Wait for the go (all client processes enrolled), from the bench on stdin.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        lat, errs = [], []
        stop_at = time.monotonic() + cfg["duration"]
        # One process stands in for hundreds of agents, so its heap is hundreds of times an
        # agent's: its full garbage collections paused it 120-145 ms every ~12 s at 1,000 PCs,
        # and every heartbeat in flight meanwhile counted that pause as the head's. An agent's
        # own heap is small; this process does not collect while it measures.
        gc.freeze()
        gc.disable()
        await asyncio.gather(*(beat(c, node, stop_at, lat, errs) for c, node in enrolled))
        gc.enable()
        print(json.dumps({"phase": "done", "latencies": lat, "errors": errs}), flush=True)

    asyncio.run(main())
""")


def proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds so far, RSS bytes) of one process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss


def namespace_pids(ns: str) -> list[int]:
    return [int(p) for p in sh(["ip", "netns", "pids", ns], check=False).stdout.split()]


class Sampler:
    """Samples the head process (and everything in the head's namespace) once a second."""

    def __init__(self, head_pid: int, ns: str) -> None:
        self.head_pid, self.ns = head_pid, ns
        self.samples: list[tuple[float, float, int, float]] = []  # (t, head cpu s, head rss, all cpu s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[float, float, int, float]:
        cpu, rss = proc_stat(self.head_pid)
        total = 0.0
        for pid in namespace_pids(self.ns):
            try:
                total += proc_stat(pid)[0]
            except (OSError, IndexError):
                pass
        return time.monotonic(), cpu, rss, total

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.samples.append(self.sample())
            except OSError:
                return

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def cpu_between(a, b) -> tuple[float, float]:
    """% of one core used by the head process, and by all of the head's namespace, between samples."""
    dt = b[0] - a[0]
    return 100 * (b[1] - a[1]) / dt, 100 * (b[3] - a[3]) / dt


def sample_report() -> dict:
    """A heartbeat body as a real agent sends it (the unit tests' agent, one RTX 4090)."""
    from garage_node.core.wire import encode
    from tests.unit.test_agent import rig

    with tempfile.TemporaryDirectory() as tmp:
        r = rig(Path(tmp))
        r.head.ray_alive = True
        r.passes(8)
        return encode(r.head.heartbeats[-1])


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pcs", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of heartbeats")
    ap.add_argument("--period", type=float, default=5.0, help="heartbeat period, s")
    ap.add_argument("--procs", type=int, default=2, help="client processes")
    ap.add_argument("--enroll-concurrency", type=int, default=32, help="enrollments in flight per client process")
    ap.add_argument("--settle", type=float, default=30.0, help="seconds after the load before the 'after' RSS")
    ap.add_argument("--ray", action=argparse.BooleanOptionalAction, default=True, help="run the head's Ray head")
    ap.add_argument("--pin", action="store_true",
                    help="the head's namespace (head, Ray, Redis, wireguard-go) on the last CPU, the simulated "
                         "PCs on the others: their own loops then no longer share the head's CPU")
    ap.add_argument("--gateway", action="store_true",
                    help="run the gateway too, and split the heartbeat latency: the head's own share (its "
                         "garage_head_heartbeat_seconds histogram) beside what the PCs measured")
    args = ap.parse_args()

    report = sample_report()
    print(f"heartbeat body: {len(json.dumps({'report': report}))} bytes")
    with Testbed() as tb:
        head = tb.add_head()
        text = head.config.read_text()
        # The production defaults for what is measured: 5 s heartbeats, offline after 15 s.
        text = text.replace("heartbeat_s = 2.0", f"heartbeat_s = {args.period}")
        if not args.ray:
            text = text.replace("[ray]\n", '[ray]\ncommand = "/bin/false"\n')
        # By default the control plane alone: the gateway's share of a heartbeat (one ledger
        # query a second for the whole region) is not in these figures.
        if not args.gateway:
            head.config.write_text(text + "\n[gateway]\nenabled = false\n")
        head.init()
        head.start()
        time.sleep(10)  # Ray head up, first membership answers
        clients = tb.add_node("clients", [])
        n_addr = (args.pcs + PER_ADDRESS - 1) // PER_ADDRESS
        base = clients.ip.rsplit(".", 1)[0]
        addresses = [f"{base}.{100 + i}" for i in range(n_addr)]
        if 100 + n_addr > 254:
            raise SystemExit(f"--pcs {args.pcs}: more than {154 * PER_ADDRESS} PCs need a wider client subnet")
        for a in addresses:
            sh(["ip", "-n", clients.ns, "address", "add", f"{a}/24", "dev", "eth0"])

        tok = head.token("--uses", str(args.pcs))
        from garage_node.core.token import parse
        jt = parse(tok)
        secret_file = clients.dir / "token.secret"
        secret_file.write_text(jt.secret)
        secret_file.chmod(0o600)
        ca = head.dir / "state" / "pki" / "ca.pem"
        script = clients.dir / "client.py"
        script.write_text(CLIENT)

        head_cpus, client_cpus = split_cpus()
        if args.pin:
            pin_all(namespace_pids(head.ns), head_cpus)
            print(f"pinning: the head's namespace on CPU {head_cpus}, the simulated PCs on CPU {client_cpus}")
        sampler = Sampler(head.proc.pid, head.ns)
        idle_a = sampler.sample()
        time.sleep(10)
        idle_b = sampler.sample()
        sampler.start()

        per_proc = [args.pcs // args.procs + (1 if i < args.pcs % args.procs else 0) for i in range(args.procs)]
        procs, first, addr_at = [], 0, 0
        t_enroll = time.monotonic()
        for i, n in enumerate(per_proc):
            n_a = (n + PER_ADDRESS - 1) // PER_ADDRESS
            cfg = {"url": f"https://{head.ip}:8443", "token_id": jt.token_id, "secret_file": str(secret_file),
                   "ca": str(ca), "report": report, "period": args.period, "duration": args.duration,
                   "pcs": n, "first": first, "addresses": addresses[addr_at:addr_at + n_a], "per_address": PER_ADDRESS,
                   "enroll_concurrency": args.enroll_concurrency}
            path = clients.dir / f"client{i}.json"
            path.write_text(json.dumps(cfg))
            procs.append(subprocess.Popen(clients.wrap([PYTHON, str(script), str(path)]), stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True, env={**os.environ}))
            if args.pin:
                pin_all([procs[-1].pid], client_cpus)
            first += n
            addr_at += n_a
        enrolled = [json.loads(p.stdout.readline()) for p in procs]
        enroll_wall = time.monotonic() - t_enroll
        after_enroll = sampler.sample()

        # Hub peers caught up?
        t_peers = time.monotonic()
        while len(head.hub_peers()) < sum(e["ok"] for e in enrolled) and time.monotonic() - t_peers < 60:
            time.sleep(0.2)
        peers_lag = time.monotonic() - t_peers

        hist_a = heartbeat_histogram(head) if args.gateway else {}
        load_a = sampler.sample()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        done = [json.loads(p.stdout.readline()) for p in procs]
        load_b = sampler.sample()
        for p in procs:
            p.wait(timeout=60)
        load_samples = [s for s in sampler.samples if load_a[0] <= s[0] <= load_b[0]]
        head_side = head_side_quantiles(hist_a, heartbeat_histogram(head)) if args.gateway else None

        t = time.monotonic()
        rows = head.nodes()
        nodes_json_s = time.monotonic() - t
        time.sleep(args.settle)
        after = sampler.sample()
        sampler.stop()

        lat = [x for d in done for x in d["latencies"]]
        errs = [x for d in done for x in d["errors"]]
        head_cpu, ns_cpu = cpu_between(load_a, load_b)
        idle_cpu, idle_ns_cpu = cpu_between(idle_a, idle_b)
        rate = len(lat) / (load_b[0] - load_a[0])
        print(json.dumps({
            "pcs": args.pcs, "period_s": args.period, "duration_s": args.duration, "ray": args.ray,
            "enrolled": sum(e["ok"] for e in enrolled), "enroll_errors": sum(e["n_errors"] for e in enrolled),
            "enroll_error_kinds": sorted({x for e in enrolled for x in e["errors"]}),
            "enroll_s": round(enroll_wall, 1), "hub_peers_behind_s": round(peers_lag, 1),
            "heartbeats": len(lat), "rate_per_s": round(rate, 1),
            "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
            "p99_ms": round(1000 * pct(lat, 0.99), 1), "max_ms": round(1000 * max(lat), 1) if lat else None,
            "errors": len(errs), "error_kinds": sorted(set(errs))[:10],
            "head_cpu_pct_of_core": round(head_cpu, 1), "head_ns_cpu_pct_of_core": round(ns_cpu, 1),
            "idle_head_cpu_pct": round(idle_cpu, 2), "idle_head_ns_cpu_pct": round(idle_ns_cpu, 2),
            "head_rss_mb": {"idle": round(idle_b[2] / 1e6, 1), "after_enroll": round(after_enroll[2] / 1e6, 1),
                            "load_max": round(max(s[2] for s in load_samples) / 1e6, 1) if load_samples else None,
                            f"after_{args.settle:.0f}s": round(after[2] / 1e6, 1)},
            "head_nodes_json_s": round(nodes_json_s, 2), "rows": len(rows),
            "head_side_ms": head_side,
        }, indent=2))
    return 0


def split_cpus() -> tuple[list[int], list[int]]:
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[-1:], cpus[:-1] or cpus)


def pin_all(pids: list[int], cpus: list[int]) -> None:
    """Every thread of each process (sched_setaffinity on a pid sets only that one thread);
    threads started later inherit it from the thread that starts them."""
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                os.sched_setaffinity(int(task.name), cpus)
            except OSError:
                pass  # ended meanwhile


def heartbeat_histogram(head) -> dict[float, float]:
    """The head's garage_head_heartbeat_seconds buckets (upper bound -> cumulative count), all statuses."""
    from prometheus_client.parser import text_string_to_metric_families

    text = head.run(["curl", "-s", "--max-time", "10", "http://127.0.0.1:9464/metrics"]).stdout
    out: dict[float, float] = {}
    for f in text_string_to_metric_families(text):
        for s in f.samples:
            if s.name == "garage_head_heartbeat_seconds_bucket":
                le = float(s.labels["le"])
                out[le] = out.get(le, 0.0) + s.value
    return out


def head_side_quantiles(before: dict[float, float], after: dict[float, float]) -> dict[str, float | None]:
    """p50 and p99 of the heartbeats answered between two scrapes, as the histogram's bucket
    bounds (so "p99_le_ms": 25 means p99 is at most 25 ms)."""
    delta = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = delta[-1][1] if delta else 0.0

    def bound(q: float) -> float | None:
        for le, n in delta:
            if total and n >= q * total:
                return None if le == float("inf") else round(le * 1000, 1)
        return None

    return {"answered": total, "p50_le_ms": bound(0.5), "p99_le_ms": bound(0.99)}


if __name__ == "__main__":
    sys.exit(main())
