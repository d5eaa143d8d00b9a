"""The head's placement (garage_node/placement/decide.py) on plain dataclasses: the reports a
region's PCs send, the assignments the head holds, the gateway's demand. No processes.

A `Region` carries out each decision the way agents do (the assignment's generation is reported
back, the engine serves the model), so a test can run the loop for several rounds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from garage_node.core import wire
from garage_node.node.gpu import Inventory
from garage_node.placement import fit
from garage_node.placement.catalog import load_catalog
from garage_node.placement.decide import Decision, Demand, PcView, Placer, PlacementError, Wanted
from testing.fakes import FakeClock

REPO = Path(__file__).resolve().parents[2]
CATALOG = load_catalog(REPO / "configs" / "models.toml")

RTX_4060 = ("NVIDIA GeForce RTX 4060", 8188, "8.9")
RTX_3060 = ("NVIDIA GeForce RTX 3060", 12288, "8.6")
RTX_4070 = ("NVIDIA GeForce RTX 4070", 12282, "8.9")
RTX_4090 = ("NVIDIA GeForce RTX 4090", 24564, "8.9")
RTX_16GB = ("NVIDIA GeForce RTX 4060 Ti", 16380, "8.9")
GTX_1080 = ("NVIDIA GeForce GTX 1080", 8192, "6.1")


def gpus(*cards: tuple[str, int, str], unhealthy: tuple[int, ...] = ()) -> list[wire.GPU]:
    return [wire.GPU(index=i, name=n, uuid=f"GPU-{i}", memory_total_mib=mib, memory_free_mib=mib,
                     compute_capability=cc, temperature_c=40, power_w=30.0, utilization_pct=0,
                     healthy=i not in unhealthy, error="Xid 79" if i in unhealthy else None)
            for i, (n, mib, cc) in enumerate(cards)]


def report(cards: list[wire.GPU], facts: wire.PlacementFacts | None = None, serving: str | None = None,
           driver: str = "535.183.01", cuda: str = "12.2") -> wire.NodeReport:
    """A PC's report; `serving`: the catalog model its engine serves (reported by repo id, as
    the engine's --served-model-name)."""
    found = CATALOG.resolve(serving) if serving else None
    model = found[0].id if found else serving  # a model of another catalog: by its name
    return wire.NodeReport(
        state=wire.NodeState.JOINED, message="joined", gpus=cards, gpu_note=None if cards else "no NVIDIA GPU",
        driver_version=driver if cards else None, cuda_version=cuda if cards else None,
        versions=wire.AgentVersions(agent="0.1.0", ray="2.60.0", python="3.11"),
        ray=wire.RayStatus(state=wire.RayState.ALIVE),
        engine=wire.EngineReport(state=wire.EngineState.HEALTHY if serving else wire.EngineState.DISABLED,
                                 model=model),
        placement=facts if facts is not None else wire.PlacementFacts(),
    )


@dataclasses.dataclass
class Region:
    """PCs as the head sees them, carrying out what it decides between rounds."""

    pcs: dict[str, PcView]
    placer: Placer
    clock: FakeClock

    @classmethod
    def of(cls, specs: dict[str, tuple[list[wire.GPU], wire.PlacementFacts]], placer: Placer | None = None,
           clock: FakeClock | None = None, **placer_args) -> Region:
        clock = clock or FakeClock()
        placer = placer or Placer(CATALOG, clock=clock, **placer_args)
        pcs = {n: PcView(n, f"pc-{n}", report(g, f), None, True) for n, (g, f) in specs.items()}
        return cls(pcs, placer, clock)

    def decide(self, wanted: list[Wanted], demand: dict[str, Demand], carry_out: bool = True) -> Decision:
        d = self.placer.decide(list(self.pcs.values()), wanted, demand)
        for n, pc in self.pcs.items():
            a = d.assignments.get(n)
            self.pcs[n] = dataclasses.replace(pc, assignment=a)
            if carry_out and a is not None and pc.alive and pc.report.placement and not pc.report.placement.paused:
                self.carry_out(n)
        return d

    def carry_out(self, n: str) -> None:
        pc = self.pcs[n]
        a = pc.assignment
        assert a is not None and pc.report.placement is not None
        facts = dataclasses.replace(pc.report.placement, assignment_generation=a.generation, switching_to=None)
        self.pcs[n] = dataclasses.replace(pc, report=report(pc.report.gpus, facts, a.model))

    def set(self, n: str, *, alive: bool | None = None, **facts) -> None:
        pc = self.pcs[n]
        assert pc.report.placement is not None
        rep = dataclasses.replace(pc.report, placement=dataclasses.replace(pc.report.placement, **facts))
        self.pcs[n] = dataclasses.replace(pc, report=rep, alive=pc.alive if alive is None else alive)

    def models(self) -> dict[str, str | None]:
        return {n: pc.assignment.model if pc.assignment else None for n, pc in self.pcs.items()}

    def count(self, model: str) -> int:
        return sum(1 for m in self.models().values() if m == model)


