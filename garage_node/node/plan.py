"""What this PC should run, decided once per pass and handed to every part that needs it.

Before this, "may workloads run" was computed in two places with two sets of conditions, and
the engine plan three times per pass (for the engine, for Ray's labels, for the heat check).
The agent now makes one `Plan` after the overlay step, again whenever the identity changes,
and the engine's thread reads the last one made.
"""

from __future__ import annotations

from dataclasses import dataclass

from garage_node.node.assign import Directive
from garage_node.node.config import EngineSection
from garage_node.node.engine.spec import EngineConfigError, EngineSpec, desired_spec
from garage_node.node.gpu import Inventory
from garage_node.node.identity import Identity

# What the planner returns: the spec, and one line saying why.
Wanted = tuple[EngineSpec, str]


@dataclass(frozen=True)
class Plan:
    # Why no workload (Ray worker, engine) may run on this PC now; None: they may. They bind the
    # overlay address, so they need a live membership, the interface and the firewall.
    blocked: str | None = "not joined yet"
    engine: Wanted | None = None  # what the engine should run; None: nothing (blocked, or [engine] off)
    engine_error: EngineConfigError | None = None  # why the planner found nothing to run
    # The head's assignment decides (node/assign.py): its reason; "" when the PC plans for itself.
    assigned: str = ""
    idle: str | None = None  # the head assigned no model: why the engine is held off

    def with_assignment(self, d: Directive) -> Plan:
        """This plan with the engine the head's assignment asks for (a blocked PC runs nothing)."""
        if d.own_plan or not self.may_run:
            return self
        return Plan(blocked=None, engine=d.engine, engine_error=d.engine_error, assigned=d.reason or "assigned",
                    idle=d.idle)

    @property
    def may_run(self) -> bool:
        return self.blocked is None

    def engine_wanted(self) -> Wanted | None:
        """For the engine's thread: the spec, or the planner's error raised again so that the
        engine shows it (engine/manager.py)."""
        if self.engine_error is not None:
            raise self.engine_error
        return self.engine

    @property
    def engine_gpus(self) -> tuple[int, ...]:
        """The GPU indices the engine runs on (or would); () if none."""
        return tuple(int(i) for i in self.engine[0].gpu_ids) if self.engine else ()

    @property
    def model(self) -> str | None:
        return self.engine[0].model if self.engine else None


def make_plan(cfg: EngineSection, inventory: Inventory, ident: Identity | None, overlay_ready: bool) -> Plan:
    blocked = _blocked(ident, overlay_ready)
    if blocked is not None or ident is None or not cfg.enabled:
        return Plan(blocked=blocked)
    try:
        wanted = desired_spec(cfg, inventory, ident.overlay_ip, ident.engine_api_key)
    except EngineConfigError as e:
        return Plan(blocked=None, engine_error=e)
    return Plan(blocked=None, engine=wanted)


def _blocked(ident: Identity | None, overlay_ready: bool) -> str | None:
    if ident is None:
        return "not joined yet"
    if ident.revoked:
        return "revoked by the operator"
    if not overlay_ready:
        return "the overlay or its firewall is not up"
    return None
