"""Which catalog model a node serves, and the vLLM engine arguments that make it fit.

The catalog (configs/models.toml) states each model's size and the architecture facts the
arithmetic needs. Per GPU of a tensor-parallel group, with B = total VRAM x gpu_memory_utilization
(vLLM counts everything it allocates against that fraction):

    weights   = parameters x bytes_per_param / TP
    overhead  = OVERHEAD_FIXED_MIB + OVERHEAD_WEIGHT_FRACTION x weights
    KV/token  = 2 (K and V) x layers x ceil(KV heads / TP) x head_dim x KV bytes
    weights + overhead + max_model_len x KV/token <= B

The planner prefers the largest model, then the highest precision of it, then the GPU set that
gives the longest context, then the fewest GPUs. It imports nothing heavy: the agent runs it, and
so does the head's placement (decide.py), on the same GPU facts read from the PC's report.

Unequal GPUs in one PC (an RTX 4090 and a 4060): a model and precision that fit no tensor-parallel
group of identical GPUs may fit their sum as a pipeline, one stage per GPU, with the layers split
so that every stage has room for the same context (vLLM's VLLM_PP_LAYER_PARTITION; it sizes every
stage's KV cache to the smallest one). Per stage of l of the model's L layers:

    weights   = parameters x bytes_per_param x l / L   (embeddings counted with the layers)
    overhead  = OVERHEAD_FIXED_MIB + OVERHEAD_WEIGHT_FRACTION x weights
    KV/token  = 2 x l x KV heads x head_dim x KV bytes

Never across PCs: over home links a two-stage pipeline caps a stream at ~20 tokens/s.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from garage_node.placement import cuda
from garage_node.placement.catalog import (Catalog, CompCap, EngineImage, ModelSpec, Quantization,
                                             parse_compute_capability)
from garage_node.core.wire import GPU, NodeReport

DEFAULT_GPU_MEMORY_UTILIZATION = 0.90
# Below this a chat model is of little use, so a model that fits only with less does not fit.
MIN_CONTEXT = 4096
# max_model_len is rounded down to this: vLLM's KV blocks are 16 tokens; 256 keeps numbers tidy.
CONTEXT_STEP = 256
# Per GPU, outside weights and KV cache: CUDA context (~300-500 MiB), cuBLAS/NCCL workspaces and
# CUDA graphs (~200-500 MiB) ...
OVERHEAD_FIXED_MIB = 1024
# ... plus activations at profiling time, which grow with the model's width, so with its weights.
OVERHEAD_WEIGHT_FRACTION = 0.05
TP_SIZES = (1, 2, 4, 8)
MIB = 1024 * 1024
GIB_PER_MIB = 1 / 1024

GPUSet = tuple[GPU, ...]


class Inventory(Protocol):
    """The GPU facts a plan needs: the agent's node.gpu.Inventory, or the same read from a
    NodeReport at the head (placement.facts), so both make the same plan."""

    @property
    def gpus(self) -> Sequence[GPU]: ...
    @property
    def driver_version(self) -> str | None: ...
    @property
    def cuda_version(self) -> str | None: ...
    @property
    def nvml_error(self) -> str | None: ...


@dataclass(frozen=True)
class GpuFacts:
    """The GPU facts of a PC as the head knows them, from its report: the same numbers the
    agent plans with (its Status carries its Inventory's GPUs, driver and NVML note)."""

    gpus: tuple[GPU, ...] = ()
    driver_version: str | None = None
    cuda_version: str | None = None
    nvml_error: str | None = None

    @classmethod
    def of_report(cls, report: NodeReport) -> GpuFacts:
        return cls(tuple(report.gpus), report.driver_version, report.cuda_version, report.gpu_note)


class PlanError(Exception):
    """No plan: the message says why, with numbers, and what would work instead."""


class CpuOnlyRefusal(PlanError):
    """The node has no healthy GPU: it joins as a CPU node and serves no model."""


def _fmt_cc(cc: CompCap) -> str:
    return f"{cc[0]}.{cc[1]}"


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: a GPU and its share of the layers, MiB on that GPU."""

    gpu: GPU
    layers: int
    budget_mib: float
    weights_mib: float
    overhead_mib: float
    kv_bytes_per_token: int

    @property
    def tokens(self) -> int:
        """The longest single sequence this stage has KV cache room for."""
        return int(max(0.0, self.budget_mib - self.weights_mib - self.overhead_mib) * MIB // self.kv_bytes_per_token)


@dataclass(frozen=True)
class Plan:
    model: ModelSpec
    quantization: Quantization
    gpus: GPUSet  # the tensor-parallel group (identical GPUs), or the pipeline's GPUs in stage order
    max_model_len: int
    gpu_memory_utilization: float
    # Per GPU of the group (of a pipeline: of its tightest stage), MiB:
    budget_mib: float
    weights_mib: float
    overhead_mib: float
    kv_bytes_per_token: int
    stages: tuple[Stage, ...] = ()  # pipeline parallel: one per GPU; empty: tensor parallel only

    @property
    def tensor_parallel_size(self) -> int:
        return 1 if self.stages else len(self.gpus)

    @property
    def pipeline_parallel_size(self) -> int:
        return len(self.stages) or 1

    @property
    def layer_partition(self) -> tuple[int, ...]:
        """Layers per pipeline stage, in stage order (empty without a pipeline)."""
        return tuple(s.layers for s in self.stages)

    @property
    def gpu_indices(self) -> tuple[int, ...]:
        return tuple(g.index for g in self.gpus)

    @property
    def kv_cache_mib(self) -> float:
        """KV cache for one sequence of max_model_len tokens, per GPU."""
        return self.max_model_len * self.kv_bytes_per_token / MIB

    @property
    def total_mib(self) -> float:
        return self.weights_mib + self.overhead_mib + self.kv_cache_mib

    @property
    def spare_mib(self) -> float:
        """Budget left after one full-length sequence: vLLM uses it for more concurrent sequences."""
        return self.budget_mib - self.total_mib

    def engine_args(self) -> list[str]:
        q = self.quantization
        args = ["--model", q.model_id, "--dtype", q.dtype]
        if q.vllm_quantization:
            args += ["--quantization", q.vllm_quantization]
        args += [
            "--max-model-len", str(self.max_model_len),
            "--gpu-memory-utilization", f"{self.gpu_memory_utilization:.2f}",
            "--tensor-parallel-size", str(self.tensor_parallel_size),
        ]
        if self.stages:
            args += ["--pipeline-parallel-size", str(self.pipeline_parallel_size)]
        return args

    def engine_env(self) -> dict[str, str]:
        """Environment the engine needs besides its arguments: a pipeline's layer split (vLLM
        splits evenly without it, which overfills the smaller GPU)."""
        if not self.stages:
            return {}
        return {"VLLM_PP_LAYER_PARTITION": ",".join(str(n) for n in self.layer_partition)}

    def explain(self) -> str:
        if self.stages:
            return self._explain_pipeline()
        m, q, tp = self.model, self.quantization, self.tensor_parallel_size
        g = self.gpus[0]
        kv_heads = m.kv_heads_per_gpu(tp)
        kv_heads_note = f"{kv_heads} KV heads" + (f" ({m.num_kv_heads}/{tp} per GPU)" if tp > 1 else "")
        lines = [
            f"GPUs: {', '.join(f'#{x.index}' for x in self.gpus)} {g.name}, {g.memory_total_mib} MiB,"
            f" cc {g.compute_capability}{' each' if tp > 1 else ''}; tensor parallel {tp}",
            f"model: {m.name} ({q.model_id}), {q.name}: --dtype {q.dtype}"
            + (f" --quantization {q.vllm_quantization}" if q.vllm_quantization else ""),
            f"budget per GPU: {_gib(g.memory_total_mib)} x {self.gpu_memory_utilization:.2f}"
            f" = {_gib(self.budget_mib)}",
            f"weights: {m.parameters / 1e9:.2f}e9 params x {q.bytes_per_param:g} B"
            f" = {_gib(self.weights_mib * tp)}, / TP {tp} = {_gib(self.weights_mib)} per GPU",
            f"overhead per GPU: {OVERHEAD_FIXED_MIB} MiB + {OVERHEAD_WEIGHT_FRACTION:.0%} of weights"
            f" = {_gib(self.overhead_mib)}",
            f"KV cache per token per GPU: 2 x {m.num_layers} layers x {kv_heads_note} x {m.head_dim}"
            f" head_dim x {q.kv_bytes} B = {self.kv_bytes_per_token / 1024:g} KiB;"
            f" x {self.max_model_len} tokens = {_gib(self.kv_cache_mib)}",
            f"total per GPU: {self.weights_mib * GIB_PER_MIB:.2f} + {self.overhead_mib * GIB_PER_MIB:.2f}"
            f" + {self.kv_cache_mib * GIB_PER_MIB:.2f} = {_gib(self.total_mib)}"
            f" <= budget {_gib(self.budget_mib)} ({_gib(self.spare_mib)} spare for more sequences)",
            f"max_model_len: {self.max_model_len} (model default {m.default_context_length},"
            f" minimum {min(MIN_CONTEXT, m.default_context_length)}, steps of {CONTEXT_STEP})",
        ]
        return "\n".join(lines)

    def _explain_pipeline(self) -> str:
        m, q = self.model, self.quantization
        lines = [
            f"GPUs: {', '.join(f'#{s.gpu.index} {s.gpu.name} {s.gpu.memory_total_mib} MiB' for s in self.stages)};"
            f" no identical GPUs hold it: pipeline parallel {self.pipeline_parallel_size}, tensor parallel 1",
            f"model: {m.name} ({q.model_id}), {q.name}: --dtype {q.dtype}"
            + (f" --quantization {q.vllm_quantization}" if q.vllm_quantization else ""),
            f"weights: {m.parameters / 1e9:.2f}e9 params x {q.bytes_per_param:g} B"
            f" = {_gib(m.weights_mib(q))}, split by layers ({m.num_layers} in all)",
        ]
        for i, s in enumerate(self.stages):
            lines.append(
                f"stage {i} (GPU #{s.gpu.index}): {s.layers} layers; budget {_gib(s.gpu.memory_total_mib)} x"
                f" {self.gpu_memory_utilization:.2f} = {_gib(s.budget_mib)}; weights {_gib(s.weights_mib)}"
                f" + overhead {_gib(s.overhead_mib)}; KV {s.kv_bytes_per_token / 1024:g} KiB/token:"
                f" room for {s.tokens} tokens")
        lines += [
            f"layer split (VLLM_PP_LAYER_PARTITION): {','.join(str(n) for n in self.layer_partition)},"
            " chosen so that the tightest stage has the most room (vLLM sizes every stage's KV cache alike)",
            f"max_model_len: {self.max_model_len} (model default {m.default_context_length},"
            f" minimum {min(MIN_CONTEXT, m.default_context_length)}, steps of {CONTEXT_STEP})",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        q = self.quantization
        return {
            "model": self.model.name,
            "model_id": self.model.id,
            "served_model_id": q.model_id,
            "quantization": q.name,
            "dtype": q.dtype,
            "vllm_quantization": q.vllm_quantization,
            "max_model_len": self.max_model_len,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "tensor_parallel_size": self.tensor_parallel_size,
            "gpu_indices": list(self.gpu_indices),
            "per_gpu_mib": {
                "budget": round(self.budget_mib, 1),
                "weights": round(self.weights_mib, 1),
                "overhead": round(self.overhead_mib, 1),
                "kv_cache": round(self.kv_cache_mib, 1),
                "spare": round(self.spare_mib, 1),
            },
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "engine_args": self.engine_args(),
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "layer_partition": list(self.layer_partition),
            "engine_env": self.engine_env(),
        }


def _gib(mib: float) -> str:
    return f"{mib * GIB_PER_MIB:.2f} GiB"


# ---------------------------------------------------------------- planning


@dataclass(frozen=True)
class _Need:
    """Why one option does not fit: per-GPU need and budget at the minimum context."""

    model: ModelSpec
    quant: Quantization
    gpus: GPUSet
    need_mib: float
    budget_mib: float


def plan(
    inventory: Inventory,
    catalog: Catalog,
    pinned_model: str | None = None,
    pinned_quantization: str | None = None,
    max_model_len: int | None = None,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    image: EngineImage | None = None,
) -> Plan:
    """The model and engine arguments this node should serve; PlanError when there are none.
    `image`: the catalog's facts about the engine image (driver and GPU generation it needs)."""
    if not 0 < gpu_memory_utilization <= 1:
        raise PlanError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if max_model_len is not None and max_model_len < 1:
        raise PlanError(f"max_model_len must be a positive number of tokens, got {max_model_len}")
    gpus = tuple(g for g in inventory.gpus if g.healthy)
    if not gpus:
        raise CpuOnlyRefusal(_cpu_only_message(inventory))
    if image is not None:
        gpus = _image_gate(inventory, gpus, image)
    groups = _gpu_groups(gpus)
    if pinned_model is not None:
        return _plan_pinned(catalog, groups, pinned_model, pinned_quantization, max_model_len,
                            gpu_memory_utilization, gpus)
    models = [m for m in catalog.models if not m.test_only]
    best = _best(models, groups, pinned_quantization, max_model_len, gpu_memory_utilization, gpus)
    if best is None:
        raise PlanError(_nothing_fits_message(models, groups, pinned_quantization, max_model_len,
                                              gpu_memory_utilization))
    return best


