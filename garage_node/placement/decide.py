"""The head's placement: which model each PC of a region serves (issue #18).

Placer.decide() is a pure function of what the head knows (each PC's report and the assignment
it has, the operator's wanted models, the gateway's demand) plus the Placer's short memory of its
own moves (for the move budget and the hold-down). Its rules, in order:

- A PC serves at most one model, and only one in the region's wanted list that fits its GPUs and
  passes the CUDA gate, as the PC's own planner (fit.py) would plan it. A CPU PC (vLLM's CPU
  build) takes only models the catalog marks `cpu = true`.
- The owner's pin is "this model or nothing". A paused PC gets nothing new and keeps what it has;
  so does a PC that is not alive (it is not counted as running meanwhile). A PC that sends no
  PlacementFacts (an older agent) is never assigned anything: it plans for itself.
- Each model's share of the PCs follows its demand (targets.py: in typical PCs, weighed by decode
  speed), within min/max replicas; a model with demand and no PC comes first, then models under
  their minimum, then the largest gaps.
- A PC without a (valid) model takes one at once. Moving a PC that serves a model costs one of
  `moves_per_minute`, with hysteresis and a hold-down against flapping (moves.py).
- Among PCs that could take a model, those that hold its weights (or serve it) come first.
- A PC that refused its assignment (PlacementFacts.refused_generation: the owner's pin differs,
  it does not fit, its weights failed their check, its engine never became healthy) is counted as
  not running that model, and the model is not assigned to that PC again for `refused_hold_s`:
  it gets another model, or nothing, and explain[node id] says so.

Decision.assignments holds an Assignment for every PC that has PlacementFacts and either an
assignment already or a state that allows a new one; an unchanged assignment is the same object
with the same generation (so a head that restarts and feeds its stored assignments back in changes
nothing), a changed one has generation + 1. A new assignment carries the model's catalog entry
(Assignment.catalog_entry), so a PC whose own catalog lacks it (imported at the head) plans it
with the same facts.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from garage_node.core.clock import SYSTEM, Clock
from garage_node.core.wire import MESSAGE_MAX, Assignment, CatalogModel, EngineState, clip
from garage_node.placement.catalog import Catalog, EngineImage, ModelSpec, entry_of
from garage_node.placement.moves import Mover
from garage_node.placement.options import Option, Options, Refusal
from garage_node.placement.round import PcState, Tally, need_words, urgency
from garage_node.placement.targets import ModelNeed, Target, targets
from garage_node.placement.views import Decision, Demand, ModelView, PcView, PlacementError, Wanted

__all__ = ["Decision", "Demand", "ModelView", "PcView", "PlacementError", "Placer", "Wanted"]

DEFAULT_HYSTERESIS = 0.10
DEFAULT_HOLD_DOWN_S = 180.0
# How long a model a PC refused is not assigned to that PC again. Long against a pass (what made
# it refuse, a pin or a GPU too small, rarely changes by itself), short enough that an operator's
# fix (weights stored again, the owner's pin lifted) is tried within minutes.
DEFAULT_REFUSED_HOLD_S = 600.0
# Engine states in which a PC counts as serving its model (draining counts: it still answers).
_SERVING_STATES = (EngineState.HEALTHY, EngineState.DEGRADED)
_LOADING_STATES = (EngineState.STARTING, EngineState.PULLING, EngineState.RESTARTING)


class Placer:
    def __init__(self, catalog: Catalog, *, moves_per_minute: int = 6, hysteresis: float = DEFAULT_HYSTERESIS,
                 hold_down_s: float = DEFAULT_HOLD_DOWN_S, clock: Clock = SYSTEM,
                 image: str | None = None, refused_hold_s: float = DEFAULT_REFUSED_HOLD_S) -> None:
        """`image`: the engine image PCs run, for the CUDA gate (its facts come from the
        catalog's [images]); None: the catalog's only image if it lists exactly one."""
        if moves_per_minute < 0:
            raise PlacementError(f"moves_per_minute must be 0 or more, got {moves_per_minute}")
        if not 0 <= hysteresis < 1:
            raise PlacementError(f"hysteresis must be in [0, 1), got {hysteresis}")
        self.catalog = catalog
        self.moves_per_minute = moves_per_minute
        self.clock = clock
        self.options = Options(catalog, _image(catalog, image))
        # Catalog name, repo id or a precision's repo id -> catalog name (Catalog.resolve's
        # answers, looked up once: every PC's engine names its model by repo id).
        self._names: dict[str, str] = {}
        for m in catalog.models:
            for ref in (m.name, m.id, *(q.model_id for q in m.offered)):
                self._names.setdefault(ref, m.name)
        self.mover = Mover(moves_per_minute, hysteresis, hold_down_s)
        if not refused_hold_s >= 0:
            raise PlacementError(f"refused_hold_s must be 0 or more, got {refused_hold_s}")
        self.refused_hold_s = refused_hold_s
        # node id -> catalog model -> (held off until (monotonic), the generation refused, why)
        self._refused: dict[str, dict[str, tuple[float, int, str]]] = {}
        self._entries = {m.name: entry_of(m) for m in catalog.models}  # what new assignments carry

    # ------------------------------------------------------------ the decision

    def decide(self, pcs: Sequence[PcView], wanted: Sequence[Wanted],
               demand: Mapping[str, Demand]) -> Decision:
        start = time.perf_counter()
        now = self.clock.monotonic()
        self.mover.forget(now)
        self._forget_refusals(now)
        specs, unknown = self._wanted(wanted)
        menu_all = [(spec, w.max_model_len) for w, spec in specs.values()]
        menu_key = tuple((spec.name, ctx) for spec, ctx in menu_all)
        rows = [r for pc in pcs if (r := self._row(pc, specs, menu_all, menu_key, now)) is not None]
        active = [r for r in rows if r.active and r.options]
        tg, count = self._targets(specs, demand, active)
        for r in active:
            if r.current in r.options:
                r.choice = r.current
                count.add(r, r.current)
                r.why = self._keep_why(r, tg)
        budget = self.mover.budget()
        moves: list[str] = []
        budget = self._place_free(active, tg, count, demand, budget, moves, now)
        self.mover.rebalance(active, tg, count, demand, budget, moves, now)
        assignments, explain = self._assignments(rows)
        models = self._views(specs, unknown, tg, count, demand, rows)
        refused = {r.node_id: r.refused for r in rows if r.refused}
        return Decision(assignments, models, moves, explain, time.perf_counter() - start, refused)


    def _wanted(self, wanted: Sequence[Wanted]) -> tuple[dict[str, tuple[Wanted, ModelSpec]], list[Wanted]]:
        specs: dict[str, tuple[Wanted, ModelSpec]] = {}
        unknown: list[Wanted] = []
        for w in wanted:
            _check(w)
            found = self.catalog.resolve(w.model)
            if found is None:
                unknown.append(w)
            else:
                specs[found[0].name] = (w, found[0])
        return specs, unknown

    def _resolve(self, ref: str | None) -> str | None:
        return self._names.get(ref) if ref else None

    def _row(self, pc: PcView, specs: Mapping[str, tuple[Wanted, ModelSpec]],
             menu_all: list[tuple[ModelSpec, int | None]], menu_key: tuple, now: float) -> PcState | None:
        facts = pc.report.placement
        if facts is None:
            return None
        engine = pc.report.engine
        served = self._resolve(engine.model) if engine.state in _SERVING_STATES + _LOADING_STATES else None
        prev = pc.assignment
        current = prev.model if prev is not None else served
        current = self._resolve(current) if current else None
        refused = prev is not None and prev.model is not None and prev.generation > 0 \
            and facts.refused_generation == prev.generation
        if refused:
            # It will not serve what it was assigned: it runs what it ran before (or goes back
            # to it), and its assignment is made anew from what it can serve.
            assert prev is not None and prev.model is not None
            model = self._resolve(prev.model) or prev.model
            self._note_refusal(pc.node_id, model, prev.generation, facts.refused_why, now)
            served = None if served == model else served
            current = served
        r = PcState(pc, facts, served, current, active=pc.alive and not facts.paused and not pc.quarantined)
        r.held_down = self.mover.held_down(pc.node_id)
        if prev is not None and prev.model is not None and not refused:
            r.switching = facts.switching_to is not None or facts.assignment_generation < prev.generation
        held_off = self._refused.get(pc.node_id, {})
        if held_off:
            r.refused = "; ".join(f"refused {m} (generation {g}): {why}; not assigned it again for {until - now:.0f} s"
                                  for m, (until, g, why) in held_off.items())
        if not r.active:
            r.choice = current if prev is not None else None
            state = ("not alive" if not pc.alive else "quarantined by the region's audits" if pc.quarantined
                     else "paused by its owner")
            r.why = (f"{state}: keeps {prev.model or 'nothing'} (generation {prev.generation}), not counted as running"
                     if prev is not None else f"{state}: gets nothing new")
            return r
        pin = self._resolve(facts.pinned_model) if facts.pinned_model else None
        if facts.pinned_model and pin not in specs:
            r.why = (f"its owner pinned {facts.pinned_model}, which is not in the region's wanted models: "
                     "serves nothing (the owner's pin means that model or nothing)")
            return r
        if pin is None:
            menu = self.options.menu(pc.report, facts, menu_all, menu_key)
        else:
            w, spec = specs[pin]
            menu = self.options.menu(pc.report, facts, [(spec, w.max_model_len)])
        r.options, r.refusals = menu.options, menu.refusals
        if held_off:
            # A copy: the menu is shared by every PC alike.
            r.options = {m: o for m, o in menu.options.items() if m not in held_off}
            r.refusals = menu.refusals + tuple(Refusal(m, "this PC refused it") for m in held_off if m in menu.options)
        if not r.options:
            r.why = "no wanted model fits: " + "; ".join(f"{x.model}: {x.why}" for x in r.refusals[:3]) \
                if r.refusals else "the region wants no model"
        return r

    def _targets(self, specs: Mapping[str, tuple[Wanted, ModelSpec]], demand: Mapping[str, Demand],
                 active: list[PcState]) -> tuple[dict[str, Target], Tally]:
        eligible = {m: 0 for m in specs}
        rate = {m: 0.0 for m in specs}
        groups: dict[str, set[int]] = {m: set() for m in specs}
        alike: dict[int, tuple[dict[str, Option], int]] = {}  # PCs alike share their options
        for r in active:
            opts, n = alike.get(id(r.options), (r.options, 0))
            alike[id(r.options)] = (opts, n + 1)
        for key, (opts, n) in alike.items():
            for m, o in opts.items():
                eligible[m] += n
                rate[m] += n * o.rate
                groups[m].add(key)
        needs = []
        for name, (w, _) in specs.items():
            d = demand.get(w.model) or demand.get(name) or Demand()
            rate[name] = rate[name] / eligible[name] if eligible[name] else 0.0
            needs.append(ModelNeed(name, w.weight, d.tokens_per_s, d.unserved_per_s, d.any,
                                   rate[name], w.min_replicas, w.max_replicas, eligible[name],
                                   frozenset(groups[name])))
        sizes = {key: n for key, (_, n) in alike.items()}
        return targets(needs, len(active), sizes), Tally(rate)

    # ------------------------------------------------------------ PCs without a model

    def _place_free(self, active: list[PcState], tg: Mapping[str, Target], count: Tally,
                    demand: Mapping[str, Demand], budget: int, moves: list[str], now: float) -> int:
        """Every PC without a valid model takes the one it is most needed for. One that serves
        a model now (no longer wanted, or no longer fitting) spends the move budget."""
        free = [r for r in active if r.choice is None]
        # Idle PCs first (they cost no move), then those with the fewest options: a PC that can
        # serve only small models should take one before a big card has to.
        # Among those alike, the fastest first (largest first balances best: the slower PCs then
        # fill the gaps it leaves).
        free.sort(key=lambda r: (r.served is not None, len(r.options), -max(o.rate for o in r.options.values()),
                                 r.node_id))
        avail = {m: 0 for m in count.pcs}
        for r in free:
            for m in r.options:
                avail[m] += 1
        for r in free:
            for m in r.options:
                avail[m] -= 1
            pick = self._best_for(r, tg, count, demand, avail)
            if pick is None:
                r.why = "every model it fits has its maximum replicas"
                continue
            if r.served is not None and r.served != pick:
                if budget <= 0:
                    r.waits = True
                    r.why = (f"serves {r.served}, which the region no longer wants here; keeps it until the move "
                             f"budget ({self.moves_per_minute}/min) lets it switch to {pick}")
                    continue
                budget -= 1
                self.mover.moved(r, now, moves, r.served, pick)
            r.why = (f"{pick} ({r.options[pick].summary}): {need_words(tg[pick], count, demand.get(pick))}"
                     + (", and it holds the weights" if r.holds(pick) else ""))
            r.choice = pick
            count.add(r, pick)
        return budget

    def _best_for(self, r: PcState, tg: Mapping[str, Target], count: Tally,
                  demand: Mapping[str, Demand], avail: Mapping[str, int]) -> str | None:
        best: tuple | None = None
        pick = None
        for m in r.options:
            t = tg[m]
            if count.pcs[m] >= t.cap:
                continue
            gap = t.ideal - count.units[m]
            key = (urgency(t, count.pcs[m]), gap > 0, r.holds(m), gap / max(1, avail[m] + 1), gap, m)
            if best is None or key > best:
                best, pick = key, m
        return pick

    def _keep_why(self, r: PcState, tg: Mapping[str, Target]) -> str:
        o, t = r.options[r.current or ""], tg[r.current or ""]
        state = "switching to it" if r.switching else ("serving it" if r.served == r.current else "assigned it")
        hold = "; moved recently (hold-down)" if r.held_down else ""
        pin = "; pinned by its owner" if r.facts.pinned_model else ""
        return f"keeps {r.current} ({o.summary}), {state}; ideal {t.ideal:.1f} PCs for it{pin}{hold}"

    # ------------------------------------------------------------ refusals

    def _note_refusal(self, node_id: str, model: str, generation: int, why: str | None, now: float) -> None:
        """Hold `model` off the PC from the first report of this refusal (a PC that still reports
        it, while the move budget keeps it waiting, does not lengthen the hold)."""
        held = self._refused.setdefault(node_id, {})
        if model not in held or held[model][1] != generation:
            held[model] = (now + self.refused_hold_s, generation, why or "no reason given")

    def _forget_refusals(self, now: float) -> None:
        for node_id in list(self._refused):
            held = self._refused[node_id]
            for model in [m for m, (until, _, _) in held.items() if until <= now]:
                del held[model]
            if not held:
                del self._refused[node_id]

    # ------------------------------------------------------------ the answer

    def _assignments(self, rows: list[PcState]) -> tuple[dict[str, Assignment], dict[str, str]]:
        out: dict[str, Assignment] = {}
        explain: dict[str, str] = {}
        for r in rows:
            prev = r.view.assignment
            if r.refused:
                r.why = f"{r.why}; {r.refused}"  # in the assignment's reason too: the PC says it
            explain[r.node_id] = r.why
            if not r.active or r.waits:
                if prev is not None:
                    out[r.node_id] = prev
                continue
            new = _assignment(r, prev, self._entries)
            if new is not None:
                out[r.node_id] = new
        return out, explain

    def _views(self, specs: Mapping[str, tuple[Wanted, ModelSpec]], unknown: list[Wanted],
               tg: Mapping[str, Target], count: Tally, demand: Mapping[str, Demand],
               rows: list[PcState]) -> list[ModelView]:
        pcs: dict[str, list[str]] = {m: [] for m in specs}
        running = {m: 0 for m in specs}
        for r in rows:
            if r.choice in pcs:
                pcs[r.choice].append(r.node_id)
                if r.active and not r.switching and r.served == r.choice:
                    running[r.choice] += 1
        views = []
        for name, (w, _) in specs.items():
            t, d = tg[name], demand.get(w.model) or demand.get(name) or Demand()
            views.append(ModelView(name, d, round(t.ideal), running[name], sorted(pcs[name]),
                                   _model_why(t, d, count, running[name], w)))
        for w in unknown:
            views.append(ModelView(w.model, demand.get(w.model) or Demand(), 0, 0, [],
                                   f"{w.model} is not in the region's catalog: import its entry "
                                   "(`garage-node head model import FILE`)"))
        return views


# ---------------------------------------------------------------- helpers


def _check(w: Wanted) -> None:
    what = f"wanted model {w.model!r}: "
    if w.min_replicas < 0:
        raise PlacementError(what + f"min_replicas must be 0 or more, got {w.min_replicas}")
    if w.max_replicas is not None and w.max_replicas < max(w.min_replicas, 0):
        raise PlacementError(what + f"max_replicas {w.max_replicas} is below min_replicas {w.min_replicas}")
    if not w.weight >= 0 or w.weight == float("inf"):
        raise PlacementError(what + f"weight must be a finite number, 0 or more, got {w.weight}")
    if w.max_model_len is not None and w.max_model_len < 1:
        raise PlacementError(what + f"max_model_len must be a positive number of tokens, got {w.max_model_len}")


def _image(catalog: Catalog, ref: str | None) -> EngineImage | None:
    if ref is not None:
        return catalog.image(ref)
    return catalog.images[0] if len(catalog.images) == 1 else None


def _model_why(t: Target, d: Demand, count: Tally, running: int, w: Wanted) -> str:
    limits = f"min {w.min_replicas}" + (f", max {w.max_replicas}" if w.max_replicas is not None else "") + \
        f", weight {w.weight:g}"
    if t.cap == 0:
        return f"no PC that is up can serve it ({limits})"
    demand_words = (f"{d.tokens_per_s:.0f} tokens/s, {d.queue_depth} open, {d.unserved_per_s:.2f} unserved/s,"
                    f" {t.share:.0%} of the region's demand" if t.pressure > 0
                    else f"no demand: {t.share:.0%} of the region by weight" if t.share > 0 else "no demand")
    return (f"{demand_words}; ideal {t.ideal:.1f} typical PCs ({limits}, {t.cap} could serve it);"
            f" {count.words(t.model)} assigned, {running} running")


def _assignment(r: PcState, prev: Assignment | None, entries: Mapping[str, CatalogModel]) -> Assignment | None:
    generation = prev.generation if prev is not None else 0
    if r.choice is None:
        if prev is None or prev.model is None:
            # Nothing to serve: say so once (a pinned PC whose pin is not wanted, nothing fits).
            return prev or Assignment(generation=1, model=None, reason=clip(r.why, MESSAGE_MAX))
        return Assignment(generation=generation + 1, model=None, reason=clip(r.why, MESSAGE_MAX))
    o = r.options[r.choice]
    if prev is not None and _same(prev, o):
        return prev
    return Assignment(generation=generation + 1, model=o.model, quantization=o.quantization,
                     max_model_len=o.max_model_len, gpu_indices=list(o.gpu_indices),
                     tensor_parallel_size=o.tensor_parallel_size, pipeline_parallel_size=o.pipeline_parallel_size,
                     layer_partition=list(o.layer_partition), reason=clip(r.why, MESSAGE_MAX),
                     catalog_entry=entries.get(o.model))


def _same(a: Assignment, o: Option) -> bool:
    """Whether the assignment already says what the option does (the reason aside)."""
    return (a.model == o.model and a.quantization == o.quantization and a.max_model_len == o.max_model_len
            and tuple(a.gpu_indices) == o.gpu_indices and a.tensor_parallel_size == o.tensor_parallel_size
            and a.pipeline_parallel_size == o.pipeline_parallel_size
            and tuple(a.layer_partition) == o.layer_partition)
