"""The gateway's routing decision alone: 1,000 PCs serving one model in the endpoint table,
requests with 50 shared system prompts. Prints the time of one decision (table lookup, policy,
prefix bookkeeping) at p50/p99/max, and how often affinity, least-load and balance won.

    .venv/bin/python bench/router_bench.py [--pcs 1000] [--requests 20000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import Counter
from dataclasses import replace

from garage_node.core.wire import EngineReport, EngineState
from garage_node.head.gateway.proxy import Call, Proxy
from garage_node.head.gateway.router import Router
from garage_node.head.gateway.table import EndpointTable
from testing.fakes import sample_report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pcs", type=int, default=1000)
    p.add_argument("--requests", type=int, default=20000)
    args = p.parse_args()
    rng = random.Random(1)
    table = EndpointTable(stale_after_s=1e9)
    base = sample_report()
    for i in range(args.pcs):
        table.update(f"n{i:05d}", replace(base, engine=EngineReport(
            state=EngineState.HEALTHY, model="m", endpoint=f"http://100.96.{i // 250}.{i % 250 + 2}:8000",
            requests_running=rng.randint(0, 8), requests_waiting=rng.randint(0, 2))))
    router = Router()
    proxy = Proxy.__new__(Proxy)  # only its _pick, the decision the gateway makes per request
    proxy.table, proxy.router = table, router
    systems = [f"System prompt {k}: " + "be helpful and precise. " * 60 for k in range(50)]
    times: list[float] = []
    inflight = []
    for i in range(args.requests):
        prompt = rng.choice(systems) + f"user question {i}"
        t0 = time.perf_counter()
        call = Call(path="/v1/completions", model="m", body=b"", stream=False, client_wants_usage=False,
                    blocks=router.blocks(prompt), key=None, started=0.0)  # type: ignore[arg-type]
        ep = proxy._pick(call, set())
        times.append(time.perf_counter() - t0)
        inflight.append(ep)
        if len(inflight) > 2000:  # requests finish: keep ~2,000 in flight across the region
            table.end(inflight.pop(0))
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))] * 1e6  # noqa: E731
    # The policy's choices on the same stream, decided again without the table walk.
    r2, tally = Router(), Counter()
    loads = {f"n{i:05d}": 0 for i in range(args.pcs)}

    class T:
        __slots__ = ("node_id", "load", "kv_cache_usage_pct")

    targets = []
    for n in loads:
        t = T()
        t.node_id, t.load, t.kv_cache_usage_pct = n, rng.randint(0, 8), 0.0
        targets.append(t)
    for i in range(5000):
        blocks = r2.blocks(rng.choice(systems) + f"q{i}")
        d = r2.choose(targets, blocks)
        tally[d.reason] += 1
        r2.served(blocks, d.node_id)
    print(f"router with {args.pcs} PCs, {args.requests} requests (2,000 in flight):")
    print(f"  decision p50 {q(0.5):.1f} µs, p99 {q(0.99):.1f} µs, max {times[-1] * 1e6:.1f} µs, "
          f"mean {statistics.mean(times) * 1e6:.1f} µs")
    print(f"  choices on 50 shared prompts: {dict(tally)}")


if __name__ == "__main__":
    main()
