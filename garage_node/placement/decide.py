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
    options: dict[str, Option] = field(default_factory=dict)  # shared with PCs alike: read only
    refusals: tuple[Refusal, ...] = ()
    switching: bool = False
    held_down: bool = False
    waits: bool = False  # to be moved when the move budget allows: keeps what it has till then
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
        # Catalog name, repo id or a precision's repo id -> catalog name (Catalog.resolve's
        # answers, looked up once: every PC's engine names its model by repo id).
        self._names: dict[str, str] = {}
        for m in catalog.models:
            for ref in (m.name, m.id, *(q.model_id for q in m.offered)):
                self._names.setdefault(ref, m.name)
        self._recent: deque[float] = deque()  # when each recent move was made (monotonic)
        self._moved_at: dict[str, float] = {}  # node id -> when it was last moved

    # ------------------------------------------------------------ the decision

    def decide(self, pcs: Sequence[PcView], wanted: Sequence[Wanted],
               demand: Mapping[str, Demand]) -> Decision:
        start = time.perf_counter()
        now = self.clock.monotonic()
        self._forget(now)
        specs, unknown = self._wanted(wanted)
        menu_all = [(spec, w.max_model_len) for w, spec in specs.values()]
        menu_key = tuple((spec.name, ctx) for spec, ctx in menu_all)
        rows = [r for pc in pcs if (r := self._row(pc, specs, menu_all, menu_key)) is not None]
        active = [r for r in rows if r.active and r.options]
        tg, count = self._targets(specs, demand, active)
        for r in active:
            if r.current in r.options:
                r.choice = r.current
                count.add(r, r.current)
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
        return self._names.get(ref) if ref else None

    def _row(self, pc: PcView, specs: Mapping[str, tuple[Wanted, ModelSpec]],
             menu_all: list[tuple[ModelSpec, int | None]], menu_key: tuple) -> _Pc | None:
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
        if pin is None:
            menu = self.options.menu(pc.report, facts, menu_all, menu_key)
        else:
            w, spec = specs[pin]
            menu = self.options.menu(pc.report, facts, [(spec, w.max_model_len)])
        r.options, r.refusals = menu.options, menu.refusals
        if not r.options:
            r.why = "no wanted model fits: " + "; ".join(f"{x.model}: {x.why}" for x in r.refusals[:3]) \
                if r.refusals else "the region wants no model"
        return r

    def _targets(self, specs: Mapping[str, tuple[Wanted, ModelSpec]], demand: Mapping[str, Demand],
                 active: list[_Pc]) -> tuple[dict[str, Target], _Tally]:
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
        return targets(needs, len(active), sizes), _Tally(rate)

    # ------------------------------------------------------------ PCs without a model

    def _place_free(self, active: list[_Pc], tg: Mapping[str, Target], count: _Tally,
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
                self._moved(r, now, moves, r.served, pick)
            r.why = (f"{pick} ({r.options[pick].summary}): {_need_words(tg[pick], count, demand.get(pick))}"
                     + (", and it holds the weights" if r.holds(pick) else ""))
            r.choice = pick
            count.add(r, pick)
        return budget

    def _best_for(self, r: _Pc, tg: Mapping[str, Target], count: _Tally,
                  demand: Mapping[str, Demand], avail: Mapping[str, int]) -> str | None:
        best: tuple | None = None
        pick = None
        for m in r.options:
            t = tg[m]
            if count.pcs[m] >= t.cap:
                continue
            gap = t.ideal - count.units[m]
            key = (_urgency(t, count.pcs[m]), gap > 0, r.holds(m), gap / max(1, avail[m] + 1), gap, m)
            if best is None or key > best:
                best, pick = key, m
        return pick

    # ------------------------------------------------------------ moving PCs between models

    def _rebalance(self, active: list[_Pc], tg: Mapping[str, Target], count: _Tally,
                   demand: Mapping[str, Demand], budget: int, moves: list[str], now: float) -> None:
        by_model: dict[str, list[_Pc]] = {m: [] for m in count.pcs}
        for r in active:
            if r.choice is not None and r.movable:
                by_model[r.choice].append(r)
        # `active` is in the caller's order; sorting by node id makes the choice of donor the
        # same however the head lists its PCs (a restarted head lists them anew).
        for rows in by_model.values():
            rows.sort(key=_node_id)
        holders: dict[str, list[_Pc]] = {}  # model -> movable PCs that hold its weights
        for r in active:
            if r.movable:
                for m in r.facts.weights_held:
                    holders.setdefault(m, []).append(r)
        stuck: set[str] = set()
        while budget > 0:
            short = self._shortest(tg, count, stuck)
            if short is None:
                return
            donor = self._donor(short, tg, count, by_model, holders)
            if donor is not None:
                self._move(donor, short, tg, count, demand, by_model, moves, now)
                budget -= 1
                continue
            chain = self._chain(short, tg, count, by_model) if budget >= 2 else None
            if chain is None:
                stuck.add(short)
                continue
            # The PC that can serve `short` leaves a model that is not over; a PC from a model
            # that is over (which cannot serve `short` itself) takes its place.
            first, second = chain
            via = first.choice
            assert via is not None
            self._move(first, short, tg, count, demand, by_model, moves, now)
            self._move(second, via, tg, count, demand, by_model, moves, now)
            second.why += f" (in place of {first.view.name}, which moved to {short})"
            budget -= 2

    def _move(self, r: _Pc, new: str, tg: Mapping[str, Target], count: _Tally, demand: Mapping[str, Demand],
              by_model: dict[str, list[_Pc]], moves: list[str], now: float) -> None:
        old = r.choice
        assert old is not None
        r.why = (f"moved {old} -> {new} ({r.options[new].summary}): {new} "
                 f"{_need_words(tg[new], count, demand.get(new))}; {old} had"
                 f" {count.words(old)} for an ideal {tg[old].ideal:.1f}"
                 + (", and it holds the weights" if r.holds(new) else ""))
        by_model[old].remove(r)
        count.remove(r, old)
        count.add(r, new)
        r.choice = new
        self._moved(r, now, moves, old, new)

    def _chain(self, short: str, tg: Mapping[str, Target], count: _Tally,
               by_model: Mapping[str, list[_Pc]]) -> tuple[_Pc, _Pc] | None:
        """Two moves where one cannot do: the PCs that could serve `short` all serve models that
        are not over their ideal, and the models that are over run on PCs too small for `short`
        (8 GB cards on a 7B while a 14B needs 12 GB ones). Then a PC X -> short and a PC from an
        over model Y -> X, if Y is over by the margin (X ends where it was)."""
        s = tg[short]
        gap = s.ideal - count.units[short]
        fit_short: dict[str, _Pc] = {}  # model X -> a movable PC on X that can serve `short`
        for m, rows in by_model.items():
            if m == short:
                continue
            for r in rows:
                if short in r.options:
                    fit_short[m] = r
                    break
        if not fit_short:
            return None
        donors = []
        for m, rows in by_model.items():
            t = tg[m]
            if m == short or not rows or count.pcs[m] - 1 < t.floor or _urgency(t, count.pcs[m] - 1) > 0:
                continue
            over = count.units[m] - t.ideal
            if min(over, gap) >= self._margin(s, t) or (_urgency(s, count.pcs[short]) > 0 and over > 0):
                donors.append((over / max(t.ideal, 1.0), m))
        for _, y in sorted(donors, reverse=True):
            for q in by_model[y]:
                for x in q.options:
                    first = fit_short.get(x)
                    if x not in (y, short) and first is not None and first is not q \
                            and count.pcs[x] < tg[x].cap + 1:
                        return first, q
        return None

    def _shortest(self, tg: Mapping[str, Target], count: _Tally, stuck: set[str]) -> str | None:
        best: tuple | None = None
        pick = None
        for m, t in tg.items():
            if m in stuck or count.pcs[m] >= t.cap:
                continue
            urgency, gap = _urgency(t, count.pcs[m]), t.ideal - count.units[m]
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

    def _donor(self, short: str, tg: Mapping[str, Target], count: _Tally,
               by_model: Mapping[str, list[_Pc]], holders: Mapping[str, list[_Pc]]) -> _Pc | None:
        """The PC to move to `short`: from a model over its ideal by more than the margin (or,
        for a model that is urgent, any model that keeps its own floor), holders of `short`'s
        weights first, then the model furthest over."""
        s = tg[short]
        urgent = _urgency(s, count.pcs[short]) > 0
        gap = s.ideal - count.units[short]
        donors = []
        for m, rows in by_model.items():
            t = tg[m]
            if m == short or not rows or count.pcs[m] - 1 < t.floor or _urgency(t, count.pcs[m] - 1) > 0:
                continue
            over = count.units[m] - t.ideal
            if not urgent and min(over, gap) < self._margin(s, t):
                continue
            donors.append((over / max(t.ideal, 1.0), m))
        donors.sort(reverse=True)
        rank = {m: i for i, (_, m) in enumerate(donors)}

        def fits(r: _Pc) -> bool:
            return short in r.options and (urgent or self._settles(r, short, r.choice or "", tg, count))

        held = [r for r in holders.get(short, ()) if r.choice in rank and r.movable and fits(r)]
        if held:
            return min(held, key=lambda r: (rank[r.choice or ""], r.node_id))
        for _, m in donors:
            for r in by_model[m]:
                if fits(r):
                    return r
        return None

    def _settles(self, r: _Pc, new: str, old: str, tg: Mapping[str, Target], count: _Tally) -> bool:
        """Whether moving `r` leaves neither model past the margin the other way: one fast PC
        that is worth more than the gap (a 4090 among 4060s) would otherwise be moved back and
        forth. Hysteresis holds for unequal PCs too."""
        margin = self._margin(tg[new], tg[old])
        short_after = tg[new].ideal - count.units[new] - count.unit(r, new)
        over_after = count.units[old] - count.unit(r, old) - tg[old].ideal
        return short_after > -margin and over_after > -margin

    def _moved(self, r: _Pc, now: float, moves: list[str], old: str | None, new: str) -> None:
        self._recent.append(now)
        self._moved_at[r.node_id] = now
        r.held_down = True  # not moved twice in one decision either
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
            if not r.active or r.waits:
                if prev is not None:
                    out[r.node_id] = prev
                continue
            new = _assignment(r, prev)
            if new is not None:
                out[r.node_id] = new
        return out, explain

    def _views(self, specs: Mapping[str, tuple[Wanted, ModelSpec]], unknown: list[Wanted],
               tg: Mapping[str, Target], count: _Tally, demand: Mapping[str, Demand],
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
                                   _model_why(t, d, count, running[name], w)))
        for w in unknown:
            views.append(ModelView(w.model, demand.get(w.model) or Demand(), 0, 0, [],
                                   f"{w.model} is not in the region's catalog: import its entry "
                                   "(`garage-node head model import FILE`)"))
        return views


