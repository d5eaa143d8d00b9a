"""The seed's target through one head (issue #22): 100 PCs streaming 50 tokens/s each (5,000
tokens/s through the gateway), then 300 streams (15,000 tokens/s), against the same load sent
straight to the stand-ins, in turns.

Three processes on loopback, as bench/gateway_load.py: engine stand-ins (testing/rawhttp.py: one
process, `--pcs` ports, each streaming a token every 1/`--tokens-per-s` s), the gateway (the real
Gateway and app, as `head run` builds its listener), and the load: `--streams` users, each
sending a streamed completion of `--max-tokens` tokens and the next one when it ends (closed
loop, so the token rate is streams x tokens-per-s). Printed per turn: time to first token
(p50, p99), tokens/s delivered, errors, and for the gateway its CPU (% of a core, µs per relayed
event) and its longest garbage-collection pause.

    .venv/bin/python bench/seed_scale.py [--pcs 100] [--streams 100,300] [--tokens-per-s 50]
        [--max-tokens 100] [--seconds 20]

Pinning (printed): the gateway on a CPU of its own; the stand-ins and the load on the others.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import gateway_load as gl  # noqa: E402  (the gateway role, CPU and GC readers, pinning)


def standins(ports: list[int], interval_s: float) -> None:
    import uvloop

    from testing.rawhttp import serve_standins

    uvloop.run(serve_standins(ports, interval_s))


async def users(targets: list[tuple[int, str]], streams: int, max_tokens: int, seconds: float) -> dict:
    """`streams` users over `targets` ((port, key) each; user i on target i mod n)."""
    import asyncio

    from testing.rawhttp import Client, Tally, quantile

    clients = {port: Client("127.0.0.1", port, max_connections=4096) for port, _ in targets}
    body = {"model": "m", "prompt": "Hello", "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    reqs = [(clients[port], clients[port].build("/v1/completions", body, key)) for port, key in targets]
    tally = Tally()
    start = time.perf_counter()
    stop = start + seconds

    async def user(i: int) -> None:
        client, data = reqs[i % len(reqs)]
        await asyncio.sleep(i / streams)  # users arrive over the first second
        while time.perf_counter() < stop:
            tally.results.append(await client.request(data))

    tasks = [asyncio.ensure_future(user(i)) for i in range(streams)]
    _, pending = await asyncio.wait(tasks, timeout=seconds + 30)
    for t in pending:
        t.cancel()
    elapsed = time.perf_counter() - start
    for c in clients.values():
        c.close()
    ok = tally.ok()
    tokens = sum(max(0, r.events - 2) for r in ok)  # less the usage chunk and [DONE]
    ttft = [r.ttfb_s for r in ok]
    return {"streams_done": len(ok), "refused": len(tally.refused()), "errors": tally.errors(),
            "error_kinds": tally.error_kinds(),
            "unfinished": len(pending), "tokens_per_s": tokens / elapsed, "events": sum(r.events for r in ok),
            "ttft_p50_ms": quantile(ttft, 0.5), "ttft_p99_ms": quantile(ttft, 0.99), "ttft_max_ms": quantile(ttft, 1.0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pcs", type=int, default=100)
    p.add_argument("--streams", default="100,300", help="comma-separated stream counts, one pair of turns each")
    p.add_argument("--tokens-per-s", type=float, default=50)
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--ports", help=argparse.SUPPRESS)
    p.add_argument("--state", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "stub":
        return standins([int(x) for x in args.ports.split(",")], 1 / args.tokens_per_s)
    if args.role == "gateway":
        port, *engines = [int(x) for x in args.ports.split(",")]
        return gl.gateway(port, engines, Path(args.state), "freeze", 0, "fast", 0, -1)

    import uvloop

    gw_port, *engine_ports = gl.free_ports(args.pcs + 1)
    state = Path(tempfile.mkdtemp(prefix="seed-scale-"))
    procs: list[subprocess.Popen] = []
    try:
        gl.start_rig(procs, [sys.executable, __file__, "--tokens-per-s", str(args.tokens_per_s)], engine_ports, gw_port,
                     state, [])
        key = (state / "key").read_text()
        gw_pid = procs[1].pid
        gl.pin({"stand-ins": procs[0].pid, "gateway": gw_pid, "load": os.getpid()})
        print(f"{args.pcs} stand-in PCs at {args.tokens_per_s:.0f} tokens/s per stream, {args.max_tokens} tokens a "
              f"stream; machine load {os.getloadavg()[0]:.1f}", flush=True)
        uvloop.run(users([(gw_port, key)], 10, 10, 2))  # warm up
        summary = []
        for streams in [int(x) for x in args.streams.split(",")]:
            for turn in ("direct", "gateway"):
                targets = [(port, "") for port in engine_ports] if turn == "direct" else [(gw_port, key)]
                c0, t0, w0 = gl.cpu_s(gw_pid), time.monotonic(), time.time()
                r = uvloop.run(users(targets, streams, args.max_tokens, args.seconds))
                if turn == "gateway":
                    used = gl.cpu_s(gw_pid) - c0
                    r["gateway_cpu_pct"] = 100 * used / (time.monotonic() - t0)
                    r["cpu_us_per_event"] = 1e6 * used / max(1, r["events"])
                    time.sleep(0.6)
                    r.update(gl.gc_pauses(state / "gc.json", w0, time.time()))
                print(f"{streams:4} streams {turn:8} " + " ".join(
                    f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
                summary.append((streams, turn, r))
        print()
        for streams in sorted({s for s, _, _ in summary}):
            d = next(r for s, t, r in summary if s == streams and t == "direct")
            g = next(r for s, t, r in summary if s == streams and t == "gateway")
            print(f"{streams} streams x {args.tokens_per_s:.0f} tokens/s (target {streams * args.tokens_per_s:,.0f}):"
                  f" direct {d['tokens_per_s']:,.0f} tokens/s, TTFT p50 {d['ttft_p50_ms']:.1f} / p99 "
                  f"{d['ttft_p99_ms']:.1f} ms; gateway {g['tokens_per_s']:,.0f} tokens/s, TTFT p50 "
                  f"{g['ttft_p50_ms']:.1f} / p99 {g['ttft_p99_ms']:.1f} ms (added p50 "
                  f"{g['ttft_p50_ms'] - d['ttft_p50_ms']:+.1f}, p99 {g['ttft_p99_ms'] - d['ttft_p99_ms']:+.1f} ms), "
                  f"refused {g['refused']}, errors {g['errors']} {g['error_kinds'] or ''}, unfinished "
                  f"{g['unfinished']}; gateway "
                  f"{g['gateway_cpu_pct']:.0f} % of a core, {g['cpu_us_per_event']:.0f} µs per event, longest "
                  f"collection {g['gc_max_ms']:.1f} ms")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
