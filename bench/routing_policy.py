"""The gateway's routing policy against round robin, on real parts: two PCs serving the vLLM
CPU image, one of them slowed (its engine container limited to a share of a CPU), requests from
a handful of long shared system prompts. For each policy: latency p50/p99, the requests each PC
took, and vLLM's prefix-cache hit rate over the run (from each engine's /metrics). The head is
restarted between policies with `[gateway] policy` changed; the PCs keep running.

    .venv/bin/python bench/routing_policy.py [--seconds 40] [--concurrency 4] [--prefixes 6] [--slow-cpus 0.5]
        [--balance-abs N ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout: testing/ is not installed

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from testing.dockerd import TINY_MODEL, engine_toml, tiny_model_dir  # noqa: E402
from testing.region import Testbed, wait_for  # noqa: E402

GATEWAY = "http://127.0.0.1:8080"


def prefix_cache(head, pc) -> tuple[float, float]:
    """(queries, hits) of vLLM's prefix cache, in tokens, from the engine's /metrics."""
    url = f"http://{pc.status()['overlay']['address']}:8000/metrics"
    text = head.run(["curl", "-s", "--max-time", "10", url], check=False).stdout
    q = h = 0.0
    for f in text_string_to_metric_families(text):
        for s in f.samples:
            if s.name in ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"):
                q += s.value
            elif s.name in ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"):
                h += s.value
    return q, h


def run_load(head, key, args) -> list[dict]:
    res = head.run([sys.executable, str(ROOT / "testing/loadgen.py"), GATEWAY, key, TINY_MODEL,
                    "--seconds", str(args.seconds), "--concurrency", str(args.concurrency),
                    "--prefixes", str(args.prefixes), "--max-tokens", "8"], timeout=args.seconds + 300)
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def q(values: list[float], f: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(f * len(values)))] if values else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=40)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--prefixes", type=int, default=6)
    p.add_argument("--slow-cpus", default="0.5", help="CPU share the slow PC's engine container gets")
    p.add_argument("--balance-abs", type=int, action="append", default=[],
                   help="also run the default policy with this [gateway] balance_abs (repeatable)")
    args = p.parse_args()
    model = tiny_model_dir()
    with Testbed() as tb:
        head = tb.start_head()
        # Each PC's engine on a CPU of its own, as on separate machines (testing/dockerd.py).
        fast, slow = (tb.add_engine_node(n, engine_toml(model, cpus=str(i))) for i, n in enumerate(("fast-pc", "slow-pc")))
        for pc in (fast, slow):
            pc.configure(head.token())
            pc.start()
        for pc in (fast, slow):
            pc.wait_state("joined", 900, predicate=lambda s: s["engine"]["state"] == "healthy")
        slow.docker("update", "--cpus", args.slow_cpus, "garage-engine")
        key = head.cli("head", "key", "create", "bench", "--config", str(head.config)).stdout.strip()
        base_config = head.config.read_text()
        results = {}
        variants = [("round-robin", ""), ("least-load-affinity", "")]
        variants += [(f"affinity, balance_abs {n}", f"policy = \"least-load-affinity\"\nbalance_abs = {n}\n")
                     for n in args.balance_abs]
        for policy, settings in variants:
            settings = settings or f'policy = "{policy}"\n'
            head.config.write_text(base_config + f'\n[gateway]\n{settings}')
            head.stop()
            head.start()
            head.wait_api()

            def both_serving() -> bool:
                out = head.run(["curl", "-s", "-H", f"Authorization: Bearer {key}", f"{GATEWAY}/v1/models"],
                               check=False).stdout
                try:
                    return json.loads(out)["data"][0]["pcs_serving"] == 2
                except (ValueError, KeyError, IndexError):
                    return False
            wait_for(both_serving, 60, "both PCs in the gateway's table")
            before = {pc.name: prefix_cache(head, pc) for pc in (fast, slow)}
            rows = run_load(head, key, args)
            after = {pc.name: prefix_cache(head, pc) for pc in (fast, slow)}
            ok = [r for r in rows if r["status"] == 200]
            queries = sum(after[n][0] - before[n][0] for n in after)
            hits = sum(after[n][1] - before[n][1] for n in after)
            lat = [r["latency_s"] * 1000 for r in ok]
            results[policy] = {
                "requests": len(rows), "errors": len(rows) - len(ok), "p50_ms": q(lat, 0.5), "p99_ms": q(lat, 0.99),
                "per_pc": dict(Counter(r["node"] for r in ok)),
                "prefix_hit_rate": hits / queries if queries else float("nan"),
            }
            print(policy, json.dumps(results[policy]), flush=True)
        print(f"\ntwo PCs (slow-pc's engine at {args.slow_cpus} CPU), {args.prefixes} shared prompts, "
              f"{args.concurrency} clients, {args.seconds:.0f} s each:")
        for policy, r in results.items():
            print(f"  {policy:28} p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, {r['requests']} requests "
                  f"({r['errors']} errors), per PC {r['per_pc']}, prefix-cache hit rate {r['prefix_hit_rate']:.2f}")


if __name__ == "__main__":
    main()
