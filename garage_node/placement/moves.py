"""Moving PCs between models (issue #18): which model is short, which PC leaves which model for
it, within the move budget and without flapping.

A move costs one of `moves_per_minute` (a sliding minute) and happens only when the short model
is short, and the donor model over, by more than a margin: half a PC (rounding) plus `hysteresis`
x the smaller of their ideals, the same bar both ways, so a demand that wobbles moves nothing and
a move back needs a real swing. A model with demand and no PC, or under its minimum, skips the
bar (any model that keeps its own floor gives). A move that would overshoot (one fast PC worth
more than the gap) is not made; a moved PC is not moved again for `hold_down_s`. When the PCs
that could serve a short model all serve models that are not over, and the over models run on
PCs too small for it, two moves do it (a chain). PCs holding the model's weights go first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

from garage_node.placement.round import PcState, Tally, need_words, node_id_of, urgency
from garage_node.placement.targets import Target
from garage_node.placement.views import Demand

MOVE_WINDOW_S = 60.0


class Mover:
    """The moves of a region: the budget's memory (when recent moves were made) and the
    hold-down (when each PC was last moved) last from one decision to the next."""

    def __init__(self, moves_per_minute: int, hysteresis: float, hold_down_s: float) -> None:
        self.moves_per_minute = moves_per_minute
        self.hysteresis = hysteresis
        self.hold_down_s = hold_down_s
        self._recent: deque[float] = deque()  # when each recent move was made (monotonic)
        self._moved_at: dict[str, float] = {}  # node id -> when it was last moved

    def forget(self, now: float) -> None:
        while self._recent and self._recent[0] <= now - MOVE_WINDOW_S:
            self._recent.popleft()
        for node_id in [n for n, t in self._moved_at.items() if t <= now - self.hold_down_s]:
            del self._moved_at[node_id]

    def budget(self) -> int:
        """Moves left in the sliding minute."""
        return max(0, self.moves_per_minute - len(self._recent))

    def held_down(self, node_id: str) -> bool:
        return node_id in self._moved_at


    def rebalance(self, active: list[PcState], tg: Mapping[str, Target], count: Tally,
                  demand: Mapping[str, Demand], budget: int, moves: list[str], now: float) -> None:
        """Move PCs, within `budget`, from models over their ideal to models short of it."""
        by_model: dict[str, list[PcState]] = {m: [] for m in count.pcs}
        for r in active:
            if r.choice is not None and r.movable:
                by_model[r.choice].append(r)
        # `active` is in the caller's order; sorting by node id makes the choice of donor the
        # same however the head lists its PCs (a restarted head lists them anew).
        for rows in by_model.values():
            rows.sort(key=node_id_of)
        holders: dict[str, list[PcState]] = {}  # model -> movable PCs that hold its weights
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

    def _move(self, r: PcState, new: str, tg: Mapping[str, Target], count: Tally, demand: Mapping[str, Demand],
              by_model: dict[str, list[PcState]], moves: list[str], now: float) -> None:
        old = r.choice
        assert old is not None
        r.why = (f"moved {old} -> {new} ({r.options[new].summary}): {new} "
                 f"{need_words(tg[new], count, demand.get(new))}; {old} had"
                 f" {count.words(old)} for an ideal {tg[old].ideal:.1f}"
                 + (", and it holds the weights" if r.holds(new) else ""))
        by_model[old].remove(r)
        count.remove(r, old)
        count.add(r, new)
        r.choice = new
        self.moved(r, now, moves, old, new)

    def _chain(self, short: str, tg: Mapping[str, Target], count: Tally,
               by_model: Mapping[str, list[PcState]]) -> tuple[PcState, PcState] | None:
        """Two moves where one cannot do: the PCs that could serve `short` all serve models that
        are not over their ideal, and the models that are over run on PCs too small for `short`
        (8 GB cards on a 7B while a 14B needs 12 GB ones). Then a PC X -> short and a PC from an
        over model Y -> X, if Y is over by the margin (X ends where it was)."""
        s = tg[short]
        gap = s.ideal - count.units[short]
        urgent = urgency(s, count.pcs[short]) > 0
        fit_short: dict[str, PcState] = {}  # model X -> a movable PC on X that can serve `short`
        for m, rows in by_model.items():
            if m == short:
                continue
            for r in rows:
                # Not one worth far more than the gap (it would be moved back).
                if short in r.options and (urgent or count.unit(r, short) < gap + 0.5 + self.hysteresis):
                    fit_short[m] = r
                    break
        if not fit_short:
            return None
        donors = []
        for m, rows in by_model.items():
            t = tg[m]
            if m == short or not rows or count.pcs[m] - 1 < t.floor or urgency(t, count.pcs[m] - 1) > 0:
                continue
            over = count.units[m] - t.ideal
            if min(over, gap) >= self.margin(s, t) or (urgent and over > 0):
                donors.append((over / max(t.ideal, 1.0), m))
        for _, y in sorted(donors, reverse=True):
            for q in by_model[y]:
                for x in q.options:
                    first = fit_short.get(x)
                    if x not in (y, short) and first is not None and first is not q:
                        return first, q
        return None

    def _shortest(self, tg: Mapping[str, Target], count: Tally, stuck: set[str]) -> str | None:
        best: tuple | None = None
        pick = None
        for m, t in tg.items():
            if m in stuck or count.pcs[m] >= t.cap:
                continue
            level, gap = urgency(t, count.pcs[m]), t.ideal - count.units[m]
            if level == 0 and gap < 0.5 + self.hysteresis:  # the least margin of any pair
                continue
            key = (level, gap / max(t.ideal, 1.0), m)
            if best is None or key > best:
                best, pick = key, m
        return pick

    def margin(self, a: Target, b: Target) -> float:
        """How far from their ideals two models must be (one short, the other over) before a PC
        moves between them: half a PC (rounding) and `hysteresis` of the smaller ideal, so a
        demand that wobbles moves nothing, and a move back needs the demand to swing by more
        than a PC and twice that share. Symmetric, so the way back faces the same bar."""
        return 0.5 + self.hysteresis * max(min(a.ideal, b.ideal), 1.0)

    def _donor(self, short: str, tg: Mapping[str, Target], count: Tally,
               by_model: Mapping[str, list[PcState]], holders: Mapping[str, list[PcState]]) -> PcState | None:
        """The PC to move to `short`: from a model over its ideal by more than the margin (or,
        for a model that is urgent, any model that keeps its own floor), holders of `short`'s
        weights first, then the model furthest over."""
        s = tg[short]
        urgent = urgency(s, count.pcs[short]) > 0
        gap = s.ideal - count.units[short]
        donors = []
        for m, rows in by_model.items():
            t = tg[m]
            if m == short or not rows or count.pcs[m] - 1 < t.floor or urgency(t, count.pcs[m] - 1) > 0:
                continue
            over = count.units[m] - t.ideal
            if not urgent and min(over, gap) < self.margin(s, t):
                continue
            donors.append((over / max(t.ideal, 1.0), m))
        donors.sort(reverse=True)
        rank = {m: i for i, (_, m) in enumerate(donors)}

        def fits(r: PcState) -> bool:
            return short in r.options and (urgent or self._settles(r, short, r.choice or "", tg, count))

        held = [r for r in holders.get(short, ()) if r.choice in rank and r.movable and fits(r)]
        if held:
            return min(held, key=lambda r: (rank[r.choice or ""], r.node_id))
        for _, m in donors:
            for r in by_model[m]:
                if fits(r):
                    return r
        return None

    def _settles(self, r: PcState, new: str, old: str, tg: Mapping[str, Target], count: Tally) -> bool:
        """Whether moving `r` leaves neither model past the margin the other way: one fast PC
        that is worth more than the gap (a 4090 among 4060s) would otherwise be moved back and
        forth. Hysteresis holds for unequal PCs too."""
        margin = self.margin(tg[new], tg[old])
        short_after = tg[new].ideal - count.units[new] - count.unit(r, new)
        over_after = count.units[old] - count.unit(r, old) - tg[old].ideal
        return short_after > -margin and over_after > -margin

    def moved(self, r: PcState, now: float, moves: list[str], old: str | None, new: str) -> None:
        self._recent.append(now)
        self._moved_at[r.node_id] = now
        r.held_down = True  # not moved twice in one decision either
        moves.append(f"{r.view.name} ({r.node_id}): {old or 'nothing'} -> {new}")
