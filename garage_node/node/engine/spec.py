"""What the engine should run: config + GPUs + the model catalog -> an `EngineSpec`, and the
Docker container body that runs it. Pure: no Docker, no network (EngineManager acts on it)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from garage_node.node.config import EngineSection
from garage_node.placement import cuda
from garage_node.placement import fit as planner
from garage_node.placement.catalog import Catalog, CatalogError, catalog_path, load_cached, with_entry
from garage_node.node.engine.nvidia import DriverHost, DriverHostError, Passthrough
from garage_node.core.wire import GPU, Assignment
from garage_node.node.gpu import Inventory

LABEL_MANAGED = "garage-node.managed"
LABEL_HASH = "garage-node.spec-hash"
LABEL_MODEL = "garage-node.model"
CONTAINER_PORT = 8000
CACHE_IN_CONTAINER = "/root/.cache/huggingface"


class EngineConfigError(Exception):
    """The engine cannot be planned (model does not fit, bad catalog, ...): a person must act."""


@dataclass(frozen=True)
class EngineSpec:
    image: str
    model: str  # the name clients ask for (--served-model-name)
    args: tuple[str, ...]
    bind_ip: str
    port: int
    device: str
    gpu_ids: tuple[str, ...]  # empty with device "gpu": all GPUs
    shm_bytes: int
    cache_dir: str
    model_dir: str
    env: tuple[tuple[str, str], ...]
    secret_env_digest: str = ""  # a hash of secret values, so a changed token replaces the container
    # GPU engines: "devices" (passthrough below) or "nvidia-toolkit" (Docker device requests).
    gpu_access: str = ""
    passthrough: Passthrough | None = None
    # The driver the engine will run on, for the CUDA gate against the image (and a new driver
    # after a reboot replaces the container).
    driver_version: str | None = None
    driver_cuda: str | None = None
    # Not part of the spec's hash or repr (secret_env_digest stands for it).
    api_key: str = field(default="", repr=False, compare=False)

    @property
    def endpoint(self) -> str:
        return f"http://{self.bind_ip}:{self.port}"

    @property
    def spec_hash(self) -> str:
        fields = asdict(self)
        fields.pop("api_key")
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def container_body(self, secret_env: dict[str, str], image_env: Sequence[str] = ()) -> dict[str, Any]:
        """The body of POST /containers/create. image_env: the image's own Env (its
        LD_LIBRARY_PATH is kept behind the driver's library directory)."""
        mounts: list[dict[str, Any]] = [{"Type": "bind", "Source": self.cache_dir, "Target": CACHE_IN_CONTAINER}]
        if self.model_dir:
            mounts.append({"Type": "bind", "Source": self.model_dir, "Target": "/models/served", "ReadOnly": True})
        env_map = dict(self.env)
        host: dict[str, Any] = {
            # Only on the overlay address: Ray and vLLM have no authentication of their own.
            "PortBindings": {f"{CONTAINER_PORT}/tcp": [{"HostIp": self.bind_ip, "HostPort": str(self.port)}]},
            "ShmSize": self.shm_bytes,
            "Mounts": mounts,
            "RestartPolicy": {"Name": "no"},  # the agent restarts it, with backoff, visibly
            "LogConfig": {"Type": "json-file", "Config": {"max-size": "20m", "max-file": "2"}},
        }
        if self.device == "gpu" and self.passthrough is not None:
            host["Devices"] = self.passthrough.devices_body()
            mounts.extend(self.passthrough.mounts())
            env_map.update(self.passthrough.environment(image_env, dict(self.env)))
        elif self.device == "gpu":
            host["DeviceRequests"] = [_device_request(self.gpu_ids)]
        env = [f"{k}={v}" for k, v in env_map.items()] + [f"{k}={v}" for k, v in sorted(secret_env.items())]
        return {
            "Image": self.image,
            "Cmd": list(self.args) + ["--host", "0.0.0.0", "--port", str(CONTAINER_PORT)],
            "Env": env,
            "ExposedPorts": {f"{CONTAINER_PORT}/tcp": {}},
            "Labels": {LABEL_MANAGED: "true", LABEL_HASH: self.spec_hash, LABEL_MODEL: self.model},
            "HostConfig": host,
        }


