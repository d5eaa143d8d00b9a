"""A client of the federation's gateways, run inside a namespace by testing/fednet.py; prints
one JSON answer. Operations (the JSON argument's "op"):

- "many": `n` requests to `url` one after another (`pause_s` apart); each [status, ms, region, node, spilled, degraded].
- "until": requests to each of `urls` every `every_s` until one answers `status`; the wall time
  each first did (for revocation's propagation).
- "failover": one request every `every_s` for `seconds`, to `urls` in order: a head that does not
  answer within `timeout_s` is passed over for the next (a client's own retry); each
  [wall time, status, which url answered, ms].
- "load": requests for `seconds` at `rate`/s (open loop), the count of each status.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import httpx


def body(args: dict[str, Any]) -> dict[str, Any]:
    return {"model": args.get("model", "tiny"), "prompt": "hi", "stream": bool(args.get("stream"))}


def headers(args: dict[str, Any]) -> dict[str, str]:
    return {"authorization": f"Bearer {args['key']}"}


def many(args: dict[str, Any]) -> list[list[Any]]:
    out = []
    with httpx.Client(timeout=args.get("timeout_s", 10.0)) as c:
        for _ in range(args["n"]):
            t0 = time.perf_counter()
            try:
                r = c.post(args["url"] + "/v1/completions", json=body(args), headers=headers(args))
                _ = r.content
                out.append([r.status_code, (time.perf_counter() - t0) * 1000, r.headers.get("x-garage-region"),
                            r.headers.get("x-garage-node"), r.headers.get("x-garage-spilled-from"),
                            r.headers.get("x-garage-federation")])
            except httpx.HTTPError as e:
                out.append([0, (time.perf_counter() - t0) * 1000, None, None, None, type(e).__name__])
            time.sleep(args.get("pause_s", 0.0))
    return out


def until(args: dict[str, Any]) -> dict[str, float | None]:
    async def one(c: httpx.AsyncClient, url: str) -> float | None:
        deadline = time.time() + args.get("within_s", 10.0)
        while time.time() < deadline:
            try:
                r = await c.post(url + "/v1/completions", json=body(args), headers=headers(args))
                if r.status_code == args["status"]:
                    return time.time()
            except httpx.HTTPError:
                pass
            await asyncio.sleep(args.get("every_s", 0.02))
        return None

    async def go() -> list[float | None]:
        async with httpx.AsyncClient(timeout=5.0) as c:
            if args.get("ready_file"):  # a first round done: the caller may now change what is polled
                await asyncio.gather(*(c.post(u + "/v1/completions", json=body(args), headers=headers(args))
                                       for u in args["urls"]))
                open(args["ready_file"], "w").close()  # noqa: ASYNC230 - one empty file, once
            return await asyncio.gather(*(one(c, u) for u in args["urls"]))
    return dict(zip(args["urls"], asyncio.run(go()), strict=True))


def failover(args: dict[str, Any]) -> list[list[Any]]:
    out = []
    end = time.time() + args["seconds"]
    with httpx.Client(timeout=args.get("timeout_s", 1.0)) as c:
        while time.time() < end:
            t0 = time.perf_counter()
            got: list[Any] = [time.time(), 0, None, 0.0]
            for url in args["urls"]:
                try:
                    r = c.post(url + "/v1/completions", json=body(args), headers=headers(args))
                    got = [got[0], r.status_code, url, (time.perf_counter() - t0) * 1000]
                    if r.status_code == 200:
                        break
                except httpx.HTTPError:
                    continue
            out.append(got)
            time.sleep(args.get("every_s", 0.2))
    return out


def load(args: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}

    async def one(c: httpx.AsyncClient) -> None:
        try:
            r = await c.post(args["url"] + "/v1/completions", json=body(args), headers=headers(args))
            k = str(r.status_code)
        except httpx.HTTPError as e:
            k = type(e).__name__
        counts[k] = counts.get(k, 0) + 1

    async def go() -> None:
        async with httpx.AsyncClient(timeout=30.0) as c:
            tasks = []
            t0 = time.monotonic()
            i = 0
            while time.monotonic() - t0 < args["seconds"]:
                tasks.append(asyncio.ensure_future(one(c)))
                i += 1
                await asyncio.sleep(max(0.0, t0 + i / args["rate"] - time.monotonic()))
            await asyncio.gather(*tasks)
    asyncio.run(go())
    return counts


def main() -> None:
    args = json.loads(sys.argv[1])
    op = {"many": many, "until": until, "failover": failover, "load": load}[args["op"]]
    print(json.dumps(op(args)))


if __name__ == "__main__":
    main()