def uniform(n: int, cards: tuple[str, int, str] = RTX_4090, **facts) -> dict:
    return {f"n{i:02d}": (gpus(cards), wire.PlacementFacts(**facts)) for i in range(n)}


SEVEN, FOURTEEN, THIRTYTWO = "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b"


# ---------------------------------------------------------------- the fit: one arithmetic, two views


@pytest.mark.parametrize("cards, unhealthy", [
    ((RTX_4060,), ()), ((RTX_3060,), ()), ((RTX_4090,), ()), ((RTX_16GB, RTX_16GB), ()),
    ((RTX_4090, RTX_4060), ()), ((RTX_4070, RTX_4060), ()), ((RTX_4090, RTX_4090), (1,)),
])
def test_a_report_plans_like_the_inventory_it_came_from(cards, unhealthy):
    """The head plans from the PC's report, the agent from its NVML inventory: same plan."""
    g = gpus(*cards, unhealthy=unhealthy)
    inventory = Inventory(gpus=tuple(g), driver_version="535.183.01", cuda_version="12.2")
    status_like = report(g)
    image = CATALOG.image("vllm/vllm-openai:v0.32.0")
    for pin in (None, SEVEN, THIRTYTWO):
        try:
            agent = fit.plan(inventory, CATALOG, pinned_model=pin, image=image).to_dict()
        except fit.PlanError as e:
            agent = {"refused": str(e)}
        try:
            head = fit.plan(fit.GpuFacts.of_report(status_like), CATALOG, pinned_model=pin, image=image).to_dict()
        except fit.PlanError as e:
            head = {"refused": str(e)}
        assert head == agent


def _stage_fits(p: fit.Plan) -> None:
    """Each stage: weights + overhead + KV for max_model_len tokens <= its budget, recomputed."""
    m, q = p.model, p.quantization
    assert sum(p.layer_partition) == m.num_layers
    for s in p.stages:
        weights = m.parameters * q.bytes_per_param / fit.MIB * s.layers / m.num_layers
        kv = p.max_model_len * 2 * s.layers * m.num_kv_heads * m.head_dim * q.kv_bytes / fit.MIB
        budget = s.gpu.memory_total_mib * p.gpu_memory_utilization
        assert weights + fit.OVERHEAD_FIXED_MIB + fit.OVERHEAD_WEIGHT_FRACTION * weights + kv <= budget


def test_4090_and_4060_pipeline_when_only_their_sum_holds_the_model():
    pc = fit.GpuFacts(tuple(gpus(RTX_4090, RTX_4060)), "535.183.01", "12.2")
    # Alone, the 4090 holds 32B AWQ with 7424 tokens: no pipeline needed for that.
    alone = fit.plan(pc, CATALOG)
    assert (alone.model.name, alone.quantization.name, alone.gpu_indices, alone.pipeline_parallel_size,
            alone.max_model_len) == (THIRTYTWO, "awq", (0,), 1, 7424)
    # A 16384-token context fits only in both: two stages, layers split by memory.
    p = fit.plan(pc, CATALOG, pinned_model=THIRTYTWO, max_model_len=16384)
    assert (p.quantization.name, p.gpu_indices, p.tensor_parallel_size, p.pipeline_parallel_size) == \
        ("awq", (0, 1), 1, 2)
    assert p.layer_partition == (49, 15)
    _stage_fits(p)
    # One more layer on the 4060 would leave it too little room for 16384 tokens.
    assert p.stages[1].tokens < 16384 * 64 / 15 and p.stages[1].tokens >= 16384
    assert p.engine_args() == [
        "--model", "Qwen/Qwen2.5-32B-Instruct-AWQ", "--dtype", "float16", "--quantization", "awq",
        "--max-model-len", "16384", "--gpu-memory-utilization", "0.90", "--tensor-parallel-size", "1",
        "--pipeline-parallel-size", "2"]
    assert p.engine_env() == {"VLLM_PP_LAYER_PARTITION": "49,15"}
    assert "stage 1 (GPU #1): 15 layers" in p.explain()
    assert p.to_dict()["layer_partition"] == [49, 15]


def test_4070_and_4060_serve_14b_only_as_a_pipeline():
    p = fit.plan(fit.GpuFacts(tuple(gpus(RTX_4070, RTX_4060)), "535.183.01", "12.2"), CATALOG)
    assert (p.model.name, p.quantization.name, p.pipeline_parallel_size, p.layer_partition, p.max_model_len) == \
        (FOURTEEN, "awq", 2, (30, 18), 32000)
    _stage_fits(p)
    # Neither card alone holds 14B AWQ with 4096 tokens.
    for card in (RTX_4070, RTX_4060):
        with pytest.raises(fit.PlanError):
            fit.plan(fit.GpuFacts(tuple(gpus(card))), CATALOG, pinned_model=FOURTEEN)


def test_identical_gpus_use_tensor_parallel_not_a_pipeline():
    p = fit.plan(fit.GpuFacts(tuple(gpus(RTX_16GB, RTX_16GB))), CATALOG)
    assert (p.tensor_parallel_size, p.pipeline_parallel_size, p.engine_env()) == (2, 1, {})


