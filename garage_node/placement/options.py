"""What each PC can serve: every wanted model's fit on its GPUs (or on its CPU), as the PC's own
planner (fit.py) would make it. Cached by the PC's hardware and the owner's limits, so a region
of a thousand PCs with a few dozen kinds of GPU set costs a few dozen plans per model, once."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from garage_node.core.wire import GPU, NodeReport, PlacementFacts
from garage_node.placement import fit
from garage_node.placement.catalog import Catalog, EngineImage, ModelSpec

CACHE_ENTRIES = 8192


@dataclass(frozen=True)
class Option:
    """One model as one PC would serve it."""

    model: str  # catalog name
    quantization: str
    max_model_len: int
    gpu_indices: tuple[int, ...] = ()
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    layer_partition: tuple[int, ...] = ()
    vram_mib: int = 0  # the memory of the GPUs it uses: big cards are kept for big models

    @property
    def summary(self) -> str:
        where = f"GPU {','.join(f'#{i}' for i in self.gpu_indices)}" if self.gpu_indices else "CPU"
        par = f", TP {self.tensor_parallel_size}" if self.tensor_parallel_size > 1 else ""
        if self.pipeline_parallel_size > 1:
            par += f", PP {self.pipeline_parallel_size} (layers {','.join(map(str, self.layer_partition))})"
        return f"{self.quantization}, context {self.max_model_len}{par} on {where}"


@dataclass(frozen=True)
class Refusal:
    model: str
    why: str


Result = Option | Refusal
_Key = tuple[object, ...]


def _gpu_key(g: GPU) -> tuple[object, ...]:
    return g.index, g.name, g.memory_total_mib, g.compute_capability, g.healthy


class Options:
    """Model -> Option or Refusal for a PC, remembered for PCs with the same hardware and limits."""

    def __init__(self, catalog: Catalog, image: EngineImage | None = None) -> None:
        self.catalog = catalog
        self.image = image
        self._cache: OrderedDict[_Key, Result] = OrderedDict()

    @staticmethod
    def hardware(report: NodeReport, facts: PlacementFacts) -> _Key:
        """What a PC's options depend on besides the model: its device, GPUs, driver and the
        owner's precision pin."""
        return (facts.device, tuple(_gpu_key(g) for g in report.gpus), report.driver_version,
                report.cuda_version, facts.pinned_quantization)

    def of(self, report: NodeReport, facts: PlacementFacts, model: ModelSpec,
           max_model_len: int | None = None, hardware: _Key | None = None) -> Result:
        key: _Key = (hardware or self.hardware(report, facts), model.name, max_model_len)
        found = self._cache.get(key)
        if found is None:
            found = self._compute(report, facts, model, max_model_len)
            self._cache[key] = found
            if len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return found

    def _compute(self, report: NodeReport, facts: PlacementFacts, model: ModelSpec,
                 max_model_len: int | None) -> Result:
        if facts.device == "cpu":
            return _cpu_option(model, facts.pinned_quantization, max_model_len)
        try:
            p = fit.plan(fit.GpuFacts.of_report(report), self.catalog, pinned_model=model.name,
                         pinned_quantization=facts.pinned_quantization, max_model_len=max_model_len,
                         image=self.image)
        except fit.PlanError as e:
            return Refusal(model.name, str(e))
        return Option(model.name, p.quantization.name, p.max_model_len, p.gpu_indices, p.tensor_parallel_size,
                      p.pipeline_parallel_size, p.layer_partition, sum(g.memory_total_mib for g in p.gpus))


def _cpu_option(model: ModelSpec, quant_name: str | None, max_model_len: int | None) -> Result:
    """vLLM's CPU build: only what the catalog marks `cpu = true`, at its default context and
    first precision (as the agent's own CPU engine does)."""
    if not model.cpu:
        return Refusal(model.name, f"{model.name} is not marked cpu = true in the catalog, and this PC's "
                                   "engine runs on its CPU")
    quant = model.quantization(quant_name) if quant_name else model.offered[0]
    if quant is None:
        return Refusal(model.name, f"the owner pinned precision {quant_name}, which {model.name} is not offered in")
    if max_model_len is not None and max_model_len > model.default_context_length:
        return Refusal(model.name, f"context {max_model_len} exceeds {model.name}'s {model.default_context_length}")
    return Option(model.name, quant.name, max_model_len or model.default_context_length)
