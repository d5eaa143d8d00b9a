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
- Each model's share of the PCs follows its demand (targets.py), within min/max replicas; a model
  with demand and no PC comes first, then models under their minimum, then the largest gaps.
- A PC without a (valid) model takes one at once. Moving a PC that serves a wanted model to another
  costs one of `moves_per_minute` (a sliding minute), and happens only when the target model is
  short by more than half a PC plus `hysteresis` x its ideal count and the donor model is over by
  as much (so demand that wobbles moves nothing); a moved PC is not moved again for `hold_down_s`.
- Among PCs that could take a model, those that hold its weights (or serve it) come first.

Decision.assignments holds an Assignment for every PC that has PlacementFacts and either an
assignment already or a state that allows a new one; an unchanged assignment is the same object
with the same generation (so a head that restarts and feeds its stored assignments back in changes
nothing), a changed one has generation + 1.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from garage_node.core.clock import SYSTEM, Clock
from garage_node.core.wire import MESSAGE_MAX, Assignment, EngineState, NodeReport, PlacementFacts, clip
from garage_node.placement.catalog import Catalog, EngineImage, ModelSpec
from garage_node.placement.options import Option, Options, Refusal
from garage_node.placement.targets import ModelNeed, Target, targets

DEFAULT_HYSTERESIS = 0.10
DEFAULT_HOLD_DOWN_S = 180.0
MOVE_WINDOW_S = 60.0
# Engine states in which a PC counts as serving its model (draining counts: it still answers).
_SERVING_STATES = (EngineState.HEALTHY, EngineState.DEGRADED)
_LOADING_STATES = (EngineState.STARTING, EngineState.PULLING, EngineState.RESTARTING)


@dataclass(frozen=True)
class Wanted:
    """A model the operator wants served (`garage-node head model add`)."""

    model: str
    min_replicas: int = 0
    max_replicas: int | None = None
    weight: float = 1.0
    # The context every replica must give; None: the longest each PC fits. A context a PC's
    # biggest GPU cannot hold is what sends a model onto a pipeline over unequal GPUs.
    max_model_len: int | None = None


@dataclass(frozen=True)
class Demand:
    """One model's demand over the gateway's sliding window."""

    tokens_per_s: float = 0.0
    queue_depth: int = 0
    unserved_per_s: float = 0.0  # requests per second that found no PC

    @property
    def any(self) -> bool:
        return self.tokens_per_s > 0 or self.queue_depth > 0 or self.unserved_per_s > 0


@dataclass(frozen=True)
class PcView:
    node_id: str
    name: str
    report: NodeReport
    assignment: Assignment | None
    alive: bool


@dataclass(frozen=True)
class ModelView:
    model: str
    demand: Demand
    wanted: int  # PCs it should have now (the ideal, rounded)
    running: int  # PCs serving it now (alive, switched, engine up)
    pcs: list[str]  # node ids assigned to it (running or on their way)
    why: str


@dataclass(frozen=True)
class Decision:
    assignments: dict[str, Assignment]
    models: list[ModelView]
    moves: list[str]  # "name (node id): old -> new", the PCs moved off a model this time
    explain: dict[str, str]  # node id -> why, in words and numbers
    took_s: float


class PlacementError(ValueError):
    """The placer was given something it cannot use; the message says what and what to do."""


# ---------------------------------------------------------------- the state of one PC this round


@dataclass
class _Pc:
    view: PcView
    facts: PlacementFacts
    served: str | None  # the catalog model its engine runs now
    current: str | None  # what it is assigned (or, with no assignment yet, serves)
    active: bool  # alive, not paused: may be given a model
    options: dict[str, Option] = field(default_factory=dict)
    refusals: list[Refusal] = field(default_factory=list)
    switching: bool = False
    held_down: bool = False
    choice: str | None = None
    why: str = ""

    @property
    def node_id(self) -> str:
        return self.view.node_id

    @property
    def movable(self) -> bool:
        return self.active and not self.switching and not self.held_down and not self.facts.pinned_model

    def holds(self, model: str) -> bool:
        return model in self.facts.weights_held or model == self.served