def _best(models: list[ModelSpec], groups: list[GPUSet], quant_name: str | None,
          max_model_len: int | None, util: float, gpus: GPUSet = ()) -> Plan | None:
    # Largest model first (quality), then highest precision; catalog order breaks ties (bf16 > fp16).
    for model in sorted(models, key=lambda m: -m.parameters):
        for quant in _by_precision(model, quant_name):
            fits = [p for g in groups if (p := _fit(model, quant, g, max_model_len, util))]
            if fits:
                # Longest context first: a second GPU is worth using when it saves context.
                return max(fits, key=lambda p: (p.max_model_len, -p.tensor_parallel_size))
            # Only what fits no group of identical GPUs goes to a pipeline over unequal ones:
            # a pipeline adds a hop per token and runs at the pace of its slowest GPU.
            if (pp := _fit_pipeline(model, quant, gpus, max_model_len, util)) is not None:
                return pp
    return None


def _by_precision(model: ModelSpec, quant_name: str | None) -> list[Quantization]:
    quants = [q for q in model.offered if quant_name in (None, q.name)]
    return sorted(quants, key=lambda q: -q.bytes_per_param)


def _gpu_groups(gpus: GPUSet) -> list[GPUSet]:
    """Every GPU set that can form a TP group: 1, 2, 4, 8 identical GPUs."""
    same: dict[tuple, list[GPU]] = {}
    for g in sorted(gpus, key=lambda g: g.index):
        same.setdefault((g.name, g.memory_total_mib, g.compute_capability), []).append(g)
    return [tuple(s[:tp]) for s in same.values() for tp in TP_SIZES if tp <= len(s)]


