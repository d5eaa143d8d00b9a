"""The head's side of issue #18: the region's catalog in the registry, `garage-node head model`
(the real CLI against a real head state dir), the placement loop (a real registry, H1's placer,
reports written through the registry's own API), the assignment in the heartbeat's answer, the
gateway's demand, and a request for a catalog model nobody serves yet held at the gateway."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from garage_node.cli import main
from garage_node.core.wire import (Assignment, EngineReport, EngineState, HeartbeatExtras, HeartbeatReply,
                                   PlacementFacts, decode, encode)
from garage_node.head.api import ApiHooks
from garage_node.head.config import GatewaySection, HeadConfig, HeadSection, PlacementSection, load_head_config
from garage_node.head.gateway.app import create_gateway_app
from garage_node.head.gateway.demand import DEFAULT_MAX_TOKENS, Demand
from garage_node.head.gateway.errors import ClientGone
from garage_node.head.gateway.gateway import Gateway
from garage_node.head.placement import ModelError, PlacementLoop, add_model, import_catalog, region_catalog
from garage_node.head.registry import Registry, RegionModel
from garage_node.head.reports import with_extra
from garage_node.placement.catalog import PACKAGED_CATALOG, CatalogError
from testing.fakes import FakeClock, sample_report
from testing.headapi import enrolled_pc
from tests.unit.test_gateway import Engine

NET = ipaddress.IPv4Network("100.96.0.0/16")
TINY = "tiny-llama-test"  # a catalog model every test catalog has (configs/models.toml)
# The names engines serve them under (--served-model-name: the catalog's repo id), which
# clients ask the gateway for and the endpoint table and the demand are keyed by.
TINY_ID = "garage/tiny-llama-test"
B_ID = "garage-node/tiny-b"

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
cpu = true

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
    assert time.monotonic() - started >= 1.2  # held through both waits, not refused or served early
    assert g.held == 0 and g.demand.snapshot()["wanted"].queue_depth == 0


def test_past_hold_s_a_held_request_gets_503_loading_and_a_full_queue_at_once(held_gw):
    g = held_gw

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_gateway_app(g)), base_url="http://gw",
                                     timeout=30) as c:
            held = [asyncio.create_task(_post(c, g, "wanted")) for _ in range(2)]
            await asyncio.sleep(0.3)
            over = await _post(c, g, "wanted")  # hold_queue = 2 are waiting: refused at once,
            refused_first = not any(h.done() for h in held)  # not after waiting out hold_s
            rs = await asyncio.gather(*held)
            unknown = await _post(c, g, "not-in-catalog")
            return over, refused_first, rs, unknown

    started = time.monotonic()
    over, refused_first, rs, unknown = asyncio.run(go())
    assert over.status_code == 503 and refused_first and "loading" in over.json()["error"]["message"]
    for r in rs:
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert int(r.headers["retry-after"]) >= 1
        assert "wanted is loading" in r.json()["error"]["message"]
    assert time.monotonic() - started >= 3.0  # held for hold_s before the 503
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


# ---------------------------------------------------------------- the placement loop


def head_config(tmp_path: Path, **placement) -> HeadConfig:
    return HeadConfig(head=HeadSection(state_dir=tmp_path / "state"),
                      placement=PlacementSection(catalog=str(PACKAGED_CATALOG), **placement))


def cpu_report(model: str | None = None, generation: int = 0, state=EngineState.HEALTHY,
               endpoint: str = "http://127.0.0.1:9", **facts):
    """A CPU PC's report (vLLM's CPU build: the head places only `cpu = true` models on it)."""
    engine = EngineReport(state=state, model=model, endpoint=endpoint) if model else \
        EngineReport(state=EngineState.DISABLED)
    return replace(sample_report(), engine=engine,
                   placement=PlacementFacts(device="cpu", assignment_generation=generation, **facts))


def enroll(reg: Registry, name: str) -> str:
    from garage_node.core.wireguard import generate_private_key, public_key_of

    if not any(t.id == "tok999" for t in reg.tokens()):
        reg.add_token("tok999", "t" * 43, 600, uses=None)
    return reg.enroll("tok999", "t" * 43, name, "home", public_key_of(generate_private_key())).node.id


def beat(reg: Registry, node_id: str, report) -> None:
    reg.record_heartbeat(node_id, encode(report))  # confirmed, as an authenticated heartbeat is


def test_the_loop_assigns_nothing_until_a_model_is_wanted_then_keeps_generations_across_a_restart(tmp_path):
    cfg = head_config(tmp_path)
    reg = Registry(tmp_path / "r.sqlite", NET)
    pcs = [enroll(reg, f"pc-{i}") for i in (1, 2)]
    for n in pcs:
        beat(reg, n, cpu_report())
    loop = PlacementLoop(reg, cfg)
    result = loop.step()
    assert result.decision is None and loop.assignment(pcs[0]) is None and loop.placed() == frozenset()

    catalog = region_catalog(PACKAGED_CATALOG, [])
    add_model(reg, catalog, TINY, min_replicas=2)
    result = loop.step()
    assert set(result.changed) == set(pcs) and loop.placed() == {TINY_ID}  # held at the gateway by that name
    for n in pcs:
        a = loop.assignment(n)
        assert a is not None and a.model == TINY and a.generation == 1 and a.quantization == "fp32"
        assert reg.region.assignments()[n]["generation"] == 1  # stored before any PC hears of it
    view = next(v for v in result.decision.models if v.model == TINY)
    assert view.wanted == 2 and sorted(view.pcs) == sorted(pcs)
    assert loop.step().changed == {}  # nothing new: nothing changes, no generation grows

    # The PCs carry it out; the head restarts (a new registry object and loop on the same file).
    for n in pcs:
        beat(reg, n, cpu_report(TINY_ID, generation=1))
    reg.close()
    reg2 = Registry(tmp_path / "r.sqlite", NET)
    loop2 = PlacementLoop(reg2, cfg)
    assert loop2.assignment(pcs[0]) == loop.assignment(pcs[0])  # answered before the first pass
    result = loop2.step()
    assert result.changed == {} and loop2.assignment(pcs[1]).generation == 1
    running = next(v for v in result.decision.models if v.model == TINY)
    assert running.running == 2
    listed = reg2.region.state()[0]
    assert listed["pcs"][pcs[0]]["name"] == "pc-1" and listed["pcs"][pcs[0]]["model"] == TINY

    # The operator empties the catalog: no assignment (the PCs plan for themselves), and the
    # generations stay stored, so a later assignment is newer than anything the PCs saw.
    reg2.region.remove_model(TINY)
    assert loop2.step().decision is None and loop2.assignment(pcs[0]) is None
    assert reg2.region.assignments()[pcs[0]]["generation"] == 1


def test_demand_for_a_second_model_moves_one_pc_and_the_heartbeat_answer_carries_it(tmp_path):
    cfg = head_config(tmp_path)
    extra = tmp_path / "extra.toml"
    extra.write_text(EXTRA_MODEL)
    demand: dict = {}
    holder: dict = {}
    pc = enrolled_pc(tmp_path, ApiHooks(node_extras=with_extra(lambda _n: HeartbeatExtras(), "assignment",
                                                                lambda n: holder["loop"].assignment(n) if holder else None)))
    reg = pc.registry
    other = enroll(reg, "pc-2")
    ids = [pc.node_id, other]
    assert import_catalog(reg, PACKAGED_CATALOG, extra) == ["tiny-b"]
    catalog = region_catalog(PACKAGED_CATALOG, reg.region.entries())
    add_model(reg, catalog, TINY)
    add_model(reg, catalog, "tiny-b")
    loop = holder["loop"] = PlacementLoop(reg, cfg, demand=lambda: demand)

    def post(report) -> HeartbeatReply:
        r = pc.client.post(f"/v1/nodes/{pc.node_id}/heartbeat", json={"report": encode(report)},
                           headers={"Authorization": f"Bearer {pc.enrollment['credential']}"})
        assert r.status_code == 200, r.text
        return decode(r.json(), HeartbeatReply)

    from garage_node.head.gateway.demand import ModelDemand

    demand[TINY_ID] = ModelDemand(tokens_per_s=500.0, queue_depth=4, unserved_per_s=0.0, requests_per_s=2.0, held=0)
    assert post(cpu_report()).assignment is None  # no pass yet: nothing to say
    beat(reg, other, cpu_report())
    loop.step()
    assert {loop.assignment(n).model for n in ids} == {TINY}  # demand on A only: both serve A
    assert post(cpu_report(TINY_ID, generation=1)).assignment.model == TINY
    beat(reg, other, cpu_report(TINY_ID, generation=1))

    # A load of requests for B starts: held at the gateway, so unserved.
    demand[B_ID] = ModelDemand(tokens_per_s=500.0, queue_depth=8, unserved_per_s=2.0, requests_per_s=2.0, held=8)
    result = loop.step()
    moved = [n for n in ids if loop.assignment(n).model == "tiny-b"]
    assert len(moved) == 1 and len(result.decision.moves) == 1
    assert loop.assignment(moved[0]).generation == 2 and reg.region.assignments()[moved[0]]["generation"] == 2
    entry = loop.assignment(moved[0]).catalog_entry  # imported at the head: the PCs' catalogs lack it
    assert entry is not None and (entry.name, entry.id, entry.default_context_length) == ("tiny-b", B_ID, 512)
    if moved[0] == pc.node_id:
        answer = post(cpu_report(TINY_ID, generation=1))
        assert answer.assignment.model == "tiny-b" and answer.assignment.generation == 2
        assert answer.assignment.catalog_entry == entry  # through the control API's answer
    else:
        assert post(cpu_report(TINY_ID, generation=1)).assignment.catalog_entry.name == TINY
    assert loop.switches == {TINY: 2, "tiny-b": 1}
    assert "tiny-b" in result.decision.explain[moved[0]]

    fleet = {m["model"]: m for m in loop.fleet_models()}
    assert fleet["tiny-b"]["pcs"][0]["id"] == moved[0] and fleet["tiny-b"]["demand"]["unserved_per_s"] == 2.0

    # Placement off: the heartbeat answers carry no assignment, whatever is stored.
    off = PlacementLoop(reg, head_config(tmp_path, enabled=False))
    holder["loop"] = off
    assert off.step().decision is None and post(cpu_report(TINY_ID, generation=1)).assignment is None


def test_a_model_must_be_in_the_catalog_and_an_import_is_checked_whole(tmp_path):
    reg = Registry(tmp_path / "r.sqlite", NET)
    catalog = region_catalog(PACKAGED_CATALOG, [])
    with pytest.raises(ModelError, match="head model import FILE") as e:
        add_model(reg, catalog, "no-such-model")
    assert "qwen2.5-7b" in str(e.value)
    assert add_model(reg, catalog, "Qwen/Qwen2.5-7B-Instruct").model == "qwen2.5-7b"  # a repo id names it too
    with pytest.raises(ModelError, match="--max"):
        add_model(reg, catalog, "qwen2.5-7b", min_replicas=3, max_replicas=2)
    bad = tmp_path / "bad.toml"
    bad.write_text(EXTRA_MODEL.replace("num_layers = 2", "num_layers = -2"))
    with pytest.raises(CatalogError, match="num_layers"):
        import_catalog(reg, PACKAGED_CATALOG, bad)
    assert reg.region.entries() == []


# ---------------------------------------------------------------- the CLI, against a real head state dir


def cli(capsys, config: Path, *args: str) -> tuple[int, str, str]:
    rc = main(["head", *args, "--config", str(config)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_head_model_commands_against_a_real_head(tmp_path, capsys):
    config = tmp_path / "head.toml"
    config.write_text(f'[head]\nstate_dir = "{tmp_path / "state"}"\n[api]\nadvertise_host = "127.0.0.1"\n'
                      f'[placement]\ncatalog = "{PACKAGED_CATALOG}"\n')
    rc, out, err = cli(capsys, config, "model", "list")
    assert rc == 69 and "head init" in err  # not initialised: says what to do
    assert cli(capsys, config, "init")[0] == 0
    rc, out, _ = cli(capsys, config, "model", "list")
    assert rc == 0 and "catalog is empty" in out
    assert json.loads(cli(capsys, config, "model", "list", "--json")[1])["models"] == []

    rc, _, err = cli(capsys, config, "model", "add", "tiny-b")
    assert rc == 2 and "not in the model catalog" in err and "head model import FILE" in err
    bad = tmp_path / "bad.toml"
    bad.write_text(EXTRA_MODEL.replace("head_dim = 16", "head_dim = 16\nhead_dims = 3"))
    rc, _, err = cli(capsys, config, "model", "import", str(bad))
    assert rc == 2 and "head_dims" in err and "Nothing was imported" in err
    good = tmp_path / "extra.toml"
    good.write_text(EXTRA_MODEL)
    rc, out, _ = cli(capsys, config, "model", "import", str(good), "--json")
    assert rc == 0 and json.loads(out)["imported"] == ["tiny-b"]
    rc, out, _ = cli(capsys, config, "model", "add", "tiny-b", "--min", "1", "--max", "2", "--weight", "2", "--json")
    assert rc == 0 and json.loads(out) | {"added_at": 0} == {"model": "tiny-b", "min_replicas": 1, "max_replicas": 2,
                                                             "weight": 2.0, "added_at": 0}
    listed = json.loads(cli(capsys, config, "model", "list", "--json")[1])
    assert [m["model"] for m in listed["models"]] == ["tiny-b"] and listed["models"][0]["wanted"] is None
    assert listed["models"][0]["served_as"] == B_ID  # the name clients ask the gateway for
    assert listed["placement"]["last_pass_at"] is None

    # The running head's placement pass (the loop, on the same state dir), then the list again.
    cfg = load_head_config(config)
    from garage_node.head import setup

    reg = setup.open_registry(cfg)
    node = enroll(reg, "alice-pc")
    beat(reg, node, cpu_report())
    PlacementLoop(reg, cfg).step()
    listed = json.loads(cli(capsys, config, "model", "list", "--json")[1])
    m = listed["models"][0]
    assert (m["wanted"], m["running"], m["pcs"]) == (1, 0, [{"node_id": node, "name": "alice-pc"}])
    assert "min 1, max 2, weight 2" in m["why"] and listed["pcs"][node]["model"] == "tiny-b"
    rc, out, _ = cli(capsys, config, "model", "list")
    assert rc == 0 and "alice-pc" in out and "why:" in out and "tiny-b" in out

    assert cli(capsys, config, "model", "remove", "tiny-b")[0] == 0
    rc, _, err = cli(capsys, config, "model", "remove", "tiny-b")
    assert rc == 2 and "not in the region's catalog" in err


def test_metrics_and_the_dashboard_show_placement_per_model(tmp_path):
    import re

    from prometheus_client import generate_latest

    cfg = head_config(tmp_path)
    g = Gateway(GatewaySection(), tmp_path, lambda: {})
    reg = Registry(tmp_path / "r.sqlite", NET)
    node = enroll(reg, "pc-1")
    beat(reg, node, cpu_report())
    add_model(reg, region_catalog(PACKAGED_CATALOG, []), TINY, min_replicas=1)
    g.demand.arrived(TINY_ID, 400, 100)
    loop = PlacementLoop(reg, cfg, demand=g.demand.snapshot)
    assert loop.placed() == {TINY_ID}
    g.metrics.watch_placement(loop)
    loop.step()
    text = generate_latest(g.metrics.registry).decode()
    g.stop()
    assert f'garage_placement_replicas_wanted{{model="{TINY}"}} 1.0' in text
    assert f'garage_placement_replicas_running{{model="{TINY}"}} 0.0' in text  # assigned, not yet serving
    assert f'garage_placement_switches_total{{model="{TINY}"}} 1.0' in text
    assert f'garage_placement_demand_tokens_per_second{{model="{TINY}"}} {200 / 60}' in text
    dashboard = (Path(__file__).resolve().parents[2] / "configs/grafana-region.json").read_text()
    used = set(re.findall(r"garage_placement_[a-z_]+", dashboard))
    assert used and all(name in text for name in used), used


def test_a_new_assignment_of_a_model_the_heads_store_holds_says_where_to_fetch_it(tmp_path):
    from garage_node.head.modelstore import ModelStore, store_root

    cfg = head_config(tmp_path)
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (weights / "model.safetensors").write_bytes(b"\0" * 1024)
    store = ModelStore(store_root(cfg.head.state_dir))
    store.add(TINY, weights)
    reg = Registry(tmp_path / "r.sqlite", NET)
    node = enroll(reg, "pc-1")
    beat(reg, node, cpu_report())
    add_model(reg, region_catalog(PACKAGED_CATALOG, []), TINY)
    loop = PlacementLoop(reg, cfg)  # the store in the state dir, as `head weights add` wrote it
    loop.step()
    a = loop.assignment(node)
    assert a.model == TINY and a.weights_path == ModelStore.weights_path(TINY) and a.generation == 1
    beat(reg, node, cpu_report(TINY_ID, generation=1))
    assert loop.step().changed == {}  # the path is not a change: no generation grows


# ---------------------------------------------------------------- the head's half of the proof


class SwitchingPc:
    """A PC as the head sees it, carrying out its assignment as the agent does (node/assign.py):
    report the switch first (engine draining, switching_to), then the new engine starting, then
    healthy. Its engine is a stand-in that answers any model."""

    def __init__(self, node_id: str, engine: Engine, reg: Registry, g: Gateway, loop: PlacementLoop) -> None:
        self.node_id, self.engine, self.reg, self.g, self.loop = node_id, engine, reg, g, loop
        self.model: str | None = None
        self.generation = 0
        self.phase = "idle"  # idle, serving, draining, starting
        self.log: list[tuple[float, str]] = []

    def tick(self) -> None:
        a = self.loop.assignment(self.node_id)
        if a is not None and a.generation > self.generation and a.model != self.model:
            if self.phase == "serving":
                self.phase, self.target = "draining", a
            elif self.phase in ("idle", "draining"):
                self.phase, self.target = "starting", a
                self.model, self.generation = a.model, a.generation
            elif self.phase == "starting":
                self.phase = "serving"
        elif self.phase == "starting":
            self.phase = "serving"
        self.log.append((time.monotonic(), f"{self.phase} {self.model}"))
        state = {"serving": EngineState.HEALTHY, "draining": EngineState.HEALTHY,
                 "starting": EngineState.STARTING}.get(self.phase)
        served = {TINY: TINY_ID, "tiny-b": B_ID}  # what its engine serves the model as (the repo id)
        report = cpu_report(served.get(self.model or ""), self.generation, state or EngineState.DISABLED, self.engine.url,
                            switching_to=self.target.model if self.phase == "draining" else None) \
            if self.model else cpu_report()
        if self.phase == "draining":
            report = replace(report, engine=replace(report.engine, draining=True))
        beat(self.reg, self.node_id, report)
        self.g.on_report(self.node_id, report)


def test_demand_moves_one_pc_to_a_new_model_and_no_request_fails_at_the_gateway(tmp_path):
    """The head's half of issue #18's proof, in one process: two PCs serve A; requests for B
    start; the gateway holds them, the loop moves one PC to B, the PC switches (draining first:
    the gateway stops sending it A's requests), and every request for A and for B is answered."""
    cfg = head_config(tmp_path, moves_per_minute=6)
    extra = tmp_path / "extra.toml"
    extra.write_text(EXTRA_MODEL)
    g = Gateway(GatewaySection(connect_timeout_s=1.0, hold_s=30.0), tmp_path, lambda: {})
    _, secret = g.keys.create("load", now=time.time())
    reg = Registry(tmp_path / "r.sqlite", NET)
    import_catalog(reg, PACKAGED_CATALOG, extra)
    catalog = region_catalog(PACKAGED_CATALOG, reg.region.entries())
    add_model(reg, catalog, TINY)
    add_model(reg, catalog, "tiny-b")
    loop = PlacementLoop(reg, cfg, demand=g.demand.snapshot)
    g.placed = loop.placed
    pcs = []
    for name in ("pc-1", "pc-2"):
        node = enroll(reg, name)
        pcs.append(SwitchingPc(node, Engine(node, g.engine_keys.for_node(node)), reg, g, loop))
    g.demand.arrived(TINY_ID, 400, 100)  # demand on A only, before anything runs
    answered: dict[str, list[int]] = {TINY_ID: [], B_ID: []}
    served_by: dict[str, set[str]] = {TINY_ID: set(), B_ID: set()}

    async def client(c: httpx.AsyncClient, model: str, until: float) -> None:
        while time.monotonic() < until:
            r = await c.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 3},
                             headers={"authorization": f"Bearer {secret}"})
            answered[model].append(r.status_code)
            if r.status_code == 200:
                served_by[model].add(r.headers["x-garage-node-id"])
            await asyncio.sleep(0.05)

    async def control(until: float) -> None:
        while time.monotonic() < until:
            loop.step()
            for pc in pcs:
                pc.tick()
            await asyncio.sleep(0.2)

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_gateway_app(g)), base_url="http://gw",
                                     timeout=60) as c:
            start = time.monotonic()
            ctl = asyncio.create_task(control(start + 7))
            await asyncio.sleep(1.0)  # both PCs come up on A
            assert {pc.model for pc in pcs} == {TINY} and all(pc.phase == "serving" for pc in pcs)
            await asyncio.gather(client(c, TINY_ID, start + 6), client(c, TINY_ID, start + 6),
                                 client(c, B_ID, start + 6), client(c, B_ID, start + 6))
            await ctl
            await g.proxy.close()

    try:
        asyncio.run(go())
    finally:
        for pc in pcs:
            pc.engine.stop()
        g.stop()
    assert {pc.model for pc in pcs} == {TINY, "tiny-b"}  # one PC moved to B, the other kept A
    assert answered[TINY_ID] and set(answered[TINY_ID]) == {200}, answered[TINY_ID]
    assert answered[B_ID] and set(answered[B_ID]) == {200}, answered[B_ID]
    mover = next(pc for pc in pcs if pc.model == "tiny-b")
    assert served_by[B_ID] == {mover.node_id}
    assert any("draining" in s for _, s in mover.log)  # it told the head before it switched
    assert len(loop.last.decision.moves) <= 1 and loop.switches["tiny-b"] == 1


