"""The GPU part of the agent: what NVML reads, the owner's power limit, and whether the PC
serves now (the owner's [schedule] hours, heat on the GPUs the engine uses, faulty GPUs
quarantined by gpuguard.py)."""

from __future__ import annotations

import dataclasses
import logging
from datetime import tzinfo
from typing import Callable

from garage_node.core.clock import Clock
from garage_node.core.wire import ServingStatus, clip
from garage_node.node import gpu
from garage_node.node.config import NodeConfig
from garage_node.node.gpuguard import GpuGuard
from garage_node.node.schedule import Schedule, system_timezone

log = logging.getLogger(__name__)


class GpuWatch:
    def __init__(self, cfg: NodeConfig, clock: Clock, read_inventory: Callable[[], gpu.Inventory],
                 nvml: gpu.NvmlSession) -> None:
        self.cfg = cfg
        self.clock = clock
        self.read_inventory = read_inventory
        self.nvml = nvml
        self.guard = GpuGuard(cfg.gpu.max_temp_c, cfg.gpu.resume_below_c)
        self.schedule = Schedule(cfg.schedule.windows, _zone(cfg.schedule.timezone))
        self.inventory = gpu.Inventory()  # after the guard's judgement: what the PC offers
        self.serving = ServingStatus()
        self._raw = gpu.Inventory()  # NVML's last reading, before the guard's judgement
        self._power_notes: dict[int, str] = {}
        self._read_at: float | None = None

    def refresh(self) -> None:
        now = self.clock.monotonic()
        # Xid events are queued by NVML; asked for on every pass (it never waits) so a card
        # that faults leaves the plan within a pass, not a refresh period.
        xids = self.nvml.xids()
        due = self._read_at is None or now - self._read_at >= self.cfg.gpu.refresh_s
        if due:
            self._raw = self._with_power_limits(self.read_inventory())
            self._read_at = now
            self.nvml.watch([g.index for g in self._raw.gpus if g.healthy])
        if due or xids:
            self.inventory = self.guard.observe(self._raw, xids)

    def _with_power_limits(self, inv: gpu.Inventory) -> gpu.Inventory:
        """[gpu] power_limit_w on every healthy GPU (NVML keeps it; re-set only if changed)."""
        watts = self.cfg.gpu.power_limit_w
        if not watts:
            return inv
        gpus = []
        for g in inv.gpus:
            if g.healthy and g.index not in self.guard.quarantined:
                result = self.nvml.set_power_limit(g.index, watts)
                if result.note and self._power_notes.get(g.index) != result.note:
                    log.warning("%s", result.note)
                self._power_notes[g.index] = result.note
                if result.applied_w is not None:
                    g = dataclasses.replace(g, power_limit_w=result.applied_w)
            gpus.append(g)
        return dataclasses.replace(inv, gpus=tuple(gpus))

    def decide(self, engine_gpus: tuple[int, ...]) -> str | None:
        """Serve now? The owner's hours first, then heat on the GPUs the engine uses. Returns why
        not (the engine drains for it and comes back by itself), or None."""
        g = self.cfg.gpu
        hours = self.schedule.at(self.clock.time())
        paused = None if hours.serving else f"outside serving hours until {hours.until_text()}"
        paused = paused or self.guard.heat_reason(engine_gpus)
        notes = sorted({n for n in self._power_notes.values() if n})
        self.serving = ServingStatus(
            serving=paused is None, paused=clip(paused, 512),
            until=hours.until.timestamp() if hours.until else None,
            schedule=clip(_schedule_words(self.cfg.schedule.windows, self.schedule.tz), 512),
            max_temp_c=g.max_temp_c or None, resume_temp_c=g.resume_below_c if g.max_temp_c else None,
            power_limit_w=g.power_limit_w or None, power_note=clip("; ".join(notes), 512) if notes else None)
        return paused

    def notes(self) -> tuple[str, ...]:
        return tuple(self.guard.notes())

    def close(self) -> None:
        self.nvml.close()  # power limits back to the cards' defaults


def _zone(name: str) -> tzinfo:
    from zoneinfo import ZoneInfo

    return ZoneInfo(name) if name else system_timezone()


def _schedule_words(windows: tuple[str, ...], tz: tzinfo) -> str:
    return f"{', '.join(windows)} ({tz})" if windows else "always"
