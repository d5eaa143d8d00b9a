"""The gateway's policy, keys, ledger and HTTP behaviour, against an engine stand-in served by
a real uvicorn on loopback (the namespace-testbed tests use the real vLLM CPU image)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, replace

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client import generate_latest

from garage_node.core.wire import EngineReport, EngineState
from garage_node.head.config import GatewaySection
from garage_node.head.gateway.app import create_gateway_app
from garage_node.head.gateway.gateway import KEY_CACHE_S, Gateway
from garage_node.head.gateway.keys import KeyError_, KeyStore
from garage_node.head.gateway.ledger import Ledger
from garage_node.head.gateway.router import Router
from garage_node.head.gateway.store import Store
from garage_node.head.gateway.table import EndpointTable
from testing.fakes import FakeClock, sample_report

MODEL = "tiny"


# ---------------------------------------------------------------- router


@dataclass
class T:
    node_id: str
    inflight: int = 0
    kv_cache_usage_pct: float = 0.0

    @property
    def load(self) -> int:
        return self.inflight


def test_router_least_load_then_affinity():
    r = Router(block_chars=4)
    a, b = T("a", inflight=3), T("b", inflight=1)
    prompt = r.blocks("system: you are kind. user: hi")
    first = r.choose([a, b], prompt)
    assert first.node_id == "b" and first.reason == "least-load"
    r.served(prompt, "b")
    # b is now busier than a, but shares the prefix: affinity keeps it there.
    b.inflight = 5
    again = r.choose([a, b], r.blocks("system: you are kind. user: hello there"))
    assert again.node_id == "b" and again.reason == "affinity" and again.match > 0.3


def test_router_balance_overrules_affinity_when_skewed():
    r = Router(block_chars=4, balance_abs=64, balance_rel=1.5)
    blocks = r.blocks("shared prefix " * 10)
    r.served(blocks, "b")
    a, b = T("a", inflight=10), T("b", inflight=100)
    assert r.choose([a, b], blocks).reason == "balance"
    b.inflight = 70  # skewed by 60 requests: not past balance_abs
    assert r.choose([a, b], blocks).node_id == "b"


def test_router_defaults_let_a_prompt_group_leave_a_pc_a_few_requests_busier():
    # A gaming PC runs a few requests at once: a skew of 3 already overrules affinity, and the
    # group then belongs to the PC that took it (the next request of the group follows).
    r = Router(block_chars=4)
    blocks = r.blocks("shared system prompt " * 10)
    r.served(blocks, "slow")
    slow, fast = T("slow", inflight=4), T("fast", inflight=1)
    d = r.choose([slow, fast], blocks)
    assert (d.node_id, d.reason) == ("fast", "balance")
    r.served(blocks, "fast")
    slow.inflight, fast.inflight = 1, 2
    d = r.choose([slow, fast], blocks)
    assert (d.node_id, d.reason) == ("fast", "affinity")


def test_router_no_affinity_below_threshold_and_bounded_memory():
    r = Router(block_chars=4, max_entries=50)
    r.served(r.blocks("abcd"), "b")
    d = r.choose([T("a"), T("b", inflight=1)], r.blocks("abcd" + "x" * 400))
    assert d.node_id == "a" and d.match < 0.3
    for i in range(100):
        r.served(r.blocks(f"{i:04d}" * 3), "a")
    assert len(r._prefixes) <= 50
    assert r.choose([], []) is None


# ---------------------------------------------------------------- table


def report(state=EngineState.HEALTHY, model=MODEL, endpoint="http://127.0.0.1:1", draining=False, running=0):
    base = sample_report()
    return replace(base, engine=EngineReport(state=state, model=model, endpoint=endpoint, draining=draining,
                                             requests_running=running))


def test_table_takes_only_healthy_fresh_undrained_pcs():
    clock = FakeClock()
    t = EndpointTable(stale_after_s=15, clock=clock)
    t.update("n1", report())
    t.update("n2", report(draining=True))
    t.update("n3", report(state=EngineState.STARTING))
    assert [e.node_id for e in t.serving(MODEL)] == ["n1"]
    assert [(m.model, m.pcs_serving, m.pcs_known) for m in t.models()] == [(MODEL, 1, 3)]
    t.suspend("n1", 10)
    assert t.serving(MODEL) == []
    clock.advance(11)
    assert [e.node_id for e in t.serving(MODEL)] == ["n1"]
    clock.advance(5)  # 16 s since the last heartbeat
    assert t.serving(MODEL) == [] and t.models() == []
    t.update("n1", report(model=None, endpoint=None))  # the engine stopped
    assert t.snapshot() == [] or all(e.node_id != "n1" for e in t.snapshot())


# ---------------------------------------------------------------- keys and ledger


def test_keys_are_stored_hashed_and_checked(tmp_path):
    store = Store(tmp_path / "gateway.db")
    keys = KeyStore(store)
    key, secret = keys.create("alice", now=100.0, models=("tiny",), rpm=5, ttl_s=60)
    assert secret.startswith("gk-") and key.hint == secret[:8]
    assert secret not in (tmp_path / "gateway.db").read_bytes().decode("latin-1")
    assert keys.lookup(secret).name == "alice" and keys.lookup(secret + "x") is None
    assert keys.lookup("not-a-key") is None
    assert key.state(159.0) == "active" and key.state(160.0) == "expired"
    with pytest.raises(KeyError_, match="exists already"):
        keys.create("alice", now=1.0)
    with pytest.raises(KeyError_, match="not usable"):
        keys.create("bad name", now=1.0)
    with pytest.raises(KeyError_, match="positive"):
        keys.create("bob", now=1.0, rpm=0)
    assert keys.revoke("alice", now=120.0).state(121.0) == "revoked"
    with pytest.raises(KeyError_, match="no key"):
        keys.revoke("nobody", now=1.0)


def test_ledger_batches_and_survives_a_restart(tmp_path):
    clock = FakeClock(wall=86400 * 100 + 3600 * 5)
    ledger = Ledger(Store(tmp_path / "gateway.db"), clock)
    ledger.add("alice", "n1", MODEL, 10, 5)
    ledger.add("alice", "n2", MODEL, 3, 4)
    # Unwritten counts are visible already.
    assert ledger.node_totals("n1").today == 15 and ledger.key_tokens("alice") == 22
    assert ledger.flush() == 2
    clock.advance(86400)  # the next day
    ledger.add("bob", "n1", MODEL, 1, 1)
    ledger.flush()
    again = Ledger(Store(tmp_path / "gateway.db"), clock)
    assert again.node_totals("n1").total == 17 and again.node_totals("n1").today == 2
    by_node = {r.group: r for r in again.usage("node")}
    assert by_node["n1"].requests == 2 and by_node["n1"].total_tokens == 17
    assert [r.group for r in again.usage("key")] == ["alice", "bob"]
    assert {n: t.total for n, t in again.node_totals_all().items()} == {"n1": 17, "n2": 7}
    with pytest.raises(ValueError):
        again.usage("colour")


# ---------------------------------------------------------------- the HTTP path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Engine:
    """An engine stand-in speaking vLLM's OpenAI dialect, with a switch to misbehave."""

    def __init__(self, name: str, key: str) -> None:
        self.name, self.key = name, key
        self.mode = "ok"  # "ok", "503", "break-stream", "stall-stream"
        self.calls: list[dict] = []
        app = FastAPI()

        @app.post("/v1/embeddings")
        async def embed(request: Request):
            if request.headers.get("authorization") != f"Bearer {self.key}":
                return JSONResponse({"error": {"message": "Unauthorized"}}, status_code=401)
            body = await request.json()
            self.calls.append(body)
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            return {"object": "list", "model": body["model"],
                    "data": [{"object": "embedding", "index": i, "embedding": [0.5, -0.25]} for i in range(len(inputs))],
                    "usage": {"prompt_tokens": 4 * len(inputs), "total_tokens": 4 * len(inputs)}}

        @app.post("/v1/completions")
        @app.post("/v1/chat/completions")
        async def complete(request: Request):
            if request.headers.get("authorization") != f"Bearer {self.key}":
                return JSONResponse({"error": {"message": "Unauthorized"}}, status_code=401)
            body = await request.json()
            self.calls.append(body)
            if self.mode == "503":
                return JSONResponse({"error": "overloaded"}, status_code=503)
            usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
            if not body.get("stream"):
                return {"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                        "choices": [{"index": 0, "text": f"from {self.name}", "finish_reason": "length"}], "usage": usage}
            with_usage = (body.get("stream_options") or {}).get("include_usage")

            async def events():
                for word in ("a", "b", "c"):
                    chunk = {"id": "cmpl-1", "model": body["model"], "choices": [{"index": 0, "text": word}]}
                    if with_usage:
                        chunk["usage"] = None
                    yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"  # compact, as vLLM
                    if self.mode == "break-stream":
                        raise RuntimeError("engine died")
                    if self.mode == "stall-stream":
                        await asyncio.sleep(3600)  # alive, connected, silent
                if with_usage:
                    yield f"data: {json.dumps({'id': 'cmpl-1', 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)


@pytest.fixture
def gw(tmp_path):
    cfg = GatewaySection(connect_timeout_s=1.0, stream_idle_timeout_s=5.0)
    g = Gateway(cfg, tmp_path, lambda: {"n1": "alice-pc", "n2": "bob-pc"})
    engines = {n: Engine(n, g.engine_keys.for_node(n)) for n in ("n1", "n2")}
    for n, e in engines.items():
        g.on_report(n, report(endpoint=e.url))
    _, secret = g.keys.create("tester", now=time.time())
    g.secret = secret
    g.engines = engines
    yield g
    for e in engines.values():
        e.stop()
    g.stop()


def call(g, method, path, body=None, key=None):
    async def go():
        transport = httpx.ASGITransport(app=create_gateway_app(g))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            headers = {"authorization": f"Bearer {key or g.secret}"}
            r = await c.request(method, path, json=body, headers=headers)
            await g.proxy.close()
            return r
    return asyncio.run(go())


def test_completion_is_passed_through_with_the_pc_named(gw):
    r = call(gw, "POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 3})
    assert r.status_code == 200
    body = r.json()
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert r.headers["x-garage-node"] in ("alice-pc", "bob-pc")
    assert body["choices"][0]["text"] == f"from {r.headers['x-garage-node-id']}"
    assert gw.ledger.key_tokens("tester") == 10


def test_stream_usage_is_captured_and_stripped_unless_asked(gw):
    r = call(gw, "POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "stream": True})
    assert r.status_code == 200
    lines = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == ["a", "b", "c"]
    assert all("usage" not in c for c in chunks)
    engine_body = next(e for e in gw.engines.values() if e.calls).calls[-1]
    assert engine_body["stream_options"] == {"include_usage": True}
    assert gw.ledger.key_tokens("tester") == 10
    asked = call(gw, "POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                      "stream": True, "stream_options": {"include_usage": True}})
    chunks = [json.loads(line[6:]) for line in asked.text.splitlines() if line.startswith("data: {")]
    assert chunks[-1]["usage"]["total_tokens"] == 10 and chunks[-1]["choices"] == []


def test_failover_before_the_first_byte(gw):
    gw.engines["n1"].mode = "503"
    gw.engines["n2"].stop()  # refuses connections
    gw.on_report("n3", report(endpoint=gw.engines["n1"].url))  # n3 shares n1's engine stand-in
    gw.engines["n1"].mode = "ok"
    gw.engines["n1"].key = gw.engine_keys.for_node("n1")
    gw.table.get("n1").inflight = 5  # the busiest: the router tries the other two first
    ok = 0
    for _ in range(4):
        r = call(gw, "POST", "/v1/completions", {"model": MODEL, "prompt": "x"})
        ok += r.status_code == 200
        assert r.headers.get("x-garage-node-id") in (None, "n1")
    assert ok == 4  # n2 refused, n3 (wrong key: 401) was passed over, n1 answered every time
    retries = [s for f in text_string_to_metric_families(generate_latest(gw.metrics.registry).decode())
               for s in f.samples if s.name == "garage_gateway_retries_total"]
    assert retries and retries[0].value >= 1


def test_a_stream_that_breaks_ends_with_an_error_event(gw):
    for e in gw.engines.values():
        e.mode = "break-stream"
    r = call(gw, "POST", "/v1/completions", {"model": MODEL, "prompt": "x", "stream": True})
    assert r.status_code == 200
    data = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert json.loads(data[0])["choices"][0]["text"] == "a"
    assert json.loads(data[-2])["error"]["code"] == "upstream_lost" and data[-1] == "[DONE]"
    assert gw.ledger.key_tokens("tester") == 1  # the one content event that came


def test_a_stream_whose_pc_falls_silent_ends_after_the_idle_limit(tmp_path):
    """stream_idle_timeout_s holds without a timer per event: the watchdog closes the engine's
    response, the client gets the error event and [DONE], and the PC's slot is given back."""
    g = Gateway(GatewaySection(stream_idle_timeout_s=1.0), tmp_path, lambda: {"n1": "alice-pc"})
    engine = Engine("n1", g.engine_keys.for_node("n1"))
    try:
        g.on_report("n1", report(endpoint=engine.url))
        _, g.secret = g.keys.create("tester", now=time.time())
        engine.mode = "stall-stream"
        t0 = time.monotonic()
        r = call(g, "POST", "/v1/completions", {"model": MODEL, "prompt": "x", "stream": True})
        took = time.monotonic() - t0
        data = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert json.loads(data[0])["choices"][0]["text"] == "a"
        assert json.loads(data[-2])["error"]["code"] == "upstream_lost" and data[-1] == "[DONE]"
        assert 1.0 <= took < 10, took  # the limit, plus at most a sweep or two; not the engine's hour
        assert all(ep.inflight == 0 for ep in g.table.snapshot())
    finally:
        engine.stop()
        g.stop()


def test_errors_are_openai_shaped_and_never_echo_the_key(gw):
    bad = call(gw, "GET", "/v1/models", key="gk-not-a-real-key")
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    assert "gk-not-a-real-key" not in bad.text
    assert call(gw, "POST", "/v1/completions", {"prompt": "no model"}).status_code == 400
    unknown = call(gw, "POST", "/v1/completions", {"model": "gpt-9", "prompt": "x"})
    assert unknown.status_code == 404 and MODEL in unknown.json()["error"]["message"]
    _, limited = gw.keys.create("limited", now=time.time(), rpm=1, models=(MODEL,))
    assert call(gw, "POST", "/v1/completions", {"model": MODEL, "prompt": "x"}, key=limited).status_code == 200
    over = call(gw, "POST", "/v1/completions", {"model": MODEL, "prompt": "x"}, key=limited)
    assert over.status_code == 429 and int(over.headers["retry-after"]) >= 1
    _, other = gw.keys.create("other-model", now=time.time(), models=("big",))
    assert call(gw, "POST", "/v1/completions", {"model": MODEL, "prompt": "x"}, key=other).status_code == 404
    _, quota = gw.keys.create("quota", now=time.time(), quota_tokens=5)
    assert call(gw, "POST", "/v1/completions", {"model": MODEL, "prompt": "x"}, key=quota).status_code == 200
    spent = call(gw, "POST", "/v1/completions", {"model": MODEL, "prompt": "x"}, key=quota)
    assert spent.status_code == 429 and spent.json()["error"]["code"] == "insufficient_quota"
    gw.keys.revoke("tester", now=time.time())
    time.sleep(KEY_CACHE_S + 0.1)  # the gateway holds a key it checked for this long
    assert call(gw, "GET", "/v1/models").json()["error"]["code"] == "revoked_api_key"
    for n in ("n1", "n2"):
        gw.on_report(n, report(endpoint=gw.engines[n].url, draining=True))
    none = call(gw, "POST", "/v1/completions", {"model": MODEL, "prompt": "x"}, key=limited)
    assert none.status_code in (429, 503)


def test_models_lists_what_pcs_serve_and_metrics_parse(gw):
    r = call(gw, "GET", "/v1/models")
    assert r.json()["data"][0]["id"] == MODEL and r.json()["data"][0]["pcs_serving"] == 2
    call(gw, "POST", "/v1/completions", {"model": MODEL, "prompt": "x"})
    gw.ledger.flush()
    names = {s.name for f in text_string_to_metric_families(generate_latest(gw.metrics.registry).decode())
             for s in f.samples}
    assert {"garage_gateway_requests_total", "garage_gateway_tokens_total", "garage_gateway_endpoints",
            "garage_node_engine_state", "garage_node_tokens_served",
            "garage_gateway_time_to_first_token_seconds_bucket"} <= names


def test_heartbeat_extras_give_each_pc_its_own_key_and_totals(gw):
    call(gw, "POST", "/v1/completions", {"model": MODEL, "prompt": "x"})
    e1, e2 = gw.node_extras("n1"), gw.node_extras("n2")
    assert e1.engine_api_key != e2.engine_api_key and e1.engine_api_key.startswith("gne-")
    assert e1.tokens_served.total + e2.tokens_served.total == 10


def test_router_in_a_large_region_picks_only_usable_pcs_and_near_least_load():
    r = Router()
    targets = [T(f"n{i}", inflight=i % 10) for i in range(500)]
    usable = lambda t: int(t.node_id[1:]) % 3 == 0  # noqa: E731 (two thirds are starting or draining)
    picks = [r.choose(targets, [], usable).node_id for _ in range(300)]
    assert all(int(p[1:]) % 3 == 0 for p in picks)
    loads = [targets[int(p[1:])].inflight for p in picks]
    assert sum(loads) / len(loads) < 4.5  # the mean of a random usable PC would be 4.5
    assert r.choose(targets, [], lambda t: t.node_id == "n499").node_id == "n499"  # found by the full scan
    assert r.choose(targets, [], lambda t: False) is None


def test_events_are_relayed_with_usage_found_and_stripped_in_any_spacing():
    from garage_node.head.gateway.proxy import _pass_event

    compact = '{"id":"c","choices":[{"index":0,"text":"a"}],"usage":null}'
    spaced = '{"id": "c", "choices": [{"index": 0, "text": "a"}], "usage": null}'
    for data in (compact, spaced):
        out, usage, content = _pass_event(data, client_wants_usage=False)
        assert usage is None and content == 1 and b"usage" not in out and json.loads(out[6:])["choices"][0]["text"] == "a"
        out, _, _ = _pass_event(data, client_wants_usage=True)
        assert b"usage" in out
    final = '{"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}'
    assert _pass_event(final, client_wants_usage=False) == (b"", (3, 2), 0)
    assert _pass_event(final, client_wants_usage=True)[1:] == ((3, 2), 0)
    assert _pass_event("[DONE]", False) == (b"data: [DONE]\n\n", None, 0)


def test_round_robin_takes_usable_pcs_in_turn():
    r = Router(policy="round-robin")
    targets = [T("a"), T("b", inflight=50), T("c")]
    picks = [r.choose(targets, [], lambda t: t.node_id != "c").node_id for _ in range(4)]
    assert picks == ["a", "b", "a", "b"]  # blind to load, skips what cannot take requests


def _relay_to_a_client_that_leaves(g, leave_after_sends: int, spec: str = "2.4"):
    """Forward a stream, then play a client whose connection fails on send number
    `leave_after_sends` + 1 (0: before the response starts, so the relay never runs). ASGI
    spec 2.3 (uvicorn's): the client's leaving arrives as http.disconnect instead, and the
    request's listener cancels the stream (RelayResponse)."""
    from garage_node.head.gateway.app import _call
    from garage_node.head.gateway.proxy import RelayResponse

    async def go():
        key = g.keys.lookup(g.secret)
        call = _call("/v1/completions", {"model": MODEL, "prompt": "x", "stream": True}, key, time.monotonic(), g.router)
        response = await g.proxy.forward(call, None)
        assert isinstance(response, RelayResponse)
        busy = sum(ep.inflight for ep in g.table.snapshot())
        ended = []
        response.on_end.append(lambda: ended.append(True))
        sends = []
        gone = asyncio.Event()

        async def send(message):
            if len(sends) == leave_after_sends:
                gone.set()
                if spec == "2.4":
                    raise OSError("the client went away")
                await asyncio.sleep(3600)  # blocked until the listener cancels the stream
            sends.append(message)

        async def receive():
            if spec == "2.4":
                await asyncio.sleep(3600)
            await gone.wait()
            return {"type": "http.disconnect"}

        if spec == "2.4":
            # Starlette re-raises the send's OSError as its ClientDisconnect in some versions:
            # what is tested is the slot afterwards, not the exception's type.
            with pytest.raises(Exception):  # noqa: B017
                await response({"type": "http", "asgi": {"spec_version": spec}}, receive, send)
        else:
            await response({"type": "http", "asgi": {"spec_version": spec}}, receive, send)
        after = sum(ep.inflight for ep in g.table.snapshot())
        await g.proxy.close()
        return busy, after, ended, response.slot.resp.closed

    return asyncio.run(go())


def test_a_stream_the_client_left_before_it_began_gives_its_pc_back(gw):
    busy, after, ended, closed = _relay_to_a_client_that_leaves(gw, 0)
    assert (busy, after, ended, closed) == (1, 0, [True], True)
    assert gw.ledger.key_tokens("tester") == 0  # nothing reached the client


@pytest.mark.parametrize("spec", ["2.4", "2.3"])
def test_a_stream_the_client_left_midway_gives_its_pc_back_and_is_accounted(gw, spec):
    busy, after, ended, closed = _relay_to_a_client_that_leaves(gw, 2, spec)  # the start and one event went out
    assert (busy, after, ended, closed) == (1, 0, [True], True)
    gw.ledger.flush()
    assert gw.ledger.key_tokens("tester") >= 1  # the events relayed, counted at once, not at collection


def test_metrics_show_each_pcs_load_suspensions_and_heartbeat_times(gw):
    def samples():
        text = generate_latest(gw.metrics.registry).decode()
        return [s for f in text_string_to_metric_families(text) for s in f.samples]

    gw.table.get("n1").inflight = 3
    gw.table.suspend("n2")
    gw.on_heartbeat_s(0.004, 200)
    s = samples()
    inflight = {x.labels["name"]: x.value for x in s if x.name == "garage_gateway_inflight"}
    assert inflight == {"alice-pc": 3, "bob-pc": 0}
    states = {x.labels["state"]: x.value for x in s if x.name == "garage_gateway_endpoints"}
    assert states == {"healthy": 1, "suspended": 1}
    count = [x for x in s if x.name == "garage_head_heartbeat_seconds_count"]
    assert [(x.labels["status"], x.value) for x in count] == [("200", 1.0)]


def test_embeddings_are_passed_through_and_their_prompt_tokens_accounted(gw):
    r = call(gw, "POST", "/v1/embeddings", {"model": MODEL, "input": ["one", "two"]})
    assert r.status_code == 200 and r.headers["x-garage-node"] in ("alice-pc", "bob-pc")
    assert [d["embedding"] for d in r.json()["data"]] == [[0.5, -0.25], [0.5, -0.25]]
    # "stream" means nothing to embeddings: the body goes through as the client sent it.
    r = call(gw, "POST", "/v1/embeddings", {"model": MODEL, "input": "three", "stream": True})
    assert r.status_code == 200 and r.json()["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    sent = [c for e in gw.engines.values() for c in e.calls]
    assert "stream_options" not in sent[-1]
    gw.ledger.flush()
    assert gw.ledger.key_tokens("tester") == 12


def test_a_pc_gone_silent_leaves_the_healthy_endpoints_and_is_forgotten(tmp_path):
    """/v1/models drops a PC silent past stale_after_s; the metrics must not go on calling it
    healthy, and after FORGET_AFTER_S (or once the registry no longer lists it) the gateway
    forgets it, prefixes included."""
    from garage_node.head.gateway.gateway import FORGET_AFTER_S, NAMES_TTL_S

    clock = FakeClock()
    registered = {"n1": "alice-pc", "n2": "bob-pc", "n3": "carol-pc"}
    g = Gateway(GatewaySection(), tmp_path, lambda: dict(registered), clock=clock)
    for n in registered:
        g.on_report(n, report())
    blocks = g.router.blocks("a shared system prompt " * 40)
    g.router.served(blocks, "n1")

    def healthy():
        text = generate_latest(g.metrics.registry).decode()
        return {s.labels["state"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "garage_gateway_endpoints"}

    assert healthy() == {"healthy": 3}
    clock.advance(NAMES_TTL_S + 1)
    g.on_report("n2", report())
    g.on_report("n3", report())
    del registered["n3"]  # revoked: its heartbeats are refused from now on
    assert healthy() == {"healthy": 3}  # n3 is still fresh: unregistered but not stale, it stays
    clock.advance(16)  # n1 and n3 past stale_after_s (n2 keeps reporting)
    g.on_report("n2", report())
    assert healthy() == {"healthy": 1, "stale": 1}  # n3 forgotten (unregistered and stale), n1 stale
    assert [m.pcs_known for m in g.table.models()] == [1]
    clock.advance(FORGET_AFTER_S)
    g.on_report("n2", report())
    assert healthy() == {"healthy": 1}
    assert g.table.get("n1") is None and g.table.get("n3") is None
    assert not [h for h in blocks if g.router._prefixes.get(h) == "n1"]
    assert {n for n, _ in g.table.fresh_reports()} == {"n2"}
    g.stop()