def test_placer_assigns_the_4090_4060_pipeline():
    r = Region.of({"mixed": (gpus(RTX_4090, RTX_4060), wire.PlacementFacts())})
    d = r.decide([Wanted(THIRTYTWO, max_model_len=16384)], {THIRTYTWO: Demand(500)})
    a = d.assignments["mixed"]
    assert (a.model, a.quantization, a.max_model_len, a.gpu_indices, a.tensor_parallel_size,
            a.pipeline_parallel_size, a.layer_partition) == (THIRTYTWO, "awq", 16384, [0, 1], 1, 2, [49, 15])
    assert "PP 2 (layers 49,15)" in d.explain["mixed"]


# ---------------------------------------------------------------- the owner's limits


def test_owner_pin_means_that_model_or_nothing():
    specs = uniform(3)
    specs["pinned"] = (gpus(RTX_4090), wire.PlacementFacts(pinned_model="Qwen/Qwen2.5-14B-Instruct"))
    specs["pinned-away"] = (gpus(RTX_4090), wire.PlacementFacts(pinned_model="qwen2.5-0.5b"))
    r = Region.of(specs)
    d = r.decide([Wanted(SEVEN), Wanted(FOURTEEN)], {SEVEN: Demand(1000)})
    assert r.models()["pinned"] == FOURTEEN  # its pin, though all demand is for the 7B
    assert d.assignments["pinned-away"].model is None  # its pin is not wanted: nothing
    assert "that model or nothing" in d.explain["pinned-away"]
    # However long demand stays elsewhere, the pinned PC is never moved.
    for _ in range(5):
        r.clock.advance(600)
        r.decide([Wanted(SEVEN), Wanted(FOURTEEN)], {SEVEN: Demand(1000)})
        assert r.models()["pinned"] == FOURTEEN


def test_paused_pc_keeps_its_model_and_gets_nothing_new():
    r = Region.of(uniform(3))
    r.decide([Wanted(SEVEN), Wanted(FOURTEEN)], {SEVEN: Demand(100)})
    before = r.pcs["n00"].assignment
    assert before is not None and before.model == SEVEN
    r.set("n00", paused=True)
    r.pcs["fresh"] = PcView("fresh", "pc-fresh", report(gpus(RTX_4090), wire.PlacementFacts(paused=True)), None, True)
    r.clock.advance(600)
    d = r.decide([Wanted(SEVEN), Wanted(FOURTEEN)], {FOURTEEN: Demand(100)})
    assert d.assignments["n00"] is before  # kept, same generation, though demand moved away
    assert "fresh" not in d.assignments  # nothing new for a paused PC
    assert "paused" in d.explain["fresh"] and "paused" in d.explain["n00"]
    seven = next(m for m in d.models if m.model == SEVEN)
    assert "n00" in seven.pcs and seven.running == 0  # assigned, not counted as running


def test_older_agent_without_placement_facts_is_never_assigned():
    r = Region.of(uniform(1))
    old = dataclasses.replace(report(gpus(RTX_4090)), placement=None)
    r.pcs["old"] = PcView("old", "pc-old", old, None, True)
    d = r.decide([Wanted(SEVEN)], {SEVEN: Demand(100)})
    assert "old" not in d.assignments and "old" not in d.explain
    assert d.assignments["n00"].model == SEVEN


def test_cpu_pc_takes_only_models_marked_for_cpu():
    r = Region.of({"cpu": ([], wire.PlacementFacts(device="cpu")), "gpu": (gpus(RTX_4060), wire.PlacementFacts())})
    d = r.decide([Wanted("tiny-llama-test"), Wanted(SEVEN)], {SEVEN: Demand(100), "tiny-llama-test": Demand(10)})
    a = d.assignments["cpu"]
    assert (a.model, a.quantization, a.max_model_len, a.gpu_indices) == ("tiny-llama-test", "fp32", 2048, [])
    assert d.assignments["gpu"].model == SEVEN
    # Only GPU models wanted: the CPU PC serves nothing, and says why.
    r2 = Region.of({"cpu": ([], wire.PlacementFacts(device="cpu"))})
    d2 = r2.decide([Wanted(SEVEN)], {SEVEN: Demand(100)})
    assert d2.assignments["cpu"].model is None
    assert "cpu = true" in d2.explain["cpu"]


def test_cuda_and_compute_capability_gate():
    # A Pascal card (cc 6.1) is below every model's minimum; a CUDA 11 driver runs no CUDA 12.8 image.
    r = Region.of({"pascal": (gpus(GTX_1080), wire.PlacementFacts())})
    r.pcs["old-driver"] = PcView("old-driver", "pc", report(gpus(RTX_4090), driver="470.256.02", cuda="11.4"),
                                 None, True)
    d = r.decide([Wanted(SEVEN)], {SEVEN: Demand(100)})
    assert d.assignments["pascal"].model is None and "compute capability" in d.explain["pascal"]
    assert d.assignments["old-driver"].model is None and "driver >= 525.60.13" in d.explain["old-driver"]


# ---------------------------------------------------------------- the operator's catalog