def test_prefix_affinity_never_sends_a_request_to_a_pc_serving_another_model(held_gw):
    """Two models' requests share a prompt (a system prompt): the PC that served it for A must
    not take B's request by affinity (a real engine would answer 404 for a model it does not serve)."""
    g = held_gw
    other = Engine("n2", g.engine_keys.for_node("n2"))
    try:
        g.on_report("n1", _report("model-a", g.engine.url))
        g.on_report("n2", _report("model-b", other.url))

        async def go():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_gateway_app(g)),
                                         base_url="http://gw") as c:
                out = [await _post(c, g, m) for m in ("model-a", "model-b", "model-a", "model-b")]
                await g.proxy.close()
                return out

        rs = asyncio.run(go())
    finally:
        other.stop()
    assert [r.headers["x-garage-node-id"] for r in rs] == ["n1", "n2", "n1", "n2"]


def test_the_fleet_page_serves_the_placed_models(tmp_path):
    from fastapi.testclient import TestClient

    from garage_node.head.fleetpage import History
    from garage_node.head.fleetpage.app import create_fleet_app

    cfg = head_config(tmp_path)
    reg = Registry(tmp_path / "r.sqlite", NET)
    node = enroll(reg, "alice-pc")
    beat(reg, node, cpu_report())
    add_model(reg, region_catalog(PACKAGED_CATALOG, []), TINY, min_replicas=1, weight=2.0)
    loop = PlacementLoop(reg, cfg)
    client = TestClient(create_fleet_app(reg, History(15.0), 15.0, models=loop.fleet_models, poll_s=0.0))
    assert client.get("/api/fleet").json()["models"] == []  # no pass yet
    loop.step()
    (m,) = client.get("/api/fleet").json()["models"]
    assert (m["model"], m["wanted"], m["running"], m["pcs"]) == (TINY, 1, 0, [{"id": node, "name": "alice-pc"}])
    assert (m["min_replicas"], m["weight"]) == (1, 2.0) and "min 1" in m["why"]
    assert 'id="models-table"' in client.get("/").text