# ---------------------------------------------------------------- helpers


def _node_id(r: _Pc) -> str:
    return r.view.node_id


class _Tally:
    """PCs per model (for the floors and caps, in PCs) and what they are worth in typical PCs of
    that model (decode rate over the mean rate of the PCs that could serve it: for the ideals)."""

    def __init__(self, rate: Mapping[str, float]) -> None:
        self.rate = rate
        self.pcs = {m: 0 for m in rate}
        self.units = {m: 0.0 for m in rate}

    def unit(self, r: _Pc, m: str) -> float:
        return r.options[m].rate / self.rate[m] if self.rate[m] > 0 else 1.0

    def add(self, r: _Pc, m: str) -> None:
        self.pcs[m] += 1
        self.units[m] += self.unit(r, m)

    def remove(self, r: _Pc, m: str) -> None:
        self.pcs[m] -= 1
        self.units[m] -= self.unit(r, m)

    def words(self, m: str) -> str:
        n, u = self.pcs[m], self.units[m]
        return f"{n} PC{'' if n == 1 else 's'}" + (f" (worth {u:.1f} typical)" if abs(u - n) >= 0.05 else "")


def _image(catalog: Catalog, ref: str | None) -> EngineImage | None:
    if ref is not None:
        return catalog.image(ref)
    return catalog.images[0] if len(catalog.images) == 1 else None


