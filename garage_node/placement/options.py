"""What each PC can serve: every wanted model's fit on its GPUs (or on its CPU), as the PC's own
planner (fit.py) would make it. Cached by the PC's GPUs and the owner's precision pin (the driver
counts only through the CUDA gate's verdict), so a region of a thousand PCs with a few dozen
kinds of GPU set costs a few dozen plans per model, once, and then a dictionary lookup per PC."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from garage_node.core.wire import GPU, NodeReport, PlacementFacts
from garage_node.placement import bandwidth, cuda, fit
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
    vram_mib: int = 0  # the memory of the GPUs it uses
    # GB of weights read per generated token, and the decode rate it allows (bandwidth.py: a
    # relative figure, for weighing PCs against each other).
    weights_gb: float = 0.0
    rate: float = 0.0

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


@dataclass(frozen=True)
class Menu:
    """What one PC can serve of the wanted models (shared by PCs alike: never modified)."""

    options: dict[str, Option]
    refusals: tuple[Refusal, ...]


def _gpu_key(g: GPU) -> tuple[object, ...]:
    return g.index, g.name, g.memory_total_mib, g.compute_capability, g.healthy


class Options:
    """Model -> Option or Refusal for a PC, remembered for PCs with the same hardware and limits."""

    def __init__(self, catalog: Catalog, image: EngineImage | None = None) -> None:
        self.catalog = catalog
        self.image = image
        self._cache: OrderedDict[_Key, Result] = OrderedDict()
        self._menus: OrderedDict[_Key, Menu] = OrderedDict()
        self._gates: dict[tuple[str | None, str | None], str] = {}

    def menu(self, report: NodeReport, facts: PlacementFacts, wanted: Sequence[tuple[ModelSpec, int | None]],
             wanted_key: _Key | None = None) -> Menu:
        """The options and refusals of a PC for the wanted (model, context) pairs; `wanted_key`:
        tuple((model name, context)) of them, when the caller has it already."""
        gate = self._gate(report) if facts.device != "cpu" else ""
        hardware: _Key = (facts.device, tuple(map(_gpu_key, report.gpus)), gate, facts.pinned_quantization)
        key: _Key = (hardware, wanted_key or tuple((m.name, ctx) for m, ctx in wanted))
        found = self._menus.get(key)
        if found is None:
            results = [self._of(report, facts, m, ctx, hardware, gate) for m, ctx in wanted]
            found = Menu({r.model: r for r in results if isinstance(r, Option)},
                         tuple(r for r in results if isinstance(r, Refusal)))
            _put(self._menus, key, found)
        return found

    def _gate(self, report: NodeReport) -> str:
        """'' when the engine image runs on this PC's driver, else why not (the CUDA gate)."""
        key = (report.driver_version, report.cuda_version)
        found = self._gates.get(key)
        if found is None:
            found = ""
            if self.image is not None:
                try:
                    cuda.check_driver(self.image.name, self.image.min_driver, report.driver_version)
                    cuda.check(self.image.name, self.image.cuda, report.driver_version, report.cuda_version,
                               "per the model catalog")
                except cuda.CudaMismatch as e:
                    found = str(e)
            if len(self._gates) < CACHE_ENTRIES:
                self._gates[key] = found
        return found

    def _of(self, report: NodeReport, facts: PlacementFacts, model: ModelSpec, max_model_len: int | None,
            hardware: _Key, gate: str) -> Result:
        key: _Key = (hardware, model.name, max_model_len)
        found = self._cache.get(key)
        if found is None:
            found = self._compute(report, facts, model, max_model_len, gate)
            _put(self._cache, key, found)
        return found

    def _compute(self, report: NodeReport, facts: PlacementFacts, model: ModelSpec,
                 max_model_len: int | None, gate: str) -> Result:
        if facts.device == "cpu":
            return _cpu_option(model, facts.pinned_quantization, max_model_len)
        if gate:
            return Refusal(model.name, gate)
        # The driver passed the gate: the plan no longer depends on it (the image's GPU
        # generation still counts), so PCs alike but for their driver share it.
        gpus = fit.GpuFacts(tuple(report.gpus), nvml_error=report.gpu_note)
        try:
            p = fit.plan(gpus, self.catalog, pinned_model=model.name, pinned_quantization=facts.pinned_quantization,
                         max_model_len=max_model_len, image=self.image)
        except fit.PlanError as e:
            return Refusal(model.name, str(e))
        gb = model.parameters * p.quantization.bytes_per_param / 1e9
        return Option(model.name, p.quantization.name, p.max_model_len, p.gpu_indices, p.tensor_parallel_size,
                      p.pipeline_parallel_size, p.layer_partition, sum(g.memory_total_mib for g in p.gpus),
                      gb, bandwidth.tokens_per_s(p.gpus, gb, p.layer_partition))


def _put(cache: OrderedDict, key: _Key, value: object) -> None:
    cache[key] = value
    if len(cache) > CACHE_ENTRIES:
        cache.popitem(last=False)


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
    gb = model.parameters * quant.bytes_per_param / 1e9
    return Option(model.name, quant.name, max_model_len or model.default_context_length,
                  weights_gb=gb, rate=bandwidth.tokens_per_s((), gb))