def test_min_and_max_replicas():
    r = Region.of(uniform(6))
    wanted = [Wanted(SEVEN, max_replicas=2), Wanted(FOURTEEN, min_replicas=3), Wanted(THIRTYTWO)]
    d = r.decide(wanted, {SEVEN: Demand(10_000)})
    assert r.count(SEVEN) == 2  # all the demand, but at most 2
    assert r.count(FOURTEEN) >= 3  # no demand, but at least 3
    assert r.count(SEVEN) + r.count(FOURTEEN) + r.count(THIRTYTWO) == 6
    views = {m.model: m for m in d.models}
    assert "max 2" in views[SEVEN].why and "min 3" in views[FOURTEEN].why


def test_a_model_outside_the_catalog_is_explained():
    r = Region.of(uniform(1))
    d = r.decide([Wanted("made-up-model"), Wanted(SEVEN)], {})
    view = next(m for m in d.models if m.model == "made-up-model")
    assert view.pcs == [] and "not in the region's catalog" in view.why


def test_models_with_unserved_demand_and_no_pc_come_first():
    r = Region.of(uniform(8), moves_per_minute=1)
    wanted = [Wanted(SEVEN), Wanted(FOURTEEN), Wanted("qwen2.5-3b")]
    r.decide(wanted, {SEVEN: Demand(1000)})
    assert r.count(SEVEN) == 8
    r.clock.advance(600)
    # The 14B's share is far larger, but the 3B has requests nobody serves: it gets the one move.
    d = r.decide(wanted, {SEVEN: Demand(1000), FOURTEEN: Demand(5000), "qwen2.5-3b": Demand(0, 2, 0.5)})
    assert len(d.moves) == 1 and r.count("qwen2.5-3b") == 1
    assert "had no PC and has demand" in next(d.explain[n] for n, m in r.models().items() if m == "qwen2.5-3b")


# ---------------------------------------------------------------- moving PCs


def test_moves_per_minute_bound():
    r = Region.of(uniform(20), moves_per_minute=3)
    wanted = [Wanted(SEVEN), Wanted(FOURTEEN)]
    r.decide(wanted, {SEVEN: Demand(1000)})
    assert r.count(SEVEN) == 20
    r.clock.advance(600)
    d = r.decide(wanted, {FOURTEEN: Demand(1000)})
    assert len(d.moves) == 3 and r.count(FOURTEEN) == 3
    r.clock.advance(30)
    assert r.decide(wanted, {FOURTEEN: Demand(1000)}).moves == []  # the minute's budget is spent
    r.clock.advance(31)
    assert len(r.decide(wanted, {FOURTEEN: Demand(1000)}).moves) == 3
    # In the end the whole region follows the demand, 3 PCs a minute.
    for _ in range(10):
        r.clock.advance(61)
        r.decide(wanted, {FOURTEEN: Demand(1000)})
    assert r.count(FOURTEEN) == 20


def test_prefers_pcs_holding_the_weights():
    specs = uniform(6)
    specs["n04"] = (gpus(RTX_4090), wire.PlacementFacts(weights_held=[FOURTEEN]))
    r = Region.of(specs, moves_per_minute=1)
    wanted = [Wanted(SEVEN), Wanted(FOURTEEN)]
    r.decide(wanted, {SEVEN: Demand(1000)})
    assert r.count(SEVEN) == 6
    r.clock.advance(600)
    d = r.decide(wanted, {SEVEN: Demand(1000), FOURTEEN: Demand(300)})
    assert d.moves == [f"pc-n04 (n04): {SEVEN} -> {FOURTEEN}"]
    assert "holds the weights" in d.explain["n04"]


def test_a_changed_assignment_gets_the_next_generation():
    r = Region.of(uniform(2), moves_per_minute=10)
    wanted = [Wanted(SEVEN), Wanted(FOURTEEN)]
    first = r.decide(wanted, {SEVEN: Demand(1000)}).assignments
    assert {a.generation for a in first.values()} == {1}
    r.clock.advance(600)
    second = r.decide(wanted, {FOURTEEN: Demand(1000)}).assignments
    for n in first:
        if second[n].model != first[n].model:
            assert second[n].generation == first[n].generation + 1
        else:
            assert second[n] is first[n]


@pytest.mark.parametrize("hysteresis, flaps", [(0.1, False), (0.0, True)])
def test_hysteresis_a_wobbling_demand_moves_nothing(hysteresis, flaps):
    r = Region.of(uniform(100), moves_per_minute=10, hysteresis=hysteresis)
    wanted = [Wanted(SEVEN), Wanted(FOURTEEN)]
    r.decide(wanted, {SEVEN: Demand(1000), FOURTEEN: Demand(500)})
    settled = r.models()
    moves = 0
    # The 14B's demand swings by 10 % around where it settled, for an hour: its ideal share of
    # the 100 PCs swings between 46.5 and 51.5.
    for i in range(60):
        r.clock.advance(60)
        wobble = 1.1 if i % 2 else 0.9
        moves += len(r.decide(wanted, {SEVEN: Demand(1000), FOURTEEN: Demand(500 * wobble)}).moves)
    # Without hysteresis the same trace moves PCs back and forth: the test would notice.
    assert (moves > 20) if flaps else (moves == 0 and r.models() == settled)