class Placer:
    def __init__(self, catalog: Catalog, *, moves_per_minute: int = 6, hysteresis: float = DEFAULT_HYSTERESIS,
                 hold_down_s: float = DEFAULT_HOLD_DOWN_S, clock: Clock = SYSTEM,
                 image: str | None = None) -> None:
        """`image`: the engine image PCs run, for the CUDA gate (its facts come from the
        catalog's [images]); None: the catalog's only image if it lists exactly one."""
        if moves_per_minute < 0:
            raise PlacementError(f"moves_per_minute must be 0 or more, got {moves_per_minute}")
        if not 0 <= hysteresis < 1:
            raise PlacementError(f"hysteresis must be in [0, 1), got {hysteresis}")
        self.catalog = catalog
        self.moves_per_minute = moves_per_minute
        self.hysteresis = hysteresis
        self.hold_down_s = hold_down_s
        self.clock = clock
        self.options = Options(catalog, _image(catalog, image))
        self._recent: deque[float] = deque()  # when each recent move was made (monotonic)
        self._moved_at: dict[str, float] = {}  # node id -> when it was last moved

    # ------------------------------------------------------------ the decision

    def decide(self, pcs: Sequence[PcView], wanted: Sequence[Wanted],
               demand: Mapping[str, Demand]) -> Decision:
        start = time.perf_counter()
        now = self.clock.monotonic()
        self._forget(now)
        specs, unknown = self._wanted(wanted)
        rows = [r for pc in pcs if (r := self._row(pc, specs, now)) is not None]
        active = [r for r in rows if r.active and r.options]
        tg = self._targets(specs, demand, active)
        count = {m: 0 for m in specs}
        for r in active:
            if r.current in r.options:
                r.choice = r.current
                count[r.current] += 1
                r.why = self._keep_why(r, tg)
        budget = max(0, self.moves_per_minute - len(self._recent))
        moves: list[str] = []
        budget = self._place_free(active, tg, count, demand, budget, moves, now)
        self._rebalance(active, tg, count, demand, budget, moves, now)
        assignments, explain = self._assignments(rows)
        models = self._views(specs, unknown, tg, count, demand, rows)
        return Decision(assignments, models, moves, explain, time.perf_counter() - start)

    def _forget(self, now: float) -> None:
        while self._recent and self._recent[0] <= now - MOVE_WINDOW_S:
            self._recent.popleft()
        for node_id in [n for n, t in self._moved_at.items() if t <= now - self.hold_down_s]:
            del self._moved_at[node_id]

    def _wanted(self, wanted: Sequence[Wanted]) -> tuple[dict[str, tuple[Wanted, ModelSpec]], list[Wanted]]:
        specs: dict[str, tuple[Wanted, ModelSpec]] = {}
        unknown: list[Wanted] = []
        for w in wanted:
            found = self.catalog.resolve(w.model)
            if found is None:
                unknown.append(w)
            else:
                specs[found[0].name] = (w, found[0])
        return specs, unknown

    def _resolve(self, ref: str | None) -> str | None:
        found = self.catalog.resolve(ref) if ref else None
        return found[0].name if found else None

    def _row(self, pc: PcView, specs: Mapping[str, tuple[Wanted, ModelSpec]], now: float) -> _Pc | None:
        facts = pc.report.placement
        if facts is None:
            return None
        engine = pc.report.engine
        served = self._resolve(engine.model) if engine.state in _SERVING_STATES + _LOADING_STATES else None
        prev = pc.assignment
        current = prev.model if prev is not None else served
        current = self._resolve(current) if current else None
        r = _Pc(pc, facts, served, current, active=pc.alive and not facts.paused)
        r.held_down = pc.node_id in self._moved_at
        if prev is not None and prev.model is not None:
            r.switching = facts.switching_to is not None or facts.assignment_generation < prev.generation
        if not r.active:
            r.choice = current if prev is not None else None
            state = "not alive" if not pc.alive else "paused by its owner"
            r.why = (f"{state}: keeps {prev.model or 'nothing'} (generation {prev.generation}), not counted as running"
                     if prev is not None else f"{state}: gets nothing new")
            return r
        pin = self._resolve(facts.pinned_model) if facts.pinned_model else None
        if facts.pinned_model and pin not in specs:
            r.why = (f"its owner pinned {facts.pinned_model}, which is not in the region's wanted models: "
                     "serves nothing (the owner's pin means that model or nothing)")
            return r
        hardware = self.options.hardware(pc.report, facts)
        for name, (w, spec) in specs.items():
            if pin is not None and name != pin:
                continue
            got = self.options.of(pc.report, facts, spec, w.max_model_len, hardware)
            if isinstance(got, Option):
                r.options[name] = got
            else:
                r.refusals.append(got)
        if not r.options:
            r.why = "no wanted model fits: " + "; ".join(f"{x.model}: {x.why}" for x in r.refusals[:3]) \
                if r.refusals else "the region wants no model"
        return r

    def _targets(self, specs: Mapping[str, tuple[Wanted, ModelSpec]], demand: Mapping[str, Demand],
                 active: list[_Pc]) -> dict[str, Target]:
        eligible = {m: 0 for m in specs}
        for r in active:
            for m in r.options:
                eligible[m] += 1
        needs = []
        for name, (w, spec) in specs.items():
            d = demand.get(w.model) or demand.get(name) or Demand()
            needs.append(ModelNeed(name, w.weight, d.tokens_per_s, d.unserved_per_s, d.any,
                                   spec.parameters / 1e9, w.min_replicas, w.max_replicas, eligible[name]))
        return targets(needs, len(active))

    # ------------------------------------------------------------ PCs without a model

    def _place_free(self, active: list[_Pc], tg: Mapping[str, Target], count: dict[str, int],
                    demand: Mapping[str, Demand], budget: int, moves: list[str], now: float) -> int:
        """Every PC without a valid model takes the one it is most needed for. One that serves
        a model now (no longer wanted, or no longer fitting) spends the move budget."""
        free = [r for r in active if r.choice is None]
        # Idle PCs first (they cost no move), then those with the fewest options: a PC that can
        # serve only small models should take one before a big card has to.
        free.sort(key=lambda r: (r.served is not None, len(r.options), r.node_id))
        avail = {m: 0 for m in count}
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
                    r.why = (f"serves {r.served}, which the region no longer wants here; waits for the move "
                             f"budget ({self.moves_per_minute}/min) to switch to {pick}")
                    continue
                budget -= 1
                self._moved(r, now, moves, r.served, pick)
            r.choice = pick
            count[pick] += 1
            t = tg[pick]
            r.why = (f"{pick} ({r.options[pick].summary}): {_need_words(t, count[pick] - 1, demand.get(pick))}"
                     + (", and it holds the weights" if r.holds(pick) else ""))
        return budget

    def _best_for(self, r: _Pc, tg: Mapping[str, Target], count: Mapping[str, int],
                  demand: Mapping[str, Demand], avail: Mapping[str, int]) -> str | None:
        best: tuple | None = None
        pick = None
        for m in r.options:
            t = tg[m]
            if count[m] >= t.cap:
                continue
            gap = t.ideal - count[m]
            key = (_urgency(t, count[m]), gap > 0, r.holds(m), gap / max(1, avail[m] + 1), gap, m)
            if best is None or key > best:
                best, pick = key, m
        return pick

    # ------------------------------------------------------------ moving PCs between models

    def _rebalance(self, active: list[_Pc], tg: Mapping[str, Target], count: dict[str, int],
                   demand: Mapping[str, Demand], budget: int, moves: list[str], now: float) -> None:
        by_model: dict[str, list[_Pc]] = {m: [] for m in count}
        for r in active:
            if r.choice is not None and r.movable:
                by_model[r.choice].append(r)
        for rows in by_model.values():
            rows.sort(key=lambda r: r.node_id)
        stuck: set[str] = set()
        while budget > 0:
            short = self._shortest(tg, count, stuck)
            if short is None:
                return
            donor = self._donor(short, tg, count, by_model)
            if donor is None:
                stuck.add(short)
                continue
            old = donor.choice
            assert old is not None
            by_model[old].remove(donor)
            count[old] -= 1
            count[short] += 1
            donor.choice = short
            budget -= 1
            self._moved(donor, now, moves, old, short)
            t, o = tg[short], tg[old]
            donor.why = (f"moved {old} -> {short} ({donor.options[short].summary}): {short} "
                         f"{_need_words(t, count[short] - 1, demand.get(short))}; {old} had {count[old] + 1} PCs"
                         f" for an ideal {o.ideal:.1f}" + (", and it holds the weights" if donor.holds(short) else ""))

    def _shortest(self, tg: Mapping[str, Target], count: Mapping[str, int], stuck: set[str]) -> str | None:
        best: tuple | None = None
        pick = None
        for m, t in tg.items():
            if m in stuck or count[m] >= t.cap:
                continue
            urgency, gap = _urgency(t, count[m]), t.ideal - count[m]
            if urgency == 0 and gap < 0.5 + self.hysteresis:  # the least margin of any pair
                continue
            key = (urgency, gap / max(t.ideal, 1.0), m)
            if best is None or key > best:
                best, pick = key, m
        return pick

    def _margin(self, a: Target, b: Target) -> float:
        """How far from their ideals two models must be (one short, the other over) before a PC
        moves between them: half a PC (rounding) and `hysteresis` of the smaller ideal, so a
        demand that wobbles moves nothing, and a move back needs the demand to swing by more
        than a PC and twice that share. Symmetric, so the way back faces the same bar."""
        return 0.5 + self.hysteresis * max(min(a.ideal, b.ideal), 1.0)

    def _donor(self, short: str, tg: Mapping[str, Target], count: Mapping[str, int],
               by_model: Mapping[str, list[_Pc]]) -> _Pc | None:
        """The PC to move to `short`: from a model over its ideal by more than the margin (or,
        for a model that is urgent, any model that keeps its own floor), holders of `short`'s
        weights first, then the model furthest over."""
        s = tg[short]
        urgent = _urgency(s, count[short]) > 0
        gap = s.ideal - count[short]
        donors = []
        for m, rows in by_model.items():
            t = tg[m]
            if m == short or not rows or count[m] - 1 < t.floor or _urgency(t, count[m] - 1) > 0:
                continue
            over = count[m] - t.ideal
            if not urgent and min(over, gap) < self._margin(s, t):
                continue
            donors.append((over / max(t.ideal, 1.0), m))
        donors.sort(reverse=True)
        first: _Pc | None = None
        for _, m in donors:
            for r in by_model[m]:
                if short in r.options:
                    if r.holds(short):
                        return r
                    first = first or r
        return first

    def _moved(self, r: _Pc, now: float, moves: list[str], old: str | None, new: str) -> None:
        self._recent.append(now)
        self._moved_at[r.node_id] = now
        moves.append(f"{r.view.name} ({r.node_id}): {old or 'nothing'} -> {new}")

    def _keep_why(self, r: _Pc, tg: Mapping[str, Target]) -> str:
        o, t = r.options[r.current or ""], tg[r.current or ""]
        state = "switching to it" if r.switching else ("serving it" if r.served == r.current else "assigned it")
        hold = "; moved recently (hold-down)" if r.held_down else ""
        pin = "; pinned by its owner" if r.facts.pinned_model else ""
        return f"keeps {r.current} ({o.summary}), {state}; ideal {t.ideal:.1f} PCs for it{pin}{hold}"

    # ------------------------------------------------------------ the answer

    def _assignments(self, rows: list[_Pc]) -> tuple[dict[str, Assignment], dict[str, str]]:
        out: dict[str, Assignment] = {}
        explain: dict[str, str] = {}
        for r in rows:
            prev = r.view.assignment
            explain[r.node_id] = r.why
            if not r.active:
                if prev is not None:
                    out[r.node_id] = prev
                continue
            new = _assignment(r, prev)
            if new is not None:
                out[r.node_id] = new
        return out, explain

    def _views(self, specs: Mapping[str, tuple[Wanted, ModelSpec]], unknown: list[Wanted],
               tg: Mapping[str, Target], count: Mapping[str, int], demand: Mapping[str, Demand],
               rows: list[_Pc]) -> list[ModelView]:
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
                                   _model_why(t, d, count[name], running[name], w)))
        for w in unknown:
            views.append(ModelView(w.model, demand.get(w.model) or Demand(), 0, 0, [],
                                   f"{w.model} is not in the region's catalog: import its entry "
                                   "(`garage-node head model import FILE`)"))
        return views


