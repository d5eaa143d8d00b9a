"""The gateway against calling the engine directly, on real parts: a testbed head and PCs each
serving the vLLM CPU image (testing/dockerd.py), the same load sent in turns through the head's
gateway (with an API key) and straight to a PC's engine (with that engine's key), from inside
the head's namespace. Prints time to first token (streams) p50/p99 and completed requests per
second for each, and the ratios. Also, with --kill, a PC's engine killed under load through
the gateway: requests failed before streaming began (should be 0) and the seconds until the
gateway's table no longer offers that PC.

    .venv/bin/python bench/gateway_overhead.py [--turns 3] [--seconds 20] [--concurrency 4] [--kill]

Pinning (printed): each PC's engine on CPU i (testing/dockerd.py), the head's processes on the
next CPU free of engines and the load generator on the one after, where the machine has them;
on a small machine the head and the load share the last CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout: testing/ is not installed

from testing.dockerd import TINY_MODEL, engine_toml, tiny_model_dir  # noqa: E402
from testing.region import Testbed, wait_for  # noqa: E402

GATEWAY = "http://127.0.0.1:8080"


LOAD_CPUS: list[str] = []  # taskset's prefix for the load generator, set by pin()


def pin(head, engines: int) -> None:
    """The head (all its processes and threads) and the load generator on CPUs apart from the
    engines' (CPU 0..engines-1) and from each other, as far as the machine has CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    free = [c for c in cpus if c >= engines] or cpus[-1:]
    head_cpu, load_cpu = free[0], (free[1] if len(free) > 1 else free[0])
    pids = subprocess.run(["ip", "netns", "pids", head.ns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        subprocess.run(["taskset", "-a", "-p", "-c", str(head_cpu), pid], capture_output=True)
    LOAD_CPUS[:] = ["taskset", "-c", str(load_cpu)]
    print(f"pinning: engines on CPU {','.join(map(str, range(engines)))}, the head's {len(pids)} processes on CPU "
          f"{head_cpu}, the load on CPU {load_cpu} ({len(cpus)} CPUs; machine load {os.getloadavg()[0]:.1f})",
          flush=True)


def load(head, url: str, key: str, *args: str, timeout: float = 600) -> list[dict]:
    res = head.run([*LOAD_CPUS, sys.executable, str(ROOT / "testing/loadgen.py"), url, key, TINY_MODEL, *args],
                   check=True, timeout=timeout)
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def q(values: list[float], f: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(f * len(values)))] if values else float("nan")


def healthy(pc) -> None:
    pc.wait_state("joined", 900, predicate=lambda s: s["engine"]["state"] == "healthy")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--kill", action="store_true", help="also the failover measurement (two PCs)")
    p.add_argument("--head-nice", type=int, default=0,
                   help="renice the head's processes (e.g. -10): on one small machine the engine takes every "
                        "core, and this shows how much of the overhead is the head waiting for a CPU")
    args = p.parse_args()
    model = tiny_model_dir()
    with Testbed() as tb:
        head = tb.start_head()
        # Each PC's engine on a CPU of its own, as on separate machines (testing/dockerd.py).
        pcs = [tb.add_engine_node(n, engine_toml(model, cpus=str(i)))
               for i, n in enumerate(("pc-a", "pc-b") if args.kill else ("pc-a",))]
        for pc in pcs:
            pc.configure(head.token())
            pc.start()
        for pc in pcs:
            healthy(pc)
        key = head.cli("head", "key", "create", "bench", "--config", str(head.config)).stdout.strip()
        pin(head, len(pcs))
        if args.head_nice:
            pids = subprocess.run(["ip", "netns", "pids", head.ns], capture_output=True, text=True).stdout.split()
            subprocess.run(["renice", "-n", str(args.head_nice), "-p", *pids], capture_output=True)
            print(f"head's {len(pids)} processes reniced to {args.head_nice}", flush=True)
        direct = (f"http://{pcs[0].status()['overlay']['address']}:8000", pcs[0].engine_key())
        if args.kill:
            # Only pc-a is measured for overhead: drain pc-b so the gateway routes like direct does.
            pcs[1].run(pcs[1].cmd("drain"))
        wait_for(lambda: load(head, GATEWAY, key, "--requests", "1")[0]["status"] == 200, 60, "the gateway")
        figures: dict[str, list[dict]] = {"direct": [], "gateway": []}
        load(head, direct[0], direct[1], "--requests", "8", "--concurrency", "2")  # warm up
        for turn in range(args.turns):
            for name, (url, k) in (("direct", direct), ("gateway", (GATEWAY, key))):
                stream = load(head, url, k, "--seconds", str(args.seconds / 2), "--concurrency", str(args.concurrency),
                              "--stream", "--max-tokens", str(args.max_tokens))
                whole = load(head, url, k, "--seconds", str(args.seconds / 2), "--concurrency", str(args.concurrency),
                             "--max-tokens", str(args.max_tokens))
                ok = [r for r in whole if r["status"] == 200]
                figures[name].append({
                    "ttft_p50_ms": 1000 * q([r["ttfb_s"] for r in stream if r["ttfb_s"]], 0.5),
                    "ttft_p99_ms": 1000 * q([r["ttfb_s"] for r in stream if r["ttfb_s"]], 0.99),
                    "rps": len(ok) / (args.seconds / 2),
                    "errors": sum(r["status"] != 200 for r in stream + whole)})
                print(f"turn {turn + 1} {name:8} {json.dumps({k: round(v, 2) for k, v in figures[name][-1].items()})}",
                      flush=True)
        med = {n: {k: statistics.median(f[k] for f in rows) for k in rows[0]} for n, rows in figures.items()}
        d, g = med["direct"], med["gateway"]
        print(f"\nvLLM CPU, tiny model, {args.concurrency} clients, {args.max_tokens} tokens, median of {args.turns} turns:")
        print(f"  direct : TTFT p50 {d['ttft_p50_ms']:.1f} ms p99 {d['ttft_p99_ms']:.1f} ms, {d['rps']:.2f} req/s")
        print(f"  gateway: TTFT p50 {g['ttft_p50_ms']:.1f} ms p99 {g['ttft_p99_ms']:.1f} ms, {g['rps']:.2f} req/s")
        print(f"  overhead: TTFT p50 {g['ttft_p50_ms'] - d['ttft_p50_ms']:+.1f} ms; throughput ratio {g['rps'] / d['rps']:.3f}")
        if args.kill:
            pcs[1].run(pcs[1].cmd("resume"))
            healthy(pcs[1])
            wait_for(lambda: len({r["node"] for r in load(head, GATEWAY, key, "--requests", "8", "--concurrency", "4", "--unique")}) == 2,
                     120, "both PCs serving")
            gen = head.spawn([*LOAD_CPUS, sys.executable, str(ROOT / "testing/loadgen.py"), GATEWAY, key, TINY_MODEL, "--seconds", "30",
                              "--concurrency", "4", "--max-tokens", str(args.max_tokens), "--unique"], "kill-load.log")
            time.sleep(10)
            killed_at = time.monotonic()
            pcs[1].stop(9)  # the PC is gone: no heartbeats, no engine
            pcs[1].docker("rm", "-f", "garage-engine", check=False)
            gone = None
            while gone is None and time.monotonic() - killed_at < 60:
                out = head.run(["curl", "-s", "-H", f"Authorization: Bearer {key}", f"{GATEWAY}/v1/models"], check=False).stdout
                try:
                    if json.loads(out)["data"][0]["pcs_known"] == 1:
                        gone = time.monotonic() - killed_at
                except (ValueError, KeyError, IndexError):
                    pass
                time.sleep(0.5)
            gen.wait(timeout=120)
            rows = [json.loads(x) for x in (head.dir / "kill-load.log").read_text().splitlines() if x.startswith("{")]
            failed = [r for r in rows if r["status"] != 200]
            print(f"\nfailover: {len(rows)} requests under load, a PC killed 10 s in: {len(failed)} failed; "
                  f"the table dropped it after {gone if gone is None else round(gone, 1)} s (heartbeats stopped)")


if __name__ == "__main__":
    main()