def _image_gate(inventory: Inventory, gpus: GPUSet, image: EngineImage) -> GPUSet:
    """The GPUs the engine image can use on this driver; PlanError when none."""
    try:
        cuda.check_driver(image.name, image.min_driver, inventory.driver_version)
        cuda.check(image.name, image.cuda, inventory.driver_version, inventory.cuda_version, "per the model catalog")
    except cuda.CudaMismatch as e:
        raise PlanError(str(e)) from None
    usable = tuple(g for g in gpus if _gpu_cc(g) >= image.min_compute_capability)
    if not usable:
        ccs = ", ".join(sorted({g.compute_capability or "unknown" for g in gpus}))
        raise PlanError(f"engine image {image.name} runs on GPUs of compute capability >= "
                        f"{_fmt_cc(image.min_compute_capability)}; this node's are {ccs}. "
                        "Set [engine] image to a build for older GPUs, or serve from a newer GPU")
    return usable


def _gpu_cc(gpu: GPU) -> CompCap:
    return _cc(gpu.compute_capability)


@functools.lru_cache(maxsize=64)
def _cc(text: str | None) -> CompCap:
    # An unknown compute capability satisfies no requirement: better refuse than crash the engine.
    try:
        return parse_compute_capability(text)
    except ValueError:
        return (0, 0)