# ---------------------------------------------------------------- helpers


def _image(catalog: Catalog, ref: str | None) -> EngineImage | None:
    if ref is not None:
        return catalog.image(ref)
    return catalog.images[0] if len(catalog.images) == 1 else None


def _urgency(t: Target, count: int) -> int:
    """2: it has demand and no PC; 1: under its floor (the operator's minimum); 0: neither."""
    if count == 0 and t.floor > 0 and t.has_demand:
        return 2
    return 1 if count < t.floor else 0


def _need_words(t: Target, had: int, d: Demand | None) -> str:
    d = d or Demand()
    if had == 0 and d.any:
        return (f"had no PC and has demand ({d.tokens_per_s:.0f} tokens/s, {d.queue_depth} open,"
                f" {d.unserved_per_s:.2f} unserved/s)")
    if had < t.floor:
        return f"had {had} PCs, under its minimum {t.floor}"
    return (f"had {had} PCs for an ideal {t.ideal:.1f} ({t.share:.0%} of the region's demand,"
            f" {d.tokens_per_s:.0f} tokens/s)")


def _model_why(t: Target, d: Demand, assigned: int, running: int, w: Wanted) -> str:
    limits = f"min {w.min_replicas}" + (f", max {w.max_replicas}" if w.max_replicas is not None else "") + \
        f", weight {w.weight:g}"
    if t.cap == 0:
        return f"no PC that is up can serve it ({limits})"
    demand_words = (f"{d.tokens_per_s:.0f} tokens/s, {d.queue_depth} open, {d.unserved_per_s:.2f} unserved/s,"
                    f" {t.share:.0%} of the region's demand" if t.pressure > 0
                    else f"no demand: {t.share:.0%} of the region by weight" if t.share > 0 else "no demand")
    return (f"{demand_words}; ideal {t.ideal:.1f} PCs ({limits}, {t.cap} could serve it);"
            f" {assigned} assigned, {running} running")


