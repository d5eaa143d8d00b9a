"""GPU inventory through NVML (the `pynvml` module of nvidia-ml-py).

Interface only for now; read_inventory() is filled in by the GPU work.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    uuid: str
    memory_total_mib: int
    memory_free_mib: int
    compute_capability: str | None  # e.g. "8.9"
    temperature_c: int | None
    power_w: float | None
    utilization_pct: int | None
    healthy: bool = True
    error: str | None = None  # why this GPU is unhealthy, for a person to read


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[GPU, ...] = ()
    driver_version: str | None = None
    cuda_version: str | None = None  # e.g. "12.4"
    # Set when NVML could not be used at all (no driver, no GPU): the node joins as a CPU node.
    nvml_error: str | None = None

    @property
    def healthy_gpus(self) -> tuple[GPU, ...]:
        return tuple(g for g in self.gpus if g.healthy)

    @property
    def vram_mib(self) -> int:
        return sum(g.memory_total_mib for g in self.healthy_gpus)