def _usable(model: ModelSpec, quant: Quantization, gpus: GPUSet) -> bool:
    cc = _gpu_cc(gpus[0])
    return cc >= model.min_compute_capability and cc >= quant.min_compute_capability and \
        model.supports_tp(len(gpus))


def _fit(model: ModelSpec, quant: Quantization, gpus: GPUSet, max_model_len: int | None,
         util: float) -> Plan | None:
    """The plan for this model/quantization on these GPUs, or None when it does not fit."""
    if not _usable(model, quant, gpus):
        return None
    if max_model_len is not None and max_model_len > model.default_context_length:
        return None
    tp = len(gpus)
    budget = gpus[0].memory_total_mib * util
    weights, overhead = _weights_and_overhead(model, quant, tp)
    per_token = model.kv_bytes_per_token(quant, tp)
    tokens = int(max(0.0, budget - weights - overhead) * MIB // per_token)
    length = _context(model, tokens, max_model_len)
    if not length:
        return None
    return Plan(model, quant, gpus, length, util, budget, weights, overhead, per_token)


def _fit_pipeline(model: ModelSpec, quant: Quantization, gpus: GPUSet, max_model_len: int | None,
                  util: float) -> Plan | None:
    """The plan with one pipeline stage per GPU of unequal GPUs, or None when it does not fit."""
    usable = tuple(sorted((g for g in gpus if _usable(model, quant, (g,))), key=lambda g: g.index))
    kinds = {(g.name, g.memory_total_mib, g.compute_capability) for g in usable}
    if len(usable) < 2 or len(kinds) < 2 or len(usable) > model.num_layers:
        return None
    if max_model_len is not None and max_model_len > model.default_context_length:
        return None
    stages = _split_layers(model, quant, usable, util)
    tightest = min(stages, key=lambda s: s.tokens)
    length = _context(model, tightest.tokens, max_model_len)
    if not length:
        return None
    return Plan(model, quant, usable, length, util, tightest.budget_mib, tightest.weights_mib,
                tightest.overhead_mib, tightest.kv_bytes_per_token, stages)


def _split_layers(model: ModelSpec, quant: Quantization, gpus: GPUSet, util: float) -> tuple[Stage, ...]:
    """Layers per stage so that the tightest stage has the most room: every stage's room shrinks
    with each layer it takes, so giving each next layer to the stage left with the most room is
    optimal for the smallest room (a max-min allocation of decreasing functions)."""
    def stage(g: GPU, layers: int) -> Stage:
        weights = model.weights_mib(quant) * layers / model.num_layers
        per_token = 2 * layers * model.num_kv_heads * model.head_dim * quant.kv_bytes
        return Stage(g, layers, g.memory_total_mib * util, weights,
                     OVERHEAD_FIXED_MIB + OVERHEAD_WEIGHT_FRACTION * weights, per_token)

    counts = [1] * len(gpus)
    for _ in range(model.num_layers - len(gpus)):
        # Ties go to the earlier stage, so the split is the same on the head and on the PC.
        i = max(range(len(gpus)), key=lambda k: (stage(gpus[k], counts[k] + 1).tokens, -k))
        counts[i] += 1
    return tuple(stage(g, n) for g, n in zip(gpus, counts, strict=True))


def _context(model: ModelSpec, tokens: int, max_model_len: int | None) -> int:
    """The context to serve with room for `tokens`: 0 when that is too little."""
    if max_model_len is not None:
        return max_model_len if tokens >= max_model_len else 0
    length = min(model.default_context_length, tokens // CONTEXT_STEP * CONTEXT_STEP)
    return length if length >= min(MIN_CONTEXT, model.default_context_length) else 0


def _weights_and_overhead(model: ModelSpec, quant: Quantization, tp: int) -> tuple[float, float]:
    """MiB per GPU: TP shards the weights (embeddings too), each GPU has its own overhead."""
    weights = model.weights_mib(quant) / tp
    return weights, OVERHEAD_FIXED_MIB + OVERHEAD_WEIGHT_FRACTION * weights


def _need(model: ModelSpec, quant: Quantization, gpus: GPUSet, max_model_len: int | None,
          util: float) -> _Need:
    tp = len(gpus)
    weights, overhead = _weights_and_overhead(model, quant, tp)
    tokens = max_model_len or min(MIN_CONTEXT, model.default_context_length)
    need = weights + overhead + tokens * model.kv_bytes_per_token(quant, tp) / MIB
    return _Need(model, quant, gpus, need, gpus[0].memory_total_mib * util)


def _closest_miss(models: list[ModelSpec], groups: list[GPUSet], quant_name: str | None,
                  max_model_len: int | None, util: float) -> _Need | None:
    """The usable option that misses by the least, to report its numbers."""
    needs = [
        _need(m, q, g, max_model_len, util)
        for m in models for q in _by_precision(m, quant_name) for g in groups if _usable(m, q, g)
    ]
    return min(needs, key=lambda n: (n.need_mib - n.budget_mib, -n.model.parameters), default=None)


# ---------------------------------------------------------------- messages


def _plan_pinned(catalog: Catalog, groups: list[GPUSet], ref: str, quant_name: str | None,
                 max_model_len: int | None, util: float, gpus: GPUSet = ()) -> Plan:
    found = catalog.resolve(ref)
    if found is None:
        names = ", ".join(m.name for m in catalog.models)
        raise PlanError(f"model {ref!r} is not in the catalog {catalog.path} (it has: {names})")
    model, quant = found
    if quant is not None and quant_name not in (None, quant.name):
        raise PlanError(f"{ref} is the {quant.name} build of {model.name}, not {quant_name}")
    quant_name = quant.name if quant else quant_name
    if quant_name is not None and model.quantization(quant_name) is None:
        offered = ", ".join(q.name for q in model.offered)
        raise PlanError(f"{model.name} is not offered as {quant_name} (offered: {offered})")
    if max_model_len is not None and max_model_len > model.default_context_length:
        raise PlanError(f"max_model_len {max_model_len} exceeds {model.name}'s context length "
                        f"{model.default_context_length}")
    best = _best([model], groups, quant_name, max_model_len, util, gpus)
    if best is not None:
        return best
    why = _why_not(model, groups, quant_name, max_model_len, util)
    raise PlanError(f"{model.name} ({model.id}) does not fit this node: {why}; "
                    f"{_suggestion(catalog, groups, max_model_len, util)}")


def _why_not(model: ModelSpec, groups: list[GPUSet], quant_name: str | None,
             max_model_len: int | None, util: float) -> str:
    miss = _closest_miss([model], groups, quant_name, max_model_len, util)
    if miss is None:
        return _unusable_reason(model, groups, quant_name)
    return _need_text(miss, max_model_len)


def _need_text(miss: _Need, max_model_len: int | None) -> str:
    tp, gpu = len(miss.gpus), miss.gpus[0]
    tokens = max_model_len or min(MIN_CONTEXT, miss.model.default_context_length)
    where = f"{tp} x {gpu.name}" if tp > 1 else gpu.name
    return (f"as {miss.quant.name} with a {tokens}-token context it needs "
            f"{miss.need_mib * tp * GIB_PER_MIB:.2f} GiB, has {miss.budget_mib * tp * GIB_PER_MIB:.2f} GiB "
            f"({where}, {gpu.memory_total_mib * tp} MiB x {miss.budget_mib / gpu.memory_total_mib:.2f})")


def _unusable_reason(model: ModelSpec, groups: list[GPUSet], quant_name: str | None) -> str:
    ccs = sorted({g[0].compute_capability or "unknown" for g in groups})
    quants = _by_precision(model, quant_name)
    wants = ", ".join(
        f"{q.name} needs cc >= {_fmt_cc(max(model.min_compute_capability, q.min_compute_capability))}"
        for q in quants
    )
    # TP 1 is always a valid size, so an option that is never usable fails on compute capability.
    return f"GPU compute capability {', '.join(ccs)}: {wants}"


def _suggestion(catalog: Catalog, groups: list[GPUSet], max_model_len: int | None, util: float) -> str:
    models = [m for m in catalog.models if not m.test_only]
    alt = _best(models, groups, None, max_model_len, util)
    if alt is None:
        return "no catalog model fits this node"
    q = alt.quantization
    return (f"would fit instead: {alt.model.name} as {q.name} ({q.model_id}, "
            f"tensor parallel {alt.tensor_parallel_size}, max_model_len {alt.max_model_len})")


def _nothing_fits_message(models: list[ModelSpec], groups: list[GPUSet], quant_name: str | None,
                          max_model_len: int | None, util: float) -> str:
    miss = _closest_miss(models, groups, quant_name, max_model_len, util)
    detail = f"; closest: {miss.model.name} {_need_text(miss, max_model_len)}" if miss else ""
    as_quant = f" as {quant_name}" if quant_name else ""
    return f"no catalog model fits this node's GPUs{as_quant}{detail}"


def _cpu_only_message(inventory: Inventory) -> str:
    why = [f"GPU {g.index} ({g.name}) unhealthy: {g.error or 'no reason given'}" for g in inventory.gpus]
    if inventory.nvml_error:
        why.append(f"NVML: {inventory.nvml_error}")
    detail = f" ({'; '.join(why)})" if why else ""
    return f"node is CPU-only: no healthy GPU{detail}; it can serve no catalog model"