def _assignment(r: _Pc, prev: Assignment | None) -> Assignment | None:
    generation = prev.generation if prev is not None else 0
    if r.choice is None:
        if prev is None or prev.model is None:
            # Nothing to serve: say so once (a pinned PC whose pin is not wanted, nothing fits).
            return prev or Assignment(generation=1, model=None, reason=clip(r.why, MESSAGE_MAX))
        return Assignment(generation=generation + 1, model=None, reason=clip(r.why, MESSAGE_MAX))
    o = r.options[r.choice]
    new = Assignment(generation=generation + 1, model=o.model, quantization=o.quantization,
                     max_model_len=o.max_model_len, gpu_indices=list(o.gpu_indices),
                     tensor_parallel_size=o.tensor_parallel_size, pipeline_parallel_size=o.pipeline_parallel_size,
                     layer_partition=list(o.layer_partition), reason=clip(r.why, MESSAGE_MAX))
    if prev is not None and _same(prev, new):
        return prev
    return new


def _same(a: Assignment, b: Assignment) -> bool:
    return (a.model, a.quantization, a.max_model_len, list(a.gpu_indices), a.tensor_parallel_size,
            a.pipeline_parallel_size, list(a.layer_partition)) == \
        (b.model, b.quantization, b.max_model_len, list(b.gpu_indices), b.tensor_parallel_size,
         b.pipeline_parallel_size, list(b.layer_partition))
