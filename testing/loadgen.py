"""A small OpenAI-API load generator for the tests and benchmarks: N concurrent clients send
completions for a while, and one JSON line per request goes to stdout (status, the PC that
answered, time to first byte, latency, whether a stream ended with [DONE] or an error event).

    python testing/loadgen.py URL KEY MODEL [--concurrency 4] [--seconds 20 | --requests N]
        [--stream [--usage]] [--max-tokens 8] [--prompt TEXT] [--prefixes K] [--pause S]

Standard library and httpx only, so it runs in any namespace with the project's Python."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import httpx


async def one(client: httpx.AsyncClient, args, i: int) -> dict:
    prompt = f"{i}: {args.prompt}" if args.unique else args.prompt
    if args.prefixes:
        # K shared system prompts, each long: requests of one group share a prefix.
        prompt = f"[group {i % args.prefixes}] " + ("You are a careful assistant. " * 40) + f"Question {i}."
    body = {"model": args.model, "prompt": prompt, "max_tokens": args.max_tokens, "stream": args.stream,
            "temperature": 0}
    if args.stream and args.usage:
        body["stream_options"] = {"include_usage": True}
    t0 = time.monotonic()
    out = {"i": i, "status": 0, "node": None, "ttfb_s": None, "latency_s": None, "done": False, "error": None,
           "usage": None}
    try:
        async with client.stream("POST", f"{args.url}/v1/completions", json=body,
                                 headers={"authorization": f"Bearer {args.key}"}) as r:
            out["status"] = r.status_code
            out["node"] = r.headers.get("x-garage-node")
            text = b""
            async for chunk in r.aiter_bytes():
                if out["ttfb_s"] is None:
                    out["ttfb_s"] = time.monotonic() - t0
                text += chunk
        if args.stream:
            lines = [line[6:] for line in text.decode().splitlines() if line.startswith("data: ")]
            out["done"] = bool(lines) and lines[-1] == "[DONE]"
            errors = [line for line in lines if line.startswith('{"error"')]
            out["error"] = json.loads(errors[0])["error"]["code"] if errors else None
            usage = [json.loads(line)["usage"] for line in lines if line.startswith("{") and '"usage"' in line]
            out["usage"] = next((u for u in reversed(usage) if u), None)
        else:
            try:
                doc = json.loads(text)
                out["usage"] = doc.get("usage")
                out["done"] = r.status_code == 200
                if r.status_code != 200:
                    out["error"] = doc.get("error", {}).get("code")
            except ValueError:
                out["error"] = "not json"
    except httpx.HTTPError as e:
        out["error"] = type(e).__name__
    out["latency_s"] = time.monotonic() - t0
    return out


async def main(args) -> None:
    deadline = time.monotonic() + args.seconds if args.seconds else None
    counter = iter(range(10**9))
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=10.0),
                                 limits=httpx.Limits(max_connections=args.concurrency * 2)) as client:
        async def worker() -> None:
            while True:
                i = next(counter)
                if args.requests is not None and i >= args.requests:
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    return
                print(json.dumps(await one(client, args, i)), flush=True)
                if args.pause:
                    await asyncio.sleep(args.pause)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("key")
    p.add_argument("model")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--seconds", type=float)
    p.add_argument("--requests", type=int)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--prompt", default="Hello")
    p.add_argument("--prefixes", type=int, default=0)
    p.add_argument("--usage", action="store_true", help="streams ask for vLLM's usage chunk")
    p.add_argument("--pause", type=float, default=0.0,
                   help="seconds each client waits between its requests (a steady load that leaves CPU "
                        "for the rest of a testbed on one machine)")
    p.add_argument("--unique", action="store_true",
                   help="no two prompts share a prefix (the router then balances by load alone)")
    a = p.parse_args()
    if a.seconds is None and a.requests is None:
        a.requests = 1
    asyncio.run(main(a))
    sys.exit(0)
