"""What the head's placement takes and gives (issue #18): the operator's wanted models, each
model's demand, each PC as the head sees it; the decision. decide.py (the Placer) re-exports
them, and the head imports them from there."""

from __future__ import annotations

from dataclasses import dataclass, field

from garage_node.core.wire import Assignment, NodeReport


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
    # Quarantined by the region's audits (issue #20): gets no customers' requests, so it is not
    # counted as running; it keeps its assignment, for the re-check that may release it.
    quarantined: bool = False


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
    # node id -> the model it refused and why, while the placer holds that model off it
    refused: dict[str, str] = field(default_factory=dict)


class PlacementError(ValueError):
    """The placer was given something it cannot use; the message says what and what to do."""