def test_hold_down_a_moved_pc_stays_put_for_a_while():
    r = Region.of(uniform(2), moves_per_minute=10, hold_down_s=300)
    wanted = [Wanted(SEVEN), Wanted(FOURTEEN)]
    r.decide(wanted, {SEVEN: Demand(1000)})
    r.clock.advance(600)
    d = r.decide(wanted, {SEVEN: Demand(1000), FOURTEEN: Demand(0, 1, 1.0)})
    (moved,) = [n for n, m in r.models().items() if m == FOURTEEN]
    assert len(d.moves) == 1
    # The 14B's demand vanishes at once: the moved PC is held down, then moves back.
    r.clock.advance(60)
    assert r.decide(wanted, {SEVEN: Demand(1000)}).moves == []
    assert "hold-down" in r.placer.decide(list(r.pcs.values()), wanted, {SEVEN: Demand(1000)}).explain[moved]
    r.clock.advance(300)
    assert len(r.decide(wanted, {SEVEN: Demand(1000)}).moves) == 1 and r.count(SEVEN) == 2


def test_a_pc_leaving_mid_switch():
    r = Region.of(uniform(3), moves_per_minute=10)
    wanted = [Wanted(SEVEN), Wanted(FOURTEEN)]
    r.decide(wanted, {SEVEN: Demand(1000)})
    r.clock.advance(600)
    # B's requests arrive; one PC is told to switch, and goes away before it has.
    d = r.decide(wanted, {SEVEN: Demand(1000), FOURTEEN: Demand(0, 3, 1.0)}, carry_out=False)
    (leaving,) = [n for n, a in d.assignments.items() if a.model == FOURTEEN]
    assignment = d.assignments[leaving]
    r.set(leaving, alive=False, switching_to=FOURTEEN)
    for n in r.pcs:
        if n != leaving:
            r.carry_out(n)
    r.clock.advance(10)
    d = r.decide(wanted, {SEVEN: Demand(1000), FOURTEEN: Demand(0, 3, 1.0)})
    assert d.assignments[leaving] is assignment  # kept for when it comes back ...
    fourteen = next(m for m in d.models if m.model == FOURTEEN)
    assert leaving in fourteen.pcs and fourteen.running == 0
    # ... but not counted: another PC takes the 14B, whose requests no live PC serves.
    others = [n for n, m in r.models().items() if m == FOURTEEN and n != leaving]
    assert len(others) == 1
    assert "not alive" in d.explain[leaving]
    r.clock.advance(10)
    d = r.decide(wanted, {SEVEN: Demand(1000), FOURTEEN: Demand(0, 3, 1.0)})
    view = next(m for m in d.models if m.model == FOURTEEN)
    assert view.running == 1 and leaving in view.pcs


def test_head_restart_keeps_the_assignments():
    """A new Placer (the head restarted) given the stored assignments changes nothing."""
    specs = {**uniform(6), **{f"m{i}": (gpus(RTX_4060), wire.PlacementFacts()) for i in range(4)},
             "mixed": (gpus(RTX_4070, RTX_4060), wire.PlacementFacts())}
    r = Region.of(specs, moves_per_minute=4)
    wanted = [Wanted(SEVEN), Wanted(FOURTEEN, min_replicas=1), Wanted(THIRTYTWO)]
    demand = {SEVEN: Demand(800), FOURTEEN: Demand(300), THIRTYTWO: Demand(100)}
    for _ in range(10):
        r.clock.advance(61)
        r.decide(wanted, demand)
    stored = {n: pc.assignment for n, pc in r.pcs.items()}
    assert r.decide(wanted, demand).moves == []  # settled
    restarted = Placer(CATALOG, moves_per_minute=4, clock=FakeClock(start=5.0))
    d = restarted.decide(list(r.pcs.values()), wanted, demand)
    assert d.moves == [] and d.assignments == stored
    assert all(d.assignments[n] is stored[n] for n in stored)


def test_bad_settings_are_refused():
    with pytest.raises(PlacementError, match="hysteresis"):
        Placer(CATALOG, hysteresis=1.5)
    with pytest.raises(PlacementError, match="moves_per_minute"):
        Placer(CATALOG, moves_per_minute=-1)
    placer = Placer(CATALOG)
    for bad, words in [(Wanted(SEVEN, min_replicas=3, max_replicas=1), "max_replicas 1 is below min_replicas 3"),
                       (Wanted(SEVEN, weight=float("nan")), "weight must be"),
                       (Wanted(SEVEN, min_replicas=-1), "min_replicas must be 0 or more")]:
        with pytest.raises(PlacementError, match=words):
            placer.decide([], [bad], {})


# ---------------------------------------------------------------- the testbed's story, on fakes


