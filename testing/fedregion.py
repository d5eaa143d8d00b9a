"""One region of a federation, as a process: the real gateway (its listener built by
`head/service.py::gateway_listeners`, spill-over included), the real federation (its own
nats-server, keys, usage, summaries) and engine stand-ins on loopback that answer after
`--ttft-ms`. What a head adds besides (registry, WireGuard, Ray) plays no part in federation,
so PCs are fed into the gateway's table as their heartbeats would be, every 0.5 s, from
`<state>/pcs.json` ({"n1": "healthy" | "busy" | "down"}; busy: its engine reports a queue).

    python -m testing.fedregion --region us --state DIR --host 127.0.0.1 --gateway-port P
        --nats-port Q --peers '{"eu": {"nats": "nats://…", "gateway": "http://…"}}' [--pcs 2] [--ttft-ms 0]

Keys are made and revoked by writing the region's gateway.db with KeyStore, as `head key` does.
Prints "ready" once its gateway listens."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stand_in(name: str, key: str, ttft_s: float):
    """An engine stand-in speaking vLLM's OpenAI dialect: answers after ttft_s."""
    import uvicorn

    app = FastAPI()

    @app.post("/v1/completions")
    @app.post("/v1/chat/completions")
    async def complete(request: Request):
        if request.headers.get("authorization") != f"Bearer {key}":
            return JSONResponse({"error": {"message": "Unauthorized"}}, status_code=401)
        body = await request.json()
        await asyncio.sleep(ttft_s)
        usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        if not body.get("stream"):
            return {"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                    "choices": [{"index": 0, "text": f"from {name}", "finish_reason": "length"}], "usage": usage}

        async def events():
            for word in ("a", "b", "c"):
                chunk = {"id": "cmpl-1", "model": body["model"], "choices": [{"index": 0, "text": word}], "usage": None}
                yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
            yield f"data: {json.dumps({'id': 'cmpl-1', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--region", required=True)
    ap.add_argument("--state", type=Path, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--gateway-port", type=int, required=True)
    ap.add_argument("--nats-port", type=int, required=True)
    ap.add_argument("--peers", default="{}")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--pcs", type=int, default=2)
    ap.add_argument("--ttft-ms", type=float, default=0.0)
    ap.add_argument("--budget-ms", type=float, default=500.0)
    ap.add_argument("--lease-tokens", type=int, default=10000)
    ap.add_argument("--secret-file", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.region} %(name)s %(message)s")

    from garage_node.core.wire import EngineReport, EngineState
    from garage_node.head.config import GatewaySection, HeadConfig, HeadSection
    from garage_node.head.federation.config import FederationSection, PeerSection
    from garage_node.head.federation.hooks import attach
    from garage_node.head.gateway.gateway import Gateway
    from garage_node.head.service import gateway_listeners
    from testing.fakes import sample_report

    args.state.mkdir(parents=True, exist_ok=True)
    peers = {r: PeerSection(**p) for r, p in json.loads(args.peers).items()}
    cfg = HeadConfig(head=HeadSection(region=args.region, state_dir=args.state),
                     gateway=GatewaySection(listen_host=args.host, port=args.gateway_port, metrics_port=free_port(),
                                            stale_after_s=5.0),
                     federation=FederationSection(enabled=True, nats_listen_host=args.host, nats_port=args.nats_port,
                                                  secret_file=args.secret_file, budget_ms=args.budget_ms,
                                                  peers=peers, summary_s=1.0, lease_tokens=args.lease_tokens))
    names = {f"{args.region}-n{i}": f"{args.region}-pc{i}" for i in range(1, args.pcs + 1)}
    gw = Gateway(cfg.gateway, args.state, lambda: names)
    fed = attach(cfg, gw)
    assert fed is not None
    urls = {n: stand_in(n, gw.engine_keys.for_node(n), args.ttft_ms / 1000.0) for n in names}
    # For bench/federation.py's overhead figure: each stand-in's address and key, to call it directly.
    (args.state / "engines.json").write_text(json.dumps({n: {"url": u, "key": gw.engine_keys.for_node(n)}
                                                         for n, u in urls.items()}))
    pcs_file = args.state / "pcs.json"
    if not pcs_file.exists():
        pcs_file.write_text(json.dumps({n: "healthy" for n in names}))
    base = sample_report()

    def report_loop() -> None:
        while True:
            try:
                states = json.loads(pcs_file.read_text())
            except (OSError, ValueError):
                states = {}
            for n, url in urls.items():
                s = states.get(n, "healthy")
                if s == "down":
                    continue  # no heartbeat: stale after stale_after_s
                gw.on_report(n, replace(base, engine=EngineReport(
                    state=EngineState.HEALTHY, model=args.model, endpoint=url, requests_running=0,
                    requests_waiting=5 if s == "busy" else 0)))
            time.sleep(0.5)

    threading.Thread(target=report_loop, daemon=True).start()
    listeners = gateway_listeners(cfg, gw, fed)
    gw.start()
    fed.start()
    for listener in listeners:
        listener.start()
    print("ready", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    for listener in reversed(listeners):
        listener.stop()
    fed.stop()
    gw.stop()


if __name__ == "__main__":
    main()
