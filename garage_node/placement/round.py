"""One placement round's working state: each PC's options and choice, and the tally of what
every model has (in PCs, and in typical PCs of that model), shared by decide.py (placing PCs
without a model) and moves.py (moving PCs between models)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from garage_node.core.wire import PlacementFacts
from garage_node.placement.options import Option, Refusal
from garage_node.placement.targets import Target
from garage_node.placement.views import Demand, PcView


@dataclass
class PcState:
    """A PC during one decision: what it serves and is assigned, what it could serve, what it
    gets and why."""

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
    refused: str = ""  # the models it refused, held off it for a while, in words

    @property
    def node_id(self) -> str:
        return self.view.node_id

    @property
    def movable(self) -> bool:
        return self.active and not self.switching and not self.held_down and not self.facts.pinned_model

    def holds(self, model: str) -> bool:
        return model in self.facts.weights_held or model == self.served


def node_id_of(r: PcState) -> str:
    return r.view.node_id


class Tally:
    """PCs per model (for the floors and caps, in PCs) and what they are worth in typical PCs of
    that model (decode rate over the mean rate of the PCs that could serve it: for the ideals)."""

    def __init__(self, rate: Mapping[str, float]) -> None:
        self.rate = rate
        self.pcs = {m: 0 for m in rate}
        self.units = {m: 0.0 for m in rate}

    def unit(self, r: PcState, m: str) -> float:
        return r.options[m].rate / self.rate[m] if self.rate[m] > 0 else 1.0

    def add(self, r: PcState, m: str) -> None:
        self.pcs[m] += 1
        self.units[m] += self.unit(r, m)

    def remove(self, r: PcState, m: str) -> None:
        self.pcs[m] -= 1
        self.units[m] -= self.unit(r, m)

    def words(self, m: str) -> str:
        n, u = self.pcs[m], self.units[m]
        return f"{n} PC{'' if n == 1 else 's'}" + (f" (worth {u:.1f} typical)" if abs(u - n) >= 0.05 else "")


def urgency(t: Target, count: int) -> int:
    """2: it has demand and no PC; 1: under its floor (the operator's minimum); 0: neither."""
    if count == 0 and t.floor > 0 and t.has_demand:
        return 2
    return 1 if count < t.floor else 0


def need_words(t: Target, count: Tally, d: Demand | None) -> str:
    d = d or Demand()
    had = count.pcs[t.model]
    if had == 0 and d.any:
        return (f"had no PC and has demand ({d.tokens_per_s:.0f} tokens/s, {d.queue_depth} open,"
                f" {d.unserved_per_s:.2f} unserved/s)")
    if had < t.floor:
        return f"had {had} PCs, under its minimum {t.floor}"
    return (f"had {count.words(t.model)} for an ideal {t.ideal:.1f} ({t.share:.0%} of the region's demand,"
            f" {d.tokens_per_s:.0f} tokens/s)")
