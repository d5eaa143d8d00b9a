"""The model catalog (configs/models.toml): each model's size and the architecture facts the
planner's arithmetic needs, and the precisions offered. Read with core.settings, like every
file a person edits, so a corrupt entry names the file, the model and the key."""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from garage_node.core.settings import SettingsError, one_of, parse, read_toml, setting
from garage_node.core.wire import CatalogModel, CatalogPrecision
from garage_node.placement.cuda import CudaVersion, DriverVersion, parse_cuda, parse_driver

VLLM_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
_FLOAT32_DTYPES = ("float", "float32")
# configs/models.toml, shipped inside the package (models.toml beside this file links to it).
PACKAGED_CATALOG = Path(__file__).with_name("models.toml")
SYSTEM_CATALOG = Path("/etc/garage-node/models.toml")

CompCap = tuple[int, int]


class CatalogError(SettingsError):
    """A catalog that cannot be read; the message names file, table and key."""


def parse_compute_capability(text: object) -> CompCap:
    if not isinstance(text, str) or not re.fullmatch(r"\d+\.\d+", text):
        raise ValueError(text)
    major, minor = text.split(".")
    return int(major), int(minor)


_CC = (parse_compute_capability, 'a string "major.minor" such as "8.9"')
_POSITIVE = ((lambda v: v > 0 and math.isfinite(v)), "greater than 0")
_NONEMPTY = ((lambda v: v.strip() != ""), "a non-empty string")


@dataclass(frozen=True)
class Quantization:
    bytes_per_param: float = setting(check=_POSITIVE)
    dtype: str = setting(check=one_of(*VLLM_DTYPES))  # vLLM --dtype
    # vLLM --quantization; None: weights served as stored.
    vllm_quantization: str | None = setting(None, key="quantization", check=((lambda v: v is None or v.strip() != ""), "a non-empty string"))
    # The repo with these weights (AWQ/GPTQ live in their own repos); empty: the model's id.
    model_id: str = ""
    min_compute_capability: CompCap = setting((0, 0), parse=_CC)
    name: str = setting("", skip=True)  # the catalog key: "bf16", "fp8", "awq", ...

    @property
    def kv_bytes(self) -> int:
        # vLLM's default KV cache dtype follows the activations: fp16/bf16, or fp32.
        return 4 if self.dtype in _FLOAT32_DTYPES else 2


@dataclass(frozen=True)
class ModelSpec:
    id: str = setting(check=_NONEMPTY)  # Hugging Face repo id
    parameters: int = setting(check=_POSITIVE)
    num_layers: int = setting(check=_POSITIVE)
    num_attention_heads: int = setting(check=_POSITIVE)
    num_kv_heads: int = setting(check=_POSITIVE)
    head_dim: int = setting(check=_POSITIVE)
    default_context_length: int = setting(check=_POSITIVE)
    min_compute_capability: CompCap = setting(parse=_CC)
    quantizations: dict[str, Quantization] = setting(check=(bool, "a non-empty table of quantizations"))
    test_only: bool = False
    # The head may place it on a PC whose engine is vLLM's CPU build ([engine] device = "cpu"),
    # with the catalog's default context and first precision: only models small enough for that.
    cpu: bool = False
    name: str = setting("", skip=True)  # the catalog key, what a person pins

    def problems(self):
        if self.num_attention_heads % self.num_kv_heads:
            yield "num_kv_heads", f"must be a divisor of num_attention_heads ({self.num_attention_heads})."

    @property
    def offered(self) -> tuple[Quantization, ...]:
        """The precisions in catalog order (best first)."""
        return tuple(self.quantizations.values())

    def quantization(self, name: str) -> Quantization | None:
        return self.quantizations.get(name)

    def supports_tp(self, tp: int) -> bool:
        # vLLM splits attention heads evenly; KV heads are split or, when fewer than TP, replicated.
        kv_ok = self.num_kv_heads % tp == 0 or tp % self.num_kv_heads == 0
        return self.num_attention_heads % tp == 0 and kv_ok

    def kv_heads_per_gpu(self, tp: int) -> int:
        return math.ceil(self.num_kv_heads / tp)

    def kv_bytes_per_token(self, quant: Quantization, tp: int) -> int:
        """KV cache bytes per token on one GPU of a TP group."""
        return 2 * self.num_layers * self.kv_heads_per_gpu(tp) * self.head_dim * quant.kv_bytes

    def weights_mib(self, quant: Quantization) -> float:
        return self.parameters * quant.bytes_per_param / (1024 * 1024)


@dataclass(frozen=True)
class EngineImage:
    """What an engine image needs of a node's GPUs and driver ([images."<repository:tag>"])."""

    # The CUDA it is built on; once pulled, the image's own config (CUDA_VERSION) is checked too.
    cuda: CudaVersion = setting(parse=(parse_cuda, 'a string "major.minor" such as "12.8"'))
    # The oldest NVIDIA driver that runs it (for CUDA 12.x images: 525.60.13, minor version compatibility).
    min_driver: DriverVersion = setting(parse=(parse_driver, 'a driver version string such as "525.60.13"'))
    # The oldest GPU generation its kernels are built for.
    min_compute_capability: CompCap = setting((0, 0), parse=_CC)
    name: str = setting("", skip=True)  # the table's key: the image reference