def two_tiny_models(tmp_path: Path):
    """Two CPU models, like the testbed's tiny A and B (distinct names and weights)."""
    text = (REPO / "configs" / "models.toml").read_text()
    start = text.index("[models.tiny-llama-test]")
    tiny = text[start:]
    extra = tiny.replace("tiny-llama-test", "tiny-a") + "\n" + tiny.replace("tiny-llama-test", "tiny-b")
    path = tmp_path / "models.toml"
    path.write_text(text + "\n" + extra)
    return load_catalog(path)


def test_two_pcs_follow_demand_from_a_to_b_and_back_without_flapping(tmp_path):
    catalog = two_tiny_models(tmp_path)
    clock = FakeClock()
    placer = Placer(catalog, clock=clock, hold_down_s=120)
    r = Region.of({"pc1": ([], wire.PlacementFacts(device="cpu")), "pc2": ([], wire.PlacementFacts(device="cpu"))},
                  placer=placer, clock=clock)
    # report() names models by the main catalog; tiny-a/b are served by name here.
    wanted = [Wanted("tiny-a"), Wanted("tiny-b")]
    history = []
    for t in range(0, 900, 10):
        clock.advance(10)
        if t < 120:
            demand = {"tiny-a": Demand(50)}
        elif t < 480:  # B's load starts: held requests first, then its tokens
            demand = {"tiny-a": Demand(50), "tiny-b": Demand(50 if t >= 140 else 0, 4, 0.5 if t < 140 else 0.0)}
        else:  # back to A only (the window empties slowly)
            demand = {"tiny-a": Demand(50), "tiny-b": Demand(max(0.0, 50 - (t - 480) / 2))}
        d = placer.decide(list(r.pcs.values()), wanted, demand)
        for n, pc in r.pcs.items():
            a = d.assignments[n]
            facts = dataclasses.replace(pc.report.placement, assignment_generation=a.generation)
            rep = dataclasses.replace(pc.report, placement=facts,
                                      engine=wire.EngineReport(state=wire.EngineState.HEALTHY, model=a.model))
            r.pcs[n] = dataclasses.replace(pc, report=rep, assignment=a)
        history.append((t, tuple(sorted(r.models().values()))))
    at = dict(history)
    assert at[110] == ("tiny-a", "tiny-a")
    assert at[130] == ("tiny-a", "tiny-b")  # within one round of B's first request
    assert at[470] == ("tiny-a", "tiny-b")
    assert at[890] == ("tiny-a", "tiny-a")  # back to A
    changes = sum(1 for (_, a), (_, b) in zip(history, history[1:], strict=False) if a != b)
    assert changes == 2  # A,A -> A,B -> A,A: no flapping


# ---------------------------------------------------------------- unequal PCs, shared PCs


@pytest.mark.parametrize("fast_first", [True, False])
def test_a_fast_card_counts_for_more_than_a_slow_one(fast_first):
    """One RTX 4090 (1008 GB/s) decodes the same AWQ weights like ~3.7 RTX 4060s (272 GB/s):
    with equal demand for two 7B models, one gets the 4090 and the other the four 4060s,
    whatever the PCs' order, and it stays so (no single fast PC moved back and forth). The
    owners pinned AWQ, so that both cards read the same bytes per token."""
    cards = [RTX_4090] + [RTX_4060] * 4 if fast_first else [RTX_4060] * 4 + [RTX_4090]
    awq = wire.PlacementFacts(pinned_quantization="awq")
    r = Region.of({f"n{i}": (gpus(c), awq) for i, c in enumerate(cards)}, moves_per_minute=10)
    wanted = [Wanted(SEVEN), Wanted("qwen2.5-7b-twin")]
    fast = "n0" if fast_first else "n4"
    twin = _twin_catalog()
    r.placer = Placer(twin, clock=r.clock, moves_per_minute=10)
    demand = {SEVEN: Demand(500), "qwen2.5-7b-twin": Demand(500)}
    r.decide(wanted, demand)
    mine = r.models()[fast]
    assert all(m != mine for n, m in r.models().items() if n != fast)
    for _ in range(10):
        r.clock.advance(300)
        assert r.decide(wanted, demand).moves == []


def _twin_catalog():
    """The catalog with a second 7B under another name (two models alike but for their name)."""
    import dataclasses as dc

    seven = CATALOG.resolve(SEVEN)[0]
    quants = {k: dc.replace(q, model_id=f"{q.model_id}-twin") for k, q in seven.quantizations.items()}
    twin = dc.replace(seven, name="qwen2.5-7b-twin", id=f"{seven.id}-twin", quantizations=quants)
    return dc.replace(CATALOG, models=CATALOG.models + (twin,))