def _device_request(gpu_ids: tuple[str, ...]) -> dict[str, Any]:
    """GPUs through the NVIDIA container toolkit (gpu_access = "nvidia-toolkit")."""
    req: dict[str, Any] = {"Driver": "nvidia", "Capabilities": [["gpu"]]}
    if gpu_ids:
        req["DeviceIDs"] = list(gpu_ids)
    else:
        req["Count"] = -1
    return req


def check_image(spec: EngineSpec, image_env: Sequence[str], image_labels: Mapping[str, str]) -> str:
    """The CUDA gate on the pulled image: '' or a note when it runs on this node's driver;
    raises EngineConfigError (the engine is refused, with what to do) when it cannot."""
    if spec.device != "gpu":
        return ""
    found = cuda.image_cuda(image_env, image_labels)
    if found is None:
        return f"image {spec.image} states no CUDA version (CUDA_VERSION): not checked against the driver"
    try:
        return cuda.check(spec.image, found.version, spec.driver_version, spec.driver_cuda, found.source)
    except cuda.CudaMismatch as e:
        raise EngineConfigError(str(e)) from None


def secret_env(cfg: EngineSection, api_key: str = "") -> dict[str, str]:
    """Secrets the container gets in its environment (never on its command line, never in the
    spec, whose hash labels the container): the model hub's token, and the API key the head's
    gateway calls the engine with (vLLM then refuses /v1 calls without it)."""
    env = {"HF_TOKEN": cfg.hub_token} if cfg.hub_token else {}
    if api_key:
        env["VLLM_API_KEY"] = api_key
    return env


# vLLM's CPU build compiles its logprob kernels with torch.compile on first use, and inductor
# needs a C++ compiler the engine image does not have: the first request asking for logprobs
# (a customer's, or the head's audit verifier's prompt_logprobs) killed the engine for good
# (EngineDeadError, then 500 on everything; measured on vLLM 0.32.0 CPU). Eager kernels instead.
# An [engine] env setting of the owner's still wins.
CPU_ENV = {"TORCHDYNAMO_DISABLE": "1"}


def desired_spec(cfg: EngineSection, inventory: Inventory, bind_ip: str, api_key: str = "") -> tuple[EngineSpec, str]:
    """(spec, one-line explanation); raises EngineConfigError with what to do."""
    catalog = _catalog(cfg)
    passthrough: Passthrough | None = None
    env: dict[str, str] = {}
    if cfg.device == "cpu":
        args, model, why = _cpu_args(cfg, catalog)
        gpu_ids: tuple[str, ...] = ()
    else:
        try:
            plan = plan_for(cfg, inventory, catalog)
        except planner.PlanError as e:
            raise EngineConfigError(str(e)) from None
        model = plan.model.id
        args = plan.engine_args() + ["--served-model-name", model]
        gpu_ids = tuple(str(i) for i in plan.gpu_indices)
        env = plan.engine_env()  # a pipeline over unequal GPUs: its layer split
        why = f"{plan.model.id} {plan.quantization.name}, TP {plan.tensor_parallel_size}, context {plan.max_model_len}"
        if cfg.gpu_access == "devices":
            passthrough = gpu_passthrough(cfg, inventory, plan.gpu_indices)
    spec = _spec(cfg, inventory, bind_ip, api_key, model, args, gpu_ids, passthrough, cfg.model_dir, env)
    return spec, why


def _spec(cfg: EngineSection, inventory: Inventory, bind_ip: str, api_key: str, model: str, args: list[str],
          gpu_ids: tuple[str, ...], passthrough: Passthrough | None, model_dir: str, env: dict[str, str]) -> EngineSpec:
    """The spec of an engine serving `model` with `args`, from [engine]'s other settings."""
    if model_dir:
        args = _replace_arg(args, "--model", "/models/served")
    base_env = CPU_ENV if cfg.device == "cpu" else {}
    secrets = secret_env(cfg, api_key)
    digest = hashlib.sha256(json.dumps(secrets, sort_keys=True).encode()).hexdigest()[:16] if secrets else ""
    return EngineSpec(
        image=cfg.image, model=model, args=tuple(args) + tuple(cfg.extra_args), bind_ip=bind_ip, port=cfg.port,
        device=cfg.device, gpu_ids=gpu_ids, shm_bytes=cfg.shm_size_mib * 1024 * 1024,
        cache_dir=str(cfg.cache_dir), model_dir=model_dir, env=tuple(sorted({**base_env, **cfg.env, **env}.items())),
        secret_env_digest=digest, api_key=api_key,
        gpu_access=cfg.gpu_access if cfg.device == "gpu" else "", passthrough=passthrough,
        driver_version=inventory.driver_version if cfg.device == "gpu" else None,
        driver_cuda=inventory.cuda_version if cfg.device == "gpu" else None,
    )


