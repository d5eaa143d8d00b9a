"""The head's side of issue #18: the region's catalog in the registry, `garage-node head model`
(the real CLI against a real head state dir), the placement loop (a real registry, H1's placer,
reports written through the registry's own API), the assignment in the heartbeat's answer, the
gateway's demand, and a request for a catalog model nobody serves yet held at the gateway."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from dataclasses import replace

import httpx
import pytest

from garage_node.core.wire import Assignment, EngineReport, EngineState, encode
from garage_node.head.config import GatewaySection
from garage_node.head.gateway.app import create_gateway_app
from garage_node.head.gateway.demand import DEFAULT_MAX_TOKENS, Demand
from garage_node.head.gateway.gateway import Gateway
from garage_node.head.registry import Registry, RegionModel
from testing.fakes import FakeClock, sample_report
from tests.unit.test_gateway import Engine

NET = ipaddress.IPv4Network("100.96.0.0/16")
TINY = "tiny-llama-test"  # a catalog model every test catalog has (configs/models.toml)

EXTRA_MODEL = """
[models.tiny-b]
id = "garage-node/tiny-b"
parameters = 1_000_000
num_layers = 2
num_attention_heads = 4
num_kv_heads = 2
head_dim = 16
default_context_length = 512
min_compute_capability = "7.0"
test_only = true