def test_a_model_only_big_pcs_fit_gets_one_through_a_chain_of_two_moves():
    """The 16 GB PCs serve the 3B (at its minimum), the 8 GB ones the 7B (over its share); the
    14B's demand rises: no 7B PC can take it, so a 16 GB PC moves 3B -> 14B and an 8 GB PC
    7B -> 3B in its place."""
    specs = {**{f"s{i}": (gpus(RTX_4060), wire.PlacementFacts()) for i in range(4)},
             **{f"b{i}": (gpus(RTX_16GB), wire.PlacementFacts()) for i in range(2)}}
    r = Region.of(specs, moves_per_minute=10)
    for n in r.pcs:
        model = "qwen2.5-3b" if n.startswith("b") else SEVEN
        r.pcs[n] = dataclasses.replace(r.pcs[n], assignment=wire.Assignment(generation=1, model=model))
        r.carry_out(n)
    wanted = [Wanted(SEVEN), Wanted("qwen2.5-3b", min_replicas=2), Wanted(FOURTEEN)]
    d = r.decide(wanted, {SEVEN: Demand(50), "qwen2.5-3b": Demand(50), FOURTEEN: Demand(2000)})
    models = r.models()
    fourteen = [n for n, m in models.items() if m == FOURTEEN]
    assert fourteen and all(n.startswith("b") for n in fourteen)
    three = [n for n, m in models.items() if m == "qwen2.5-3b"]
    assert len(three) == 2 and all(n.startswith("s") for n in three[: len(fourteen)])
    assert len(d.moves) == 2 * len(fourteen)
    assert sum("in place of" in why for why in d.explain.values()) == len(fourteen)


def test_models_that_share_the_big_pcs_share_them_by_demand():
    from garage_node.placement.targets import ModelNeed, targets

    def need(name, tokens, groups):
        return ModelNeed(name, 1.0, tokens, 0.0, True, 1.0, 0, None, 10 * len(groups), frozenset(groups))

    # 10 PCs of kind 1 (big) serve all three; 10 of kind 2 only the small model.
    needs = [need("big-a", 3000, {1}), need("big-b", 1000, {1}), need("small", 500, {1, 2})]
    t = targets(needs, 20, {1: 10, 2: 10})
    # Without the set bound big-a would want 13.3 PCs of the 10 that can serve it.
    assert t["big-a"].ideal + t["big-b"].ideal == pytest.approx(10)
    assert t["big-a"].ideal == pytest.approx(3 * t["big-b"].ideal)
    assert t["small"].ideal == pytest.approx(10)


def test_bandwidth_of_the_cards():
    from garage_node.placement import bandwidth

    (g4060ti,) = gpus(RTX_16GB)
    (g4060,) = gpus(RTX_4060)
    (unknown,) = gpus(("Some Future GPU", 32768, "9.0"))
    assert bandwidth.gbs(g4060ti) == 288 and bandwidth.gbs(g4060) == 272  # "4060 Ti" is not a 4060
    assert bandwidth.gbs(unknown) == 32 * bandwidth.GBS_PER_GIB_UNLISTED
    # A pipeline runs at its slowest stage's pace.
    four, six = gpus(RTX_4090, RTX_4060)
    assert bandwidth.tokens_per_s((four, six), 10.0, (49, 15)) == pytest.approx(272 / (10 * 15 / 64))


def test_pcs_of_a_removed_model_switch_within_the_move_budget_and_serve_it_meanwhile():
    r = Region.of(uniform(3), moves_per_minute=1)
    r.decide([Wanted(SEVEN)], {SEVEN: Demand(100)})
    before = {n: pc.assignment for n, pc in r.pcs.items()}
    r.clock.advance(600)
    d = r.decide([Wanted(FOURTEEN)], {FOURTEEN: Demand(100)})  # the operator removed the 7B
    assert len(d.moves) == 1 and r.count(FOURTEEN) == 1
    waiting = [n for n, m in r.models().items() if m == SEVEN]
    assert len(waiting) == 2 and all(d.assignments[n] is before[n] for n in waiting)
    assert all("keeps it until the move budget" in d.explain[n] for n in waiting)
    for _ in range(2):
        r.clock.advance(61)
        r.decide([Wanted(FOURTEEN)], {FOURTEEN: Demand(100)})
    assert r.count(FOURTEEN) == 3


# ---------------------------------------------------------------- refusals


def test_a_pc_that_refuses_its_model_gets_another_and_not_that_one_again_for_a_while():
    """A PC that refused its assignment (its weights failed their check, its engine never came
    up) is not counted as switching to it forever: it is given another model at once, and the
    refused one is held off it for refused_hold_s, as its explanation says."""
    r = Region.of(uniform(2), moves_per_minute=10, refused_hold_s=600)
    wanted = [Wanted(SEVEN), Wanted(FOURTEEN)]
    demand = {SEVEN: Demand(1000), FOURTEEN: Demand(1000)}
    d = r.decide(wanted, demand, carry_out=False)
    (n,) = [k for k, a in d.assignments.items() if a.model == FOURTEEN]
    (other,) = [k for k in r.pcs if k != n]
    refused = d.assignments[n]
    r.carry_out(other)
    r.set(n, refused_generation=refused.generation, refused_why="its weights failed the check: model.safetensors")
    r.clock.advance(10)
    d = r.decide(wanted, demand, carry_out=False)
    a = d.assignments[n]
    assert a.model != FOURTEEN and a.generation == refused.generation + 1
    assert (f"refused {FOURTEEN} (generation {refused.generation}): its weights failed the check"
            in d.explain[n]) and "not assigned it again for 600 s" in d.explain[n]
    assert FOURTEEN in d.refused[n]
    view = next(m for m in d.models if m.model == FOURTEEN)
    assert n not in view.pcs
    # It carries out what it got; within the hold the 14B is not given back to it, whatever the demand.
    r.carry_out(n)
    for _ in range(5):
        r.clock.advance(61)
        d = r.decide(wanted, {SEVEN: Demand(10), FOURTEEN: Demand(5000, 20, 3.0)})
        assert r.pcs[n].assignment.model != FOURTEEN and "refused" in d.explain[n]