def test_a_refusal_reaches_the_head_which_reassigns_and_lists_it(tmp_path, capsys):
    """A PC's report says it refused its assignment: the head's next pass gives it something
    else (here: nothing, the only model being the refused one), and `head model list --pcs`
    says what it refused and why."""
    config = tmp_path / "head.toml"
    config.write_text(f'[head]\nstate_dir = "{tmp_path / "state"}"\n[api]\nadvertise_host = "127.0.0.1"\n'
                      f'[placement]\ncatalog = "{PACKAGED_CATALOG}"\n')
    assert cli(capsys, config, "init")[0] == 0
    extra = tmp_path / "extra.toml"
    extra.write_text(EXTRA_MODEL)
    assert cli(capsys, config, "model", "import", str(extra))[0] == 0
    assert cli(capsys, config, "model", "add", "tiny-b", "--min", "1")[0] == 0
    cfg = load_head_config(config)
    from garage_node.head import setup

    reg = setup.open_registry(cfg)
    node = enroll(reg, "bob-pc")
    beat(reg, node, cpu_report())
    loop = PlacementLoop(reg, cfg)
    loop.step()
    first = loop.assignment(node)
    assert first is not None and first.model == "tiny-b"
    beat(reg, node, cpu_report(refused_generation=first.generation,
                               refused_why="the owner pinned tiny-llama-test in garage.toml ([engine] model)"))
    result = loop.step()
    a = loop.assignment(node)
    assert node in result.changed and a.model is None and a.generation == first.generation + 1
    assert "refused tiny-b" in a.reason
    listed = json.loads(cli(capsys, config, "model", "list", "--json")[1])
    assert "the owner pinned tiny-llama-test" in listed["pcs"][node]["refused"]
    m = listed["models"][0]
    assert m["pcs"] == [] and m["running"] == 0
    rc, out, _ = cli(capsys, config, "model", "list", "--pcs")
    assert rc == 0 and "REFUSED: refused tiny-b (generation 1): the owner pinned tiny-llama-test" in out
    assert loop.step().changed == {}  # held off: not given back to it at the next pass