def _urgency(t: Target, count: int) -> int:
    """2: it has demand and no PC; 1: under its floor (the operator's minimum); 0: neither."""
    if count == 0 and t.floor > 0 and t.has_demand:
        return 2
    return 1 if count < t.floor else 0


def _need_words(t: Target, count: _Tally, d: Demand | None) -> str:
    d = d or Demand()
    had = count.pcs[t.model]
    if had == 0 and d.any:
        return (f"had no PC and has demand ({d.tokens_per_s:.0f} tokens/s, {d.queue_depth} open,"
                f" {d.unserved_per_s:.2f} unserved/s)")
    if had < t.floor:
        return f"had {had} PCs, under its minimum {t.floor}"
    return (f"had {count.words(t.model)} for an ideal {t.ideal:.1f} ({t.share:.0%} of the region's demand,"
            f" {d.tokens_per_s:.0f} tokens/s)")


def _model_why(t: Target, d: Demand, count: _Tally, running: int, w: Wanted) -> str:
    limits = f"min {w.min_replicas}" + (f", max {w.max_replicas}" if w.max_replicas is not None else "") + \
        f", weight {w.weight:g}"
    if t.cap == 0:
        return f"no PC that is up can serve it ({limits})"
    demand_words = (f"{d.tokens_per_s:.0f} tokens/s, {d.queue_depth} open, {d.unserved_per_s:.2f} unserved/s,"
                    f" {t.share:.0%} of the region's demand" if t.pressure > 0
                    else f"no demand: {t.share:.0%} of the region by weight" if t.share > 0 else "no demand")
    return (f"{demand_words}; ideal {t.ideal:.1f} typical PCs ({limits}, {t.cap} could serve it);"
            f" {count.words(t.model)} assigned, {running} running")


def _assignment(r: _Pc, prev: Assignment | None) -> Assignment | None:
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
                     layer_partition=list(o.layer_partition), reason=clip(r.why, MESSAGE_MAX))


def _same(a: Assignment, o: Option) -> bool:
    """Whether the assignment already says what the option does (the reason aside)."""
    return (a.model == o.model and a.quantization == o.quantization and a.max_model_len == o.max_model_len
            and tuple(a.gpu_indices) == o.gpu_indices and a.tensor_parallel_size == o.tensor_parallel_size
            and a.pipeline_parallel_size == o.pipeline_parallel_size
            and tuple(a.layer_partition) == o.layer_partition)
