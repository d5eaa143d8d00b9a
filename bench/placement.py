"""Benchmark: the head's placement (garage_node/placement/decide.py) over a simulated region, side
by side with today's behaviour (each PC serves the largest catalog model that fits it).
Prints figures; asserts nothing. Goals (issue #18): decision p99 <= 100 ms, share of requested
tokens served >= 0.95.

The region: --pcs PCs (default 1,000) with the GPU mix of the catalog's target cards (8, 12, 16
and 24 GB cards; 10 % of PCs with two GPUs, identical or not) and --models models (default 20,
made from the catalog's Qwen2.5 ladder under distinct names, so several models share each size).
The demand: a Zipf popularity over the models whose order changes every --phase-min minutes
(cross-fading over a third of a phase), in total --load x what the region could serve.

A PC's throughput for a model is modelled as memory-bound decoding: tokens/s = EFFICIENCY x
BATCH x (GB/s of its GPUs) / (GB of weights read per token). A moved PC serves nothing for
SWITCH_S (60 s when it holds the weights, 300 s when it fetches them). Served tokens per model
per step = min(demand, capacity of the PCs serving it); demand beyond that is not served.

    .venv/bin/python bench/placement.py [--pcs 1000] [--models 20] [--hours 3] [--step-s 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from garage_node.core import wire  # noqa: E402
from garage_node.placement import fit  # noqa: E402
from garage_node.placement.catalog import Catalog, ModelSpec, load_catalog  # noqa: E402
from garage_node.placement.decide import Demand, PcView, Placer, Wanted  # noqa: E402
from testing.fakes import FakeClock  # noqa: E402

# (name, MiB, compute capability, memory bandwidth GB/s), by share of PCs.
CARDS = {
    "4060": ("NVIDIA GeForce RTX 4060", 8188, "8.9", 272),
    "3060": ("NVIDIA GeForce RTX 3060", 12288, "8.6", 360),
    "4070": ("NVIDIA GeForce RTX 4070", 12282, "8.9", 504),
    "4060ti": ("NVIDIA GeForce RTX 4060 Ti", 16380, "8.9", 288),
    "3090": ("NVIDIA GeForce RTX 3090", 24576, "8.6", 936),
    "4090": ("NVIDIA GeForce RTX 4090", 24564, "8.9", 1008),
}
MIX = [  # (cards in the PC, share of PCs)
    (("4060",), 0.22), (("3060",), 0.14), (("4070",), 0.12), (("4060ti",), 0.16), (("3090",), 0.08),
    (("4090",), 0.18), (("4060ti", "4060ti"), 0.04), (("4090", "4060"), 0.03), (("4070", "4060"), 0.03),
]
BANDWIDTH = {c[0]: c[3] for c in CARDS.values()}
EFFICIENCY, BATCH = 0.5, 16
SWITCH_HELD_S, SWITCH_FETCH_S = 60.0, 300.0
# How the 20 models are drawn from the ladder (small models are plentiful, big ones fewer).
LADDER_USE = ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-3b", "qwen2.5-3b",
              "qwen2.5-7b", "qwen2.5-7b", "qwen2.5-7b", "qwen2.5-7b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-14b",
              "qwen2.5-14b", "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-32b", "qwen2.5-32b", "qwen2.5-7b", "qwen2.5-3b"]
TOKENS_PER_REQUEST = 512


# ---------------------------------------------------------------- the region


def synth_catalog(n: int) -> Catalog:
    base = load_catalog(ROOT / "configs" / "models.toml")
    by_name = {m.name: m for m in base.models}
    models: list[ModelSpec] = []
    for i in range(n):
        src = by_name[LADDER_USE[i % len(LADDER_USE)]]
        name = f"m{i:02d}-{src.name.removeprefix('qwen2.5-')}"
        quants = {k: dataclasses.replace(q, model_id=f"bench/{name}-{k}") for k, q in src.quantizations.items()}
        models.append(dataclasses.replace(src, name=name, id=f"bench/{name}", quantizations=quants, test_only=False))
    return Catalog(base.path, tuple(models), base.images)


def gpu_list(kinds: tuple[str, ...]) -> list[wire.GPU]:
    return [wire.GPU(index=i, name=CARDS[k][0], uuid=f"GPU-{i}", memory_total_mib=CARDS[k][1],
                     memory_free_mib=CARDS[k][1], compute_capability=CARDS[k][2], temperature_c=50, power_w=100.0,
                     utilization_pct=0) for i, k in enumerate(kinds)]


def make_pcs(n: int, rng: random.Random) -> list[list[wire.GPU]]:
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    return [gpu_list(rng.choices(kinds, weights)[0]) for _ in range(n)]


def base_report(gpus: list[wire.GPU]) -> wire.NodeReport:
    return wire.NodeReport(
        state=wire.NodeState.JOINED, message="joined", gpus=gpus, gpu_note=None, driver_version="550.120",
        cuda_version="12.4", versions=wire.AgentVersions(agent="0.1.0", ray="2.60.0", python="3.11"),
        ray=wire.RayStatus(state=wire.RayState.ALIVE), engine=wire.EngineReport(state=wire.EngineState.DISABLED),
        placement=wire.PlacementFacts())


def capacity(catalog: Catalog, gpus: list[wire.GPU], model: str, quant: str, indices: tuple[int, ...]) -> float:
    """Tokens/s this PC serves of `model` (memory-bound decoding, see the module's docstring)."""
    spec = next(m for m in catalog.models if m.name == model)
    gb = spec.parameters * spec.quantizations[quant].bytes_per_param / 1e9
    used = [g for g in gpus if g.index in indices] or gpus
    bw = sum(BANDWIDTH[g.name] for g in used)
    if len(used) > 1 and len({g.name for g in used}) > 1:
        bw = min(BANDWIDTH[g.name] for g in used) * len(used)  # a pipeline runs at its slowest stage
    return EFFICIENCY * BATCH * bw / gb


# ---------------------------------------------------------------- the demand


class Trace:
    """Zipf popularity whose order is reshuffled every phase, cross-faded over a third of it."""

    def __init__(self, models: list[str], phase_s: float, rng: random.Random, total: float) -> None:
        self.models, self.phase_s, self.total = models, phase_s, total
        self.orders = [rng.sample(models, len(models)) for _ in range(64)]
        self.zipf = [1 / (r + 1) for r in range(len(models))]
        s = sum(self.zipf)
        self.zipf = [z / s for z in self.zipf]

    def shares(self, t: float, order: int) -> dict[str, float]:
        return {m: self.zipf[r] for r, m in enumerate(self.orders[order % len(self.orders)])}

    def at(self, t: float) -> dict[str, float]:
        k, into = divmod(t, self.phase_s)
        fade = min(1.0, into / (self.phase_s / 3))
        a, b = self.shares(t, int(k) - 1), self.shares(t, int(k))
        return {m: self.total * ((1 - fade) * a[m] + fade * b[m]) for m in self.models}


# ---------------------------------------------------------------- the two policies


@dataclasses.dataclass
class PcSim:
    gpus: list[wire.GPU]
    report: wire.NodeReport
    serving: str | None = None  # the model it serves now
    quant: str = ""
    indices: tuple[int, ...] = ()
    ready_at: float = 0.0  # serving from then on (after a switch)
    assignment: wire.Assignment | None = None
    held: tuple[str, ...] = ()  # weights on its disk, most recent last (3 kept)


def todays_choice(catalog: Catalog, gpus: list[wire.GPU]) -> tuple[str, str, tuple[int, ...]] | None:
    try:
        p = fit.plan(fit.GpuFacts(tuple(gpus), "550.120", "12.4"), catalog)
    except fit.PlanError:
        return None
    return p.model.name, p.quantization.name, p.gpu_indices


def serve(catalog: Catalog, sims: list[PcSim], demand: dict[str, float], now: float,
          caps: dict[tuple, float]) -> tuple[float, dict[str, float]]:
    cap: dict[str, float] = {m: 0.0 for m in demand}
    for s in sims:
        if s.serving is not None and s.ready_at <= now:
            key = (id(s), s.serving, s.quant)
            if key not in caps:
                caps[key] = capacity(catalog, s.gpus, s.serving, s.quant, s.indices)
            cap[s.serving] = cap.get(s.serving, 0.0) + caps[key]
    served = sum(min(d, cap.get(m, 0.0)) for m, d in demand.items())
    return served, cap


def region_capacity_estimate(catalog: Catalog, sims: list[PcSim], shares: dict[str, float]) -> float:
    """Tokens/s the region serves at full use with demand in these shares (each PC's mean
    throughput over the models it fits, weighted by share): sizes the trace's total."""
    total = 0.0
    for s in sims:
        rates = []
        for m, w in shares.items():
            try:
                p = fit.plan(fit.GpuFacts(tuple(s.gpus), "550.120", "12.4"), catalog, pinned_model=m)
            except fit.PlanError:
                continue
            rates.append((w, capacity(catalog, s.gpus, m, p.quantization.name, p.gpu_indices)))
        if rates:
            wsum = sum(w for w, _ in rates)
            # Harmonic: the tokens of a mixed demand a PC gets through per second.
            total += wsum / sum(w / r for w, r in rates)
    return total


def run(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    catalog = synth_catalog(args.models)
    names = [m.name for m in catalog.models]
    pc_gpus = make_pcs(args.pcs, rng)
    today = [PcSim(g, base_report(g)) for g in pc_gpus]
    for s in today:
        got = todays_choice(catalog, s.gpus)
        if got:
            s.serving, s.quant, s.indices = got
    trace0 = Trace(names, args.phase_min * 60, random.Random(args.seed + 1), 1.0)
    est = region_capacity_estimate(catalog, today[: min(200, len(today))], trace0.at(0.0)) * len(today) / min(200, len(today))
    trace = Trace(names, args.phase_min * 60, random.Random(args.seed + 1), args.load * est)

    head = [dataclasses.replace(s) for s in today]  # the head takes over a region serving today's choices
    clock = FakeClock(start=0.0)
    placer = Placer(catalog, moves_per_minute=args.moves_per_minute, hysteresis=args.hysteresis,
                    hold_down_s=args.hold_down_s, clock=clock)
    wanted = [Wanted(m) for m in names]
    steps = int(args.hours * 3600 / args.step_s)
    took: list[float] = []
    cpu: list[float] = []  # the process's CPU time per decision: steadier on a shared machine
    switches = 0
    sums = {"today": [0.0, 0.0], "head": [0.0, 0.0]}
    warm = {"today": [0.0, 0.0], "head": [0.0, 0.0]}
    caps_today: dict[tuple, float] = {}
    caps_head: dict[tuple, float] = {}
    cap_prev: dict[str, float] = {}
    wall = time.perf_counter()
    for step in range(steps):
        now = step * args.step_s
        clock.mono = now
        demand = trace.at(now)
        requested = sum(demand.values())
        # The gateway's view (last step's capacity): tokens/s asked, requests open, requests no PC took.
        views = [_view(i, s, now) for i, s in enumerate(head)]
        gateway = {m: Demand(tokens_per_s=d, queue_depth=int(max(0.0, d - cap_prev.get(m, 0.0)) / 100),
                             unserved_per_s=d / TOKENS_PER_REQUEST if cap_prev.get(m, 0.0) == 0 and d > 0 else 0.0)
                   for m, d in demand.items()}
        cpu0 = time.process_time()
        decision = placer.decide(views, wanted, gateway)
        cpu.append(time.process_time() - cpu0)
        took.append(decision.took_s)
        switches += _apply(catalog, head, decision, now)
        for name, sims, caps in (("today", today, caps_today), ("head", head, caps_head)):
            served, cap = serve(catalog, sims, demand, now, caps)
            sums[name][0] += served
            sums[name][1] += requested
            if now >= args.warmup_min * 60:
                warm[name][0] += served
                warm[name][1] += requested
            if name == "head":
                cap_prev = cap
    wall = time.perf_counter() - wall
    churn = _restart_churn(catalog, head, placer, clock, wanted, gateway, args)
    _print(args, took, cpu, sums, warm, switches, steps, wall, est)
    print(f"head restart: a new placer given the settled region's stored assignments changed {churn}"
          f" of {len(head)} (the goal: none)")


def _restart_churn(catalog: Catalog, sims: list[PcSim], placer: Placer, clock: FakeClock, wanted: list[Wanted],
                   gateway: dict[str, Demand], args: argparse.Namespace) -> int:
    """Let the region settle under the last demand, then decide with a new Placer (the head
    restarted, its assignments read back from the registry): how many assignments change."""
    for _ in range(60):
        clock.mono += 60
        d = placer.decide([_view(i, s, clock.mono) for i, s in enumerate(sims)], wanted, gateway)
        _apply(catalog, sims, d, clock.mono)
        if not d.moves and all(s.ready_at <= clock.mono for s in sims):
            break
    fresh = Placer(catalog, moves_per_minute=args.moves_per_minute, hysteresis=args.hysteresis,
                   hold_down_s=args.hold_down_s, clock=FakeClock(start=0.0))
    views = [_view(i, s, clock.mono) for i, s in enumerate(sims)]
    d = fresh.decide(views, wanted, gateway)
    return sum(1 for v in views if d.assignments.get(v.node_id) is not v.assignment)


def _view(i: int, s: PcSim, now: float) -> PcView:
    a = s.assignment
    ready = s.serving is not None and s.ready_at <= now
    model_id = f"bench/{s.serving}" if ready else None
    facts = wire.PlacementFacts(weights_held=list(s.held), assignment_generation=a.generation if a else 0,
                                switching_to=s.serving if (s.serving and not ready) else None)
    engine = wire.EngineReport(state=wire.EngineState.HEALTHY if ready else wire.EngineState.STARTING, model=model_id)
    report = dataclasses.replace(s.report, engine=engine, placement=facts)
    return PcView(f"pc{i:04d}", f"pc{i:04d}", report, a, True)


def _apply(catalog: Catalog, sims: list[PcSim], d, now: float) -> int:
    """Carry out the decision as agents do; returns how many PCs changed model."""
    changed = 0
    for i, s in enumerate(sims):
        a = d.assignments.get(f"pc{i:04d}")
        if a is None:
            continue
        s.assignment = a
        if a.model != s.serving or (a.model is not None and a.quantization != s.quant):
            if s.serving is not None:
                changed += 1
            if a.model is None:
                s.serving = None
                continue
            s.ready_at = now + (SWITCH_HELD_S if a.model in s.held else SWITCH_FETCH_S)
            s.serving, s.quant, s.indices = a.model, a.quantization or "", tuple(a.gpu_indices)
            s.held = tuple([h for h in s.held if h != a.model] + [a.model])[-3:]
    return changed


def _pct(values: list[float]) -> tuple[float, float]:
    ms = sorted(v * 1000 for v in values)
    return statistics.median(ms), ms[min(len(ms) - 1, int(0.99 * len(ms)))]


def _print(args, took, cpu, sums, warm, switches, steps, wall, est) -> None:
    p50, p99 = _pct(took)
    c50, c99 = _pct(cpu)
    share = {k: v[0] / v[1] if v[1] else 0.0 for k, v in sums.items()}
    share_warm = {k: v[0] / v[1] if v[1] else 0.0 for k, v in warm.items()}
    print(f"region: {args.pcs} PCs, {args.models} models, {args.hours:g} h in steps of {args.step_s:g} s"
          f" ({steps} decisions), popularity reshuffled every {args.phase_min:g} min;"
          f" demand {args.load:.0%} of the region's estimated {est:,.0f} tokens/s")
    print(f"placer: moves_per_minute {args.moves_per_minute}, hysteresis {args.hysteresis}, "
          f"hold-down {args.hold_down_s:g} s; switch {SWITCH_HELD_S:g} s with weights held, {SWITCH_FETCH_S:g} s fetching")
    print()
    print(f"{'':40s} {'head placement':>16s} {'today (largest)':>16s}")
    print(f"{'decision time p50 / p99 (ms)':40s} {f'{p50:.1f} / {p99:.1f}':>16s} {'-':>16s}")
    print(f"{'  CPU time p50 / p99 (ms)':40s} {f'{c50:.1f} / {c99:.1f}':>16s} {'-':>16s}")
    print(f"{'  first decision, plans not cached (ms)':40s} {took[0] * 1000:>16.1f} {'-':>16s}")
    print(f"{'share of requested tokens served':40s} {share['head']:>16.3f} {share['today']:>16.3f}")
    print(f"{f'  after the first {args.warmup_min:g} min':40s} {share_warm['head']:>16.3f} {share_warm['today']:>16.3f}")
    print(f"{'switches (PCs that changed model)':40s} {switches:>16d} {0:>16d}")
    print(f"\n(simulation wall time {wall:.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pcs", type=int, default=1000)
    ap.add_argument("--models", type=int, default=20)
    ap.add_argument("--hours", type=float, default=3.0)
    ap.add_argument("--step-s", type=float, default=30.0, help="seconds between placement decisions")
    ap.add_argument("--phase-min", type=float, default=30.0, help="minutes between popularity reshuffles")
    ap.add_argument("--load", type=float, default=0.6, help="demand as a share of the region's capacity")
    ap.add_argument("--moves-per-minute", type=int, default=50)
    ap.add_argument("--hysteresis", type=float, default=0.1)
    ap.add_argument("--hold-down-s", type=float, default=180.0)
    ap.add_argument("--warmup-min", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=18)
    run(ap.parse_args())


if __name__ == "__main__":
    main()