def test_a_refusal_leaves_nothing_to_serve_then_the_model_is_tried_again_after_the_hold():
    r = Region.of(uniform(1), refused_hold_s=600)
    wanted = [Wanted(FOURTEEN, min_replicas=1)]
    d = r.decide(wanted, {}, carry_out=False)
    first = d.assignments["n00"]
    assert first.model == FOURTEEN
    r.set("n00", refused_generation=first.generation, refused_why="its engine did not become healthy in 900 s")
    r.clock.advance(5)
    d = r.decide(wanted, {})
    a = d.assignments["n00"]
    assert a.model is None and a.generation == first.generation + 1
    assert "refused qwen2.5-14b" in d.explain["n00"] and "did not become healthy" in d.explain["n00"]
    assert "refused qwen2.5-14b" in a.reason
    r.clock.advance(300)
    assert r.decide(wanted, {}).assignments["n00"].model is None  # still held off
    r.clock.advance(301)
    d = r.decide(wanted, {})
    assert d.assignments["n00"].model == FOURTEEN and d.assignments["n00"].generation == first.generation + 2
    assert "n00" not in d.refused


def test_a_new_assignment_carries_the_catalog_entry_it_was_planned_with(tmp_path):
    """So a model imported at the head reaches PCs whose own catalog lacks it (#18)."""
    from garage_node.placement.catalog import entry_of, model_of

    catalog = two_tiny_models(tmp_path)
    r = Region.of({"pc1": ([], wire.PlacementFacts(device="cpu"))}, placer=Placer(catalog))
    d = r.decide([Wanted("tiny-b", min_replicas=1)], {})
    a = d.assignments["pc1"]
    spec = catalog.resolve("tiny-b")[0]
    assert a.model == "tiny-b" and a.catalog_entry == entry_of(spec)
    assert model_of(a.catalog_entry, "the head") == spec  # the same facts back on the PC
    assert wire.decode(wire.encode(a), wire.Assignment) == a  # and over the wire


def test_a_pc_whose_switch_failed_is_given_back_the_model_it_went_back_to():
    """The agent refuses a switch whose engine never came up and goes back to the model it
    served: the head's next decision assigns it that model again (no move spent), not the
    refused one."""
    r = Region.of(uniform(3), moves_per_minute=1, refused_hold_s=600)
    wanted = [Wanted(SEVEN), Wanted(FOURTEEN)]
    r.decide(wanted, {SEVEN: Demand(1000)})
    assert r.count(SEVEN) == 3
    r.clock.advance(600)
    d = r.decide(wanted, {SEVEN: Demand(1000), FOURTEEN: Demand(0, 3, 1.0)}, carry_out=False)
    (n,) = [k for k, a in d.assignments.items() if a.model == FOURTEEN]
    failed = d.assignments[n]
    r.set(n, refused_generation=failed.generation, refused_why="its engine did not become healthy (degraded)")
    r.clock.advance(10)  # the move budget (1 a minute) is spent
    d = r.decide(wanted, {SEVEN: Demand(1000), FOURTEEN: Demand(0, 3, 1.0)}, carry_out=False)
    a = d.assignments[n]
    assert a.model == SEVEN and a.generation == failed.generation + 1, d.explain[n]
    assert d.explain[n].startswith(f"keeps {SEVEN}") and "refused qwen2.5-14b" in d.explain[n]
    seven = next(m for m in d.models if m.model == SEVEN)
    assert n in seven.pcs and seven.running == 3


def test_a_quarantined_pc_keeps_its_assignment_but_is_not_counted_and_another_pc_takes_its_model():
    """A PC the audits quarantined gets no customers' requests: its model must be placed on
    another PC, while its own assignment stays for the re-check that may release it."""
    r = Region.of(uniform(3), moves_per_minute=10)
    wanted = [Wanted(SEVEN), Wanted(FOURTEEN, min_replicas=1)]
    r.decide(wanted, {SEVEN: Demand(1000), FOURTEEN: Demand(0, 1, 1.0)})
    r.clock.advance(600)
    (bad,) = [n for n, m in r.models().items() if m == FOURTEEN]
    before = r.pcs[bad].assignment
    r.pcs[bad] = dataclasses.replace(r.pcs[bad], quarantined=True)
    d = r.decide(wanted, {SEVEN: Demand(1000), FOURTEEN: Demand(0, 1, 1.0)})
    assert d.assignments[bad] is before
    assert "quarantined by the region's audits" in d.explain[bad]
    fourteen = next(m for m in d.models if m.model == FOURTEEN)
    assert bad in fourteen.pcs
    assert [n for n, m in r.models().items() if m == FOURTEEN and n != bad]  # another PC took it