[models.tiny-b.quantizations.fp32]
bytes_per_param = 4.0
dtype = "float32"
"""


# ---------------------------------------------------------------- the registry's part


def test_region_models_imports_and_assignments_survive_a_reopen(tmp_path):
    reg = Registry(tmp_path / "r.sqlite", NET)
    reg.region.put_model(RegionModel("a", 1, None, 2.0))
    first = reg.region.put_model(RegionModel("b", 0, 3, 1.0))
    again = reg.region.put_model(RegionModel("b", 2, 4, 0.5))  # changed terms, same place in the list
    assert again.added_at == first.added_at
    reg.region.import_entries([("model", "tiny-b", {"id": "x"}), ("image", "img:1", {"cuda": "12.8"})], "/f.toml")
    reg.region.store_assignments({"n1": encode(Assignment(generation=3, model="a", reason="r"))})
    reg.region.store_state({"models": [{"model": "a"}]})
    reg.close()

    reopened = Registry(tmp_path / "r.sqlite", NET)
    assert [(m.model, m.min_replicas, m.max_replicas, m.weight) for m in reopened.region.models()] == \
        [("a", 1, None, 2.0), ("b", 2, 4, 0.5)]
    assert [(e.kind, e.name, e.body, e.source) for e in reopened.region.entries()] == \
        [("image", "img:1", {"cuda": "12.8"}, "/f.toml"), ("model", "tiny-b", {"id": "x"}, "/f.toml")]
    assert reopened.region.assignments()["n1"]["generation"] == 3
    state, at = reopened.region.state()
    assert state == {"models": [{"model": "a"}]} and at == pytest.approx(time.time(), abs=60)
    assert reopened.region.remove_model("a") and not reopened.region.remove_model("a")
    assert [m.model for m in reopened.region.models()] == ["b"]


def test_a_stored_generation_is_never_lowered(tmp_path):
    reg = Registry(tmp_path / "r.sqlite", NET)
    reg.region.store_assignments({"n1": encode(Assignment(generation=5, model="a"))})
    with pytest.raises(ValueError, match="below the stored 5"):
        reg.region.store_assignments({"n2": encode(Assignment(generation=1, model="a")),
                                      "n1": encode(Assignment(generation=4, model="b"))})
    # All or nothing: n2's row was not written either.
    assert reg.region.assignments() == {"n1": encode(Assignment(generation=5, model="a"))}


# ---------------------------------------------------------------- demand


def test_demand_is_a_sliding_window_of_tokens_queue_and_unserved():
    clock = FakeClock()
    d = Demand(window_s=60, clock=clock)
    for _ in range(6):
        d.arrived("a", body_bytes=400, max_tokens=100)  # 100 prompt tokens (estimate) + 100
    d.arrived("a", body_bytes=40, max_tokens=None)  # no max_tokens: the default
    d.opened("a")
    d.opened("a", held=True)
    d.unserved("a")
    a = d.snapshot()["a"]
    assert a.tokens_per_s == pytest.approx((6 * 200 + 10 + DEFAULT_MAX_TOKENS) / 60)
    assert (a.queue_depth, a.held) == (2, 1) and a.unserved_per_s == pytest.approx(1 / 60)
    clock.advance(30)
    d.arrived("a", body_bytes=0, max_tokens=60)
    clock.advance(31)  # the first second's requests left the window; the one at 30 s is in it
    a = d.snapshot()["a"]
    assert a.tokens_per_s == pytest.approx(60 / 60) and a.unserved_per_s == 0.0 and a.queue_depth == 2
    d.closed("a")
    d.closed("a", held=True)
    clock.advance(60)
    assert d.snapshot() == {}  # nothing left in the window, nothing open: the model leaves the table


def test_demand_tracks_a_bounded_number_of_models():
    d = Demand(clock=FakeClock(), max_models=3)
    for i in range(10):
        d.arrived(f"m{i}", 10, 10)
    assert sorted(d.snapshot()) == ["m0", "m1", "m2"]


# ---------------------------------------------------------------- the hold at the gateway


@pytest.fixture
def held_gw(tmp_path):
    cfg = GatewaySection(connect_timeout_s=1.0, hold_s=3.0, hold_queue=2)
    g = Gateway(cfg, tmp_path, lambda: {"n1": "alice-pc"})
    g.placed = lambda: frozenset({"wanted"})  # the region's catalog, as the placement loop says
    _, g.secret = g.keys.create("tester", now=time.time())
    g.engine = Engine("n1", g.engine_keys.for_node("n1"))
    yield g
    g.engine.stop()
    g.stop()


def _report(model: str, endpoint: str, state=EngineState.HEALTHY):
    return replace(sample_report(), engine=EngineReport(state=state, model=model, endpoint=endpoint))


async def _post(client: httpx.AsyncClient, g: Gateway, model: str) -> httpx.Response:
    return await client.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 3},
                             headers={"authorization": f"Bearer {g.secret}"})


def test_a_request_for_a_catalog_model_is_held_until_a_pc_serves_it(held_gw):
    g = held_gw

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_gateway_app(g)), base_url="http://gw",
                                     timeout=30) as c:
            request = asyncio.create_task(_post(c, g, "wanted"))
            await asyncio.sleep(0.6)
            assert not request.done() and g.held == 1
            waiting = g.demand.snapshot()["wanted"]
            assert waiting.held == 1 and waiting.queue_depth == 1 and waiting.unserved_per_s > 0
            g.on_report("n1", _report("wanted", g.engine.url, EngineState.STARTING))  # loading: still held
            await asyncio.sleep(0.6)
            assert not request.done()
            g.on_report("n1", _report("wanted", g.engine.url))  # healthy: served
            r = await asyncio.wait_for(request, 5)
            await g.proxy.close()
            return r

    started = time.monotonic()
    r = asyncio.run(go())
    assert r.status_code == 200, r.text
    assert r.headers["x-garage-node-id"] == "n1" and r.json()["choices"][0]["text"] == "from n1"
    assert 1.2 <= time.monotonic() - started < 3.0  # held, then served within a poll of the PC's arrival
    assert g.held == 0 and g.demand.snapshot()["wanted"].queue_depth == 0


def test_past_hold_s_a_held_request_gets_503_loading_and_a_full_queue_at_once(held_gw):
    g = held_gw

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_gateway_app(g)), base_url="http://gw",
                                     timeout=30) as c:
            held = [asyncio.create_task(_post(c, g, "wanted")) for _ in range(2)]
            await asyncio.sleep(0.3)
            t = time.monotonic()
            over = await _post(c, g, "wanted")  # hold_queue = 2 are waiting: refused at once
            refused_in = time.monotonic() - t
            rs = await asyncio.gather(*held)
            unknown = await _post(c, g, "not-in-catalog")
            return over, refused_in, rs, unknown

    started = time.monotonic()
    over, refused_in, rs, unknown = asyncio.run(go())
    assert over.status_code == 503 and refused_in < 0.5 and "loading" in over.json()["error"]["message"]
    for r in rs:
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert int(r.headers["retry-after"]) >= 1
        assert "wanted is loading" in r.json()["error"]["message"]
    assert 3.0 <= time.monotonic() - started < 6.0  # hold_s
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert "not-in-catalog" not in g.demand.snapshot()  # an unknown name is not counted
    assert g.held == 0


def test_a_served_model_is_not_held_and_its_demand_is_counted(held_gw):
    g = held_gw
    g.on_report("n1", _report("wanted", g.engine.url))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_gateway_app(g)), base_url="http://gw") as c:
            r = await _post(c, g, "wanted")
            await g.proxy.close()
            return r

    r = asyncio.run(go())
    assert r.status_code == 200
    d = g.demand.snapshot()["wanted"]
    assert d.requests_per_s == pytest.approx(1 / 60) and d.unserved_per_s == 0 and d.queue_depth == 0