@dataclass(frozen=True)
class CatalogFile:
    models: dict[str, ModelSpec] = setting(check=(bool, "a table with at least one [models.<name>] table"))
    images: dict[str, EngineImage] = setting(default_factory=dict)


@dataclass(frozen=True)
class Catalog:
    path: Path
    models: tuple[ModelSpec, ...]
    images: tuple[EngineImage, ...] = ()

    def image(self, ref: str) -> EngineImage | None:
        """The catalog's facts about an engine image, by its exact reference."""
        return next((i for i in self.images if i.name == ref), None)

    def resolve(self, ref: str) -> tuple[ModelSpec, Quantization | None] | None:
        """A model by catalog name or repo id; a quantization's own repo id selects it too."""
        for m in self.models:
            if ref in (m.name, m.id):
                return m, None
            for q in m.offered:
                if ref == q.model_id and q.model_id != m.id:
                    return m, q
        return None


def load_catalog(path: str | Path) -> Catalog:
    path = Path(path)
    raw = parse(CatalogFile, read_toml(path, CatalogError), path, error=CatalogError)
    images = tuple(replace(img, name=ref) for ref, img in raw.images.items())
    return Catalog(path, tuple(_named(name, m) for name, m in raw.models.items()), images)


def _named(name: str, m: ModelSpec) -> ModelSpec:
    """Fill in what the file says by position: each table's key, and a precision's default repo."""
    quants = {q: replace(spec, name=q, model_id=spec.model_id or m.id) for q, spec in m.quantizations.items()}
    return replace(m, name=name, quantizations=quants)


# ---------------------------------------------------------------- an entry on the wire
# The head's assignment carries the entry it planned with (wire.CatalogModel), so a model the
# operator imported at the head (`head model import`) reaches PCs whose own catalog lacks it.


def _cc(cc: CompCap) -> str:
    return f"{cc[0]}.{cc[1]}"


def entry_of(m: ModelSpec) -> CatalogModel:
    """A catalog model as the assignment carries it."""
    quants = [CatalogPrecision(name=q.name, bytes_per_param=float(q.bytes_per_param), dtype=q.dtype,
                               model_id=q.model_id or m.id, vllm_quantization=q.vllm_quantization,
                               min_compute_capability=_cc(q.min_compute_capability)) for q in m.offered]
    return CatalogModel(name=m.name, id=m.id, parameters=int(m.parameters), num_layers=m.num_layers,
                        num_attention_heads=m.num_attention_heads, num_kv_heads=m.num_kv_heads,
                        head_dim=m.head_dim, default_context_length=m.default_context_length,
                        min_compute_capability=_cc(m.min_compute_capability), quantizations=quants,
                        cpu=m.cpu, test_only=m.test_only)


def model_of(entry: CatalogModel, source: str) -> ModelSpec:
    """The ModelSpec of an entry the head sent, checked by the same settings validator as a
    catalog file (raises CatalogError naming `source`, the model and the key)."""
    quants: dict[str, dict[str, object]] = {}
    for q in entry.quantizations:
        body: dict[str, object] = {"bytes_per_param": q.bytes_per_param, "dtype": q.dtype, "model_id": q.model_id,
                                   "min_compute_capability": q.min_compute_capability}
        if q.vllm_quantization is not None:
            body["quantization"] = q.vllm_quantization
        quants[q.name] = body
    raw = {"id": entry.id, "parameters": entry.parameters, "num_layers": entry.num_layers,
           "num_attention_heads": entry.num_attention_heads, "num_kv_heads": entry.num_kv_heads,
           "head_dim": entry.head_dim, "default_context_length": entry.default_context_length,
           "min_compute_capability": entry.min_compute_capability, "quantizations": quants,
           "test_only": entry.test_only, "cpu": entry.cpu}
    data = parse(CatalogFile, {"models": {entry.name: raw}}, source, error=CatalogError)
    return _named(entry.name, data.models[entry.name])


def with_entry(catalog: Catalog, entry: CatalogModel, source: str) -> tuple[Catalog, bool]:
    """`catalog` with the head's entry for a model: (catalog, True) when its own entry of that
    name says the same (its own is used), else (a catalog whose entry of that name, or of that
    repo id, is the head's, False). Raises CatalogError for an entry that fails the checks."""
    own = next((m for m in catalog.models if m.name == entry.name), None)
    if own is not None and entry_of(own) == entry:
        return catalog, True
    head = model_of(entry, source)
    others = tuple(m for m in catalog.models if m.name != head.name and m.id != head.id)
    return replace(catalog, models=(head, *others)), False


def catalog_path(configured: str) -> Path:
    if configured:
        return Path(configured)
    return SYSTEM_CATALOG if SYSTEM_CATALOG.exists() else PACKAGED_CATALOG


@functools.lru_cache(maxsize=4)
def _cached(path: Path, mtime_ns: int) -> Catalog:
    return load_catalog(path)


def load_cached(path: Path) -> Catalog:
    """Parsed once per version of the file: the engine plans on every pass."""
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as e:
        raise CatalogError(f"{path}: cannot read model catalog ({e.strerror or e}).") from None
    return _cached(path, mtime)