def test_an_unreadable_stored_assignment_is_replaced_by_a_newer_one_not_a_failed_pass(tmp_path):
    """A stored assignment the head cannot read (another version wrote it, say) once made every
    pass of the region fail: its replacement started at generation 1, below the stored one."""
    cfg = head_config(tmp_path)
    reg = Registry(tmp_path / "r.sqlite", NET)
    pcs = [enroll(reg, f"pc-{i}") for i in (1, 2)]
    for n in pcs:
        beat(reg, n, cpu_report())
    add_model(reg, region_catalog(PACKAGED_CATALOG, []), TINY, min_replicas=2)
    unreadable = {"generation": 5, "model": TINY, "tensor_parallel_size": "two"}  # out of schema
    reg.region.store_assignments({pcs[0]: unreadable})
    loop = PlacementLoop(reg, cfg)
    result = loop.step()  # raised ValueError ("generation 1 ... is below the stored 5") before
    a = loop.assignment(pcs[0])
    assert a is not None and a.model == TINY and a.generation == 6, a
    assert reg.region.assignments()[pcs[0]]["generation"] == 6
    assert pcs[1] in result.changed


def test_a_held_request_whose_client_left_gives_its_place_back_at_once(held_gw):
    """A client that left while its request was held kept its place in the hold queue (and
    counted as demand) for all of hold_s, and was then sent to the PC for nobody."""
    g = held_gw
    key = g.authenticate(f"Bearer {g.secret}")
    left = asyncio.Event()

    async def gone() -> bool:
        return left.is_set()

    async def go():
        held = asyncio.create_task(g.hold(key, "wanted", gone))
        await asyncio.sleep(0.4)
        assert not held.done() and g.held == 1
        left.set()
        with pytest.raises(ClientGone):
            await asyncio.wait_for(held, 1.0)  # well inside hold_s (3 s)
        return g.held, g.demand.snapshot()["wanted"].queue_depth

    assert asyncio.run(go()) == (0, 0)