def _catalog(cfg: EngineSection) -> Catalog:
    try:
        return load_cached(catalog_path(cfg.catalog))
    except CatalogError as e:
        raise EngineConfigError(f"model catalog unusable: {e}") from None


def resolve_pin(cfg: EngineSection) -> tuple[str, str | None] | None:
    """The owner's pin ([engine] model and quantization) as catalog names; None: no pin.
    A pin the catalog does not know stays as written (it matches no assignment then)."""
    if not cfg.model:
        return None
    found = _catalog(cfg).resolve(cfg.model)
    if found is None:
        return cfg.model, cfg.quantization or None
    model, quant = found
    return model.name, cfg.quantization or (quant.name if quant else None)


def assigned_spec(cfg: EngineSection, inventory: Inventory, bind_ip: str, api_key: str, a: Assignment,
                  model_dir: str = "") -> tuple[EngineSpec, str]:
    """(spec, one line) for what the head assigned (issue #18): its model, precision, context,
    GPUs and parallelism. `model_dir`: the weights fetched from the head's store (else [engine]
    model_dir, else the model hub). Raises EngineConfigError when this PC cannot serve it."""
    catalog = assigned_catalog(cfg, a)
    found = catalog.resolve(a.model or "")
    if a.model is None or found is None:
        raise EngineConfigError(f"the assigned model {a.model} is not in this PC's catalog {catalog.path}")
    model, quant = found
    if a.quantization is not None:
        quant = model.quantization(a.quantization)
        if quant is None:
            raise EngineConfigError(f"{model.name} is not offered in {a.quantization} (catalog {catalog.path})")
    folder = model_dir or cfg.model_dir
    env: dict[str, str] = {}
    passthrough: Passthrough | None = None
    if cfg.device == "cpu":
        quant = quant or model.offered[0]
        length = a.max_model_len or cfg.max_model_len or model.default_context_length
        args = ["--model", quant.model_id, "--served-model-name", model.id, "--dtype", quant.dtype,
                "--max-model-len", str(length)]
        spec = _spec(cfg, inventory, bind_ip, api_key, model.id, args, (), None, folder, env)
        return spec, f"{model.id} {quant.name} on CPU, context {length} (assigned by the head)"
    gpus = _assigned_gpus(inventory, a)
    if a.pipeline_parallel_size == 1:
        # The same arithmetic the head ran (placement/fit.py), on the GPUs it named: a PC
        # whose GPUs changed since its last report refuses what no longer fits.
        try:
            plan = planner.plan(_Only(inventory, gpus), catalog, pinned_model=model.name,
                                pinned_quantization=quant.name if quant else None, max_model_len=a.max_model_len,
                                gpu_memory_utilization=cfg.gpu_memory_utilization, image=catalog.image(cfg.image))
        except planner.PlanError as e:
            raise EngineConfigError(f"the assignment does not fit this PC's GPUs {list(a.gpu_indices)}: {e}") from None
        quant, length = plan.quantization, plan.max_model_len
    else:
        quant = quant or model.offered[0]
        length = a.max_model_len or model.default_context_length
    args = ["--model", quant.model_id, "--served-model-name", model.id, "--dtype", quant.dtype]
    if quant.vllm_quantization:
        args += ["--quantization", quant.vllm_quantization]
    args += ["--max-model-len", str(length), "--gpu-memory-utilization", f"{cfg.gpu_memory_utilization:.2f}",
             "--tensor-parallel-size", str(a.tensor_parallel_size)]
    if a.pipeline_parallel_size > 1:
        args += ["--pipeline-parallel-size", str(a.pipeline_parallel_size)]
        if a.layer_partition:
            # Layers per stage, by each GPU's memory (unequal GPUs in one PC).
            env["VLLM_PP_LAYER_PARTITION"] = ",".join(str(n) for n in a.layer_partition)
    indices = tuple(g.index for g in gpus)
    if cfg.gpu_access == "devices":
        passthrough = gpu_passthrough(cfg, inventory, indices)
    spec = _spec(cfg, inventory, bind_ip, api_key, model.id, args, tuple(str(i) for i in indices), passthrough,
                 folder, env)
    parallel = f"TP {a.tensor_parallel_size}" + (f", PP {a.pipeline_parallel_size}" if a.pipeline_parallel_size > 1 else "")
    return spec, f"{model.id} {quant.name}, {parallel}, context {length} (assigned by the head)"


