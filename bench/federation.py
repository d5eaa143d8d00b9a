"""The federation's figures (issue #21): three regions, each in a network namespace of its own,
with delays inside each region (client to head: us 10, eu 20, ap 30 ms round trip) and between
them (us-eu 80, us-ap 150, eu-ap 250 ms), through delaying relays (testing/fednet.py: this
kernel has no netem); each region the real gateway, federation and nats-server with engine
stand-ins that answer at once (testing/fedregion.py). Root (namespaces).

    .venv/bin/python bench/federation.py [--partition-s 60] [--revocations 15] [--requests 100]

Prints: the routing overhead a local request pays (gateway with federation against the
stand-in called directly, in the head's namespace); a spilled request's extra latency over a
local one; a revocation's propagation to every region; usage records across a partition (lost,
double-counted); NATS down (served, degraded); a killed head's clients retrying another head."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testing.federation import wait_for  # noqa: E402
from testing.fednet import in_namespaces  # noqa: E402

REGIONS = ["us", "eu", "ap"]
INTRA = {"us": 10.0, "eu": 20.0, "ap": 30.0}
INTER = {("us", "eu"): 80.0, ("us", "ap"): 150.0, ("eu", "ap"): 250.0}


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def line(what: str, values: list[float]) -> str:
    return f"{what}: p50 {statistics.median(values):.1f} ms, p99 {pct(values, 99):.1f} ms, max {max(values):.1f} ms (n={len(values)})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--partition-s", type=float, default=60.0)
    ap.add_argument("--revocations", type=int, default=15)
    ap.add_argument("--requests", type=int, default=100)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/federation.py needs root (network namespaces)")
    root = Path(tempfile.mkdtemp(prefix="gn-fed-bench-"))
    net, regs = in_namespaces(root, REGIONS, INTRA, INTER)

    def stopped(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stopped)
    try:
        net.up()
        t0 = time.monotonic()
        regs.start_all(90)
        print(f"three regions up in {time.monotonic() - t0:.1f} s; round trips measured by each head (ms): "
              + "; ".join(f"{r}: " + ", ".join(f"{p} {v['rtt_ms']}" for p, v in sorted(regs[r].status()["peers"].items()))
                          for r in REGIONS))
        _, secret = regs.create_key("us", "bench")
        wait_for(lambda: all(net.client({"op": "many", "url": regs[r].url, "key": secret, "n": 1})[0][0] == 200
                             for r in REGIONS), 10.0)
        layer_cost()
        overhead(net, regs, secret, args.requests)
        spill(net, regs, secret, args.requests)
        revocation(net, regs, args.revocations)
        nats_down(net, regs, secret)
        partition(net, regs, secret, args.partition_s)
        killed_head(net, regs, secret)
    finally:
        try:
            regs.stop_all()
        finally:
            net.down()
            shutil.rmtree(root, ignore_errors=True)


def layer_cost(n: int = 3000) -> None:
    """The spill-over layer's own cost on a local request, in-process: the gateway's ASGI app
    replaced by one that answers at once, called with and without the layer in front."""
    import asyncio

    from garage_node.core.wire import EngineReport, EngineState
    from garage_node.head.federation.capacity import PeerView, TtftWindow
    from garage_node.head.federation.spill import SpillOver
    from garage_node.head.gateway.table import EndpointTable
    from testing.fakes import sample_report
    from dataclasses import replace

    table = EndpointTable(stale_after_s=1e9)
    table.update("n1", replace(sample_report(), engine=EngineReport(state=EngineState.HEALTHY, model="tiny",
                                                                    endpoint="http://127.0.0.1:1")))

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    layer = SpillOver(app, region="us", secret="x" * 40, table=table, peers=PeerView(5.0, 150.0), gateways={},
                      authenticate=lambda _a: None, budget_ms=500.0, pc_slots=16, max_body_bytes=1 << 22,  # type: ignore[arg-type,return-value]
                      ttft=TtftWindow(), degraded=lambda: False)
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hello " * 50}]}).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [(b"authorization", b"Bearer x")]}

    async def one(target) -> float:
        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(_m):
            return None
        t = time.perf_counter()
        await target(scope, receive, send)
        return (time.perf_counter() - t) * 1e6

    async def run() -> tuple[list[float], list[float]]:
        bare, layered = [], []
        for _ in range(n):
            bare.append(await one(app))
            layered.append(await one(layer))
        return bare, layered

    bare, layered = asyncio.run(run())
    print(f"\nthe spill-over layer's own cost on a local request (in-process, {len(body)}-byte chat body, n={n}): "
          f"p50 {statistics.median(layered) - statistics.median(bare):.0f} µs, p99 {pct(layered, 99) - pct(bare, 99):.0f} µs")


def overhead(net, regs, secret: str, n: int) -> None:
    """In us' head namespace, no relay: the stand-in straight, then through the gateway."""
    eng = next(iter(json.loads((regs["us"].state / "engines.json").read_text()).values()))
    gw_url = f"http://127.0.0.1:{regs['us'].gateway_port}"
    regs["us"].all_pcs("healthy")
    direct, through = [], []
    for _ in range(2):  # in turns, so a busy moment of the machine falls on both
        direct += [x[1] for x in net.client_in(net.ns("us"), {"op": "many", "url": eng["url"], "key": eng["key"], "n": n // 2})]
        through += [x[1] for x in net.client_in(net.ns("us"), {"op": "many", "url": gw_url, "key": secret, "n": n // 2})]
    print("\nlocal routing overhead (us, in its head's namespace, the stand-in answers at once):")
    print("  " + line("stand-in called directly", direct))
    print("  " + line("through the gateway with federation", through))
    print(f"  added: p50 {statistics.median(through) - statistics.median(direct):.1f} ms, "
          f"p99 {pct(through, 99) - pct(direct, 99):.1f} ms (goal: p99 <= 5 ms)")


def spill(net, regs, secret: str, n: int) -> None:
    us = regs["us"]
    us.all_pcs("healthy")
    time.sleep(1.5)
    local = net.client({"op": "many", "url": us.url, "key": secret, "n": n})
    us.all_pcs("busy")
    wait_for(lambda: net.client({"op": "many", "url": us.url, "key": secret, "n": 1})[0][4] == "us", 10.0)
    spilled = net.client({"op": "many", "url": us.url, "key": secret, "n": n})
    where = {x[2] for x in spilled}
    lat_l, lat_s = [x[1] for x in local if x[0] == 200], [x[1] for x in spilled if x[0] == 200]
    if not lat_s:
        print(f"  no spilled request succeeded: {spilled[:5]}")
        return
    print(f"\nspill-over (us' PCs all busy; us-eu 80 ms, us-ap 150 ms; served by {', '.join(sorted(w or '?' for w in where))}):")
    print("  " + line("served in us", lat_l))
    print("  " + line("spilled", lat_s))
    print(f"  extra: p50 {statistics.median(lat_s) - statistics.median(lat_l):.1f} ms, p99 {pct(lat_s, 99) - pct(lat_l, 99):.1f} ms"
          " (goal: <= one inter-region round trip + 10 ms = 90 ms)")
    regs["eu"].all_pcs("down")
    regs["ap"].all_pcs("busy")
    wait_for(lambda: net.client({"op": "many", "url": us.url, "key": secret, "n": 1})[0][0] == 429, 15.0)
    refused = net.client({"op": "many", "url": us.url, "key": secret, "n": 20})
    print("  " + line(f"nowhere to go: {sum(x[0] == 429 for x in refused)}/20 answered 429 + Retry-After in",
                      [x[1] for x in refused]))
    for r in REGIONS:
        regs[r].all_pcs("healthy")
    time.sleep(2)


def valid_everywhere(net, regs, secret: str) -> bool:
    got = net.client({"op": "until", "urls": [regs[r].url for r in REGIONS], "key": secret, "status": 200,
                      "within_s": 10})
    return all(v is not None for v in got.values())


def revocation(net, regs, samples: int) -> None:
    delays: list[float] = []
    per_region: dict[str, list[float]] = {r: [] for r in REGIONS}
    missed = 0
    for i in range(samples):
        origin, revoker = REGIONS[i % 3], REGIONS[(i + 1) % 3]
        key, secret = regs.create_key(origin, f"rev{i}")
        ok = valid_everywhere(net, regs, secret)
        if not ok:
            missed += 1
            continue
        ready = regs.root / f"poller-{i}"
        poller = net.client_bg({"op": "until", "urls": [regs[r].url for r in REGIONS], "key": secret, "status": 401,
                                "within_s": 12, "every_s": 0.01, "ready_file": str(ready)})
        wait_for(ready.exists, 30.0, every_s=0.02)  # the poller is up and polling
        t = time.time()
        regs.revoke_key(revoker, key.name)
        got = net.result(poller)
        for url, at in got.items():
            region = next(r for r in REGIONS if regs[r].url == url)
            if at is None:
                missed += 1
                continue
            ms = (at - t) * 1000
            delays.append(ms)
            per_region[region].append(ms)
    print(f"\nrevocation (revoked in one region, refused everywhere; {samples} keys, 3 regions each, polled every 10 ms):")
    print("  " + line("revocation to refusal, all regions", delays) + f", never refused within 12 s: {missed}")
    for r in REGIONS:
        if per_region[r]:
            print("    " + line(r, per_region[r]))
    print("  (goal: p99 <= 2000 ms)")


def settled(regs) -> dict[str, int]:
    """Every region's table equal (what earlier steps served has arrived everywhere)."""
    time.sleep(1.5)  # the last records written (every 0.2 s) and shipped, before the tables are compared
    got = wait_for(lambda: (c := regs.usage_counts()) and all(c[r] == c["us"] for r in REGIONS) and c["us"], 60.0, every_s=0.5)
    if not got:
        print(f"  (the regions' tables were not equal before this step: {regs.usage_counts()})")
    return regs.usage_counts()["us"]


def partition(net, regs, secret: str, seconds: float) -> None:
    base = settled(regs)
    rate = 4.0
    loads = {r: net.client_bg({"op": "load", "url": regs[r].url, "key": secret, "rate": rate, "seconds": seconds + 10})
             for r in REGIONS}
    time.sleep(5)
    net.partition("us")
    t_cut = time.monotonic()
    time.sleep(seconds)
    net.partition("us", cut=False)
    healed = time.monotonic()
    sent = {r: net.result(p, timeout_s=seconds + 120) for r, p in loads.items()}
    ok = {r: sent[r].get("200", 0) for r in REGIONS}
    want = {r: base.get(r, 0) + ok[r] for r in REGIONS}
    converged = wait_for(lambda: all(regs.usage_counts()[r] == want for r in REGIONS), 60.0, every_s=0.5)
    after = regs.usage_counts()
    print(f"\npartition (us cut off from eu and ap for {time.monotonic() - t_cut - (time.monotonic() - healed):.0f} s, "
          f"{rate:.0f} requests/s in each region throughout):")
    print(f"  answered per region: {sent}")
    for r in REGIONS:
        got = {o: after[r].get(o, 0) - base.get(o, 0) for o in REGIONS}
        lost = {o: ok[o] - got[o] for o in REGIONS}
        print(f"  region {r} holds: {got} -> lost {sum(max(0, v) for v in lost.values())}, "
              f"double-counted {sum(max(0, -v) for v in lost.values())}")
    print(f"  every region equal after healing: {'yes' if converged else 'NO'} "
          f"(within {time.monotonic() - healed:.1f} s of the heal)")


def nats_down(net, regs, secret: str) -> None:
    eu = regs["eu"]
    pid = eu.nats_pid()
    before = settled(regs).get("eu", 0)
    load = net.client_bg({"op": "many", "url": eu.url, "key": secret, "n": 60, "pause_s": 0.2})
    time.sleep(1)
    os.kill(pid, signal.SIGSTOP)
    t = time.monotonic()
    time.sleep(12)
    os.kill(pid, signal.SIGCONT)
    got = net.result(load)
    served = sum(x[0] == 200 for x in got)
    degraded = sum(x[5] == "degraded" for x in got)
    caught_up = wait_for(lambda: regs.usage_counts()["us"].get("eu", 0) - before == sum(x[0] == 200 for x in got), 30.0)
    print("\nNATS down (eu's nats-server stopped for 12 s while eu's clients send 5 requests/s):")
    print(f"  eu served {served}/{len(got)} with the keys it knows; {degraded} answers said x-garage-federation: degraded; "
          f"its usage reached us after NATS came back: {'all' if caught_up else 'NOT all'} "
          f"({time.monotonic() - t - 12:.1f} s after)")


def killed_head(net, regs, secret: str) -> None:
    urls = [regs["us"].url, regs["eu"].url]
    client = net.client_bg({"op": "failover", "urls": urls, "key": secret, "seconds": 10, "every_s": 0.1, "timeout_s": 1.0})
    time.sleep(3.5)
    t_kill = time.time()
    regs.kill("us")
    got = net.result(client)
    after = [x for x in got if x[0] >= t_kill]
    first_ok = next((x for x in after if x[1] == 200), None)
    failed = sum(x[1] != 200 for x in after)
    print("\nhead killed (us' head SIGKILLed; its clients try us, then eu, 1 s timeout each):")
    if first_ok:
        print(f"  first success after the kill {first_ok[0] - t_kill:.2f} s later (from {first_ok[2]}); "
              f"requests after the kill: {len(after)}, failed: {failed} (goal: success within 5 s)")
    else:
        print("  no success after the kill")


if __name__ == "__main__":
    main()