def test_a_key_over_its_limits_is_refused_before_it_is_held(held_gw):
    g = held_gw
    _, over = g.keys.create("one-a-minute", now=time.time(), rpm=1)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_gateway_app(g)), base_url="http://gw",
                                     timeout=30) as c:
            async def post():
                return await c.post("/v1/completions", json={"model": "wanted", "prompt": "hi"},
                                    headers={"authorization": f"Bearer {over}"})
            first = asyncio.create_task(post())  # its one request a minute: held
            await asyncio.sleep(0.3)
            second = await post()  # over its limit: refused at once, not held
            held_meanwhile = g.held
            await first
            return second, held_meanwhile

    second, held_meanwhile = asyncio.run(go())
    assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limit_exceeded"
    assert held_meanwhile == 1  # only the first was ever held


def test_made_up_model_names_share_one_metrics_label_and_a_deep_body_is_400(held_gw):
    g = held_gw

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_gateway_app(g)), base_url="http://gw",
                                     timeout=30) as c:
            made_up = [await _post(c, g, f"made-up-{i}") for i in range(3)]
            deep = await c.post("/v1/completions", content=b'{"model": "wanted", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                headers={"authorization": f"Bearer {g.secret}", "content-type": "application/json"})
            return made_up, deep

    made_up, deep = asyncio.run(go())
    assert all(r.status_code == 404 for r in made_up)
    labels = {s.labels["model"] for m in g.metrics.registry.collect() if m.name == "garage_gateway_requests"
              for s in m.samples}
    assert "(unknown)" in labels and not any(label.startswith("made-up-") for label in labels)
    assert deep.status_code == 400 and deep.json()["error"]["code"] == "invalid_json"  # was a 500