def assigned_catalog(cfg: EngineSection, a: Assignment) -> Catalog:
    """The catalog to plan an assignment with: this PC's own, or, when the head's assignment
    carries a catalog entry that its own lacks or describes otherwise (a model imported at the
    head), this PC's with the head's entry in it. The fit check that follows is the PC's own."""
    catalog = _catalog(cfg)
    entry = a.catalog_entry
    if entry is None or a.model is None:
        return catalog
    if entry.name != a.model:
        raise EngineConfigError(f"the head's catalog entry is for {entry.name}, but it assigns {a.model}")
    try:
        return with_entry(catalog, entry, f"the head's catalog entry for {entry.name}")[0]
    except CatalogError as e:
        raise EngineConfigError(f"the head's catalog entry is unusable: {e}") from None


def _assigned_gpus(inventory: Inventory, a: Assignment) -> tuple[GPU, ...]:
    by_index = {g.index: g for g in inventory.gpus}
    if not a.gpu_indices:
        raise EngineConfigError("the assignment names no GPU for a GPU engine")
    missing = [i for i in a.gpu_indices if i not in by_index or not by_index[i].healthy]
    if missing:
        raise EngineConfigError(f"the assigned GPUs {missing} are not healthy GPUs of this PC")
    if a.tensor_parallel_size * a.pipeline_parallel_size != len(a.gpu_indices):
        raise EngineConfigError(f"TP {a.tensor_parallel_size} x PP {a.pipeline_parallel_size} does not match "
                                f"the {len(a.gpu_indices)} GPUs assigned")
    return tuple(by_index[i] for i in a.gpu_indices)


@dataclass(frozen=True)
class _Only:
    """An inventory seen through the GPUs an assignment names (for the fit check)."""

    whole: Inventory
    only: tuple[GPU, ...]

    @property
    def gpus(self) -> tuple[GPU, ...]:
        return self.only

    @property
    def driver_version(self) -> str | None:
        return self.whole.driver_version

    @property
    def cuda_version(self) -> str | None:
        return self.whole.cuda_version

    @property
    def nvml_error(self) -> str | None:
        return self.whole.nvml_error


def gpu_passthrough(cfg: EngineSection, inventory: Inventory, indices: Sequence[int]) -> Passthrough:
    """Devices and driver libraries for these GPUs (raises EngineConfigError with what to do)."""
    try:
        return DriverHost(cfg.driver_root).passthrough([(i, inventory.bus_id(i)) for i in indices])
    except DriverHostError as e:
        raise EngineConfigError(f"cannot give the engine its GPU: {e}") from None


def plan_for(cfg: EngineSection, inventory: Inventory, catalog: Catalog) -> planner.Plan:
    """The planner's choice for these GPUs under the [engine] pins (raises planner.PlanError)."""
    return planner.plan(inventory, catalog, pinned_model=cfg.model or None,
                        pinned_quantization=cfg.quantization or None,
                        max_model_len=cfg.max_model_len or None,
                        gpu_memory_utilization=cfg.gpu_memory_utilization,
                        image=catalog.image(cfg.image))


def _cpu_args(cfg: EngineSection, catalog: Catalog) -> tuple[list[str], str, str]:
    if not cfg.model:
        raise EngineConfigError("engine.device is \"cpu\" but no engine.model is set: name a catalog model "
                                "small enough for this CPU (the planner only sizes GPU memory).")
    found = catalog.resolve(cfg.model)
    if found is None:
        raise EngineConfigError(f"engine.model '{cfg.model}' is not in the catalog {catalog.path}")
    model, quant = found
    quant = quant or model.offered[0]
    length = cfg.max_model_len or model.default_context_length
    args = ["--model", quant.model_id, "--served-model-name", model.id, "--dtype", quant.dtype,
            "--max-model-len", str(length)]
    return args, model.id, f"{model.id} {quant.name} on CPU, context {length}"


def _replace_arg(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out
