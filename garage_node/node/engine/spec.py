"""What the engine should run: config + GPUs + the model catalog -> an `EngineSpec`, and the
Docker container body that runs it. Pure: no Docker, no network (EngineManager acts on it)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from garage_node.node.config import EngineSection
from garage_node.node.engine import planner
from garage_node.node.engine.catalog import Catalog, CatalogError, catalog_path, load_cached
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

    @property
    def endpoint(self) -> str:
        return f"http://{self.bind_ip}:{self.port}"

    @property
    def spec_hash(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def container_body(self, secret_env: dict[str, str]) -> dict[str, Any]:
        mounts = [{"Type": "bind", "Source": self.cache_dir, "Target": CACHE_IN_CONTAINER}]
        if self.model_dir:
            mounts.append({"Type": "bind", "Source": self.model_dir, "Target": "/models/served", "ReadOnly": True})
        host: dict[str, Any] = {
            # Only on the overlay address: Ray and vLLM have no authentication of their own.
            "PortBindings": {f"{CONTAINER_PORT}/tcp": [{"HostIp": self.bind_ip, "HostPort": str(self.port)}]},
            "ShmSize": self.shm_bytes,
            "Mounts": mounts,
            "RestartPolicy": {"Name": "no"},  # the agent restarts it, with backoff, visibly
            "LogConfig": {"Type": "json-file", "Config": {"max-size": "20m", "max-file": "2"}},
        }
        if self.device == "gpu":
            req: dict[str, Any] = {"Driver": "nvidia", "Capabilities": [["gpu"]]}
            if self.gpu_ids:
                req["DeviceIDs"] = list(self.gpu_ids)
            else:
                req["Count"] = -1
            host["DeviceRequests"] = [req]
        env = [f"{k}={v}" for k, v in self.env] + [f"{k}={v}" for k, v in sorted(secret_env.items())]
        return {
            "Image": self.image,
            "Cmd": list(self.args) + ["--host", "0.0.0.0", "--port", str(CONTAINER_PORT)],
            "Env": env,
            "ExposedPorts": {f"{CONTAINER_PORT}/tcp": {}},
            "Labels": {LABEL_MANAGED: "true", LABEL_HASH: self.spec_hash, LABEL_MODEL: self.model},
            "HostConfig": host,
        }


def secret_env(cfg: EngineSection) -> dict[str, str]:
    return {"HF_TOKEN": cfg.hub_token} if cfg.hub_token else {}


def desired_spec(cfg: EngineSection, inventory: Inventory, bind_ip: str) -> tuple[EngineSpec, str]:
    """(spec, one-line explanation); raises EngineConfigError with what to do."""
    try:
        catalog = load_cached(catalog_path(cfg.catalog))
    except CatalogError as e:
        raise EngineConfigError(f"model catalog unusable: {e}") from None
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
        why = f"{plan.model.id} {plan.quantization.name}, TP {plan.tensor_parallel_size}, context {plan.max_model_len}"
    if cfg.model_dir:
        args = _replace_arg(args, "--model", "/models/served")
    digest = hashlib.sha256(json.dumps(secret_env(cfg), sort_keys=True).encode()).hexdigest()[:16] if cfg.hub_token else ""
    spec = EngineSpec(
        image=cfg.image, model=model, args=tuple(args) + tuple(cfg.extra_args), bind_ip=bind_ip, port=cfg.port,
        device=cfg.device, gpu_ids=gpu_ids, shm_bytes=cfg.shm_size_mib * 1024 * 1024,
        cache_dir=str(cfg.cache_dir), model_dir=cfg.model_dir, env=tuple(sorted(cfg.env.items())),
        secret_env_digest=digest,
    )
    return spec, why


def plan_for(cfg: EngineSection, inventory: Inventory, catalog: Catalog) -> planner.Plan:
    """The planner's choice for these GPUs under the [engine] pins (raises planner.PlanError)."""
    return planner.plan(inventory, catalog, pinned_model=cfg.model or None,
                        pinned_quantization=cfg.quantization or None,
                        max_model_len=cfg.max_model_len or None,
                        gpu_memory_utilization=cfg.gpu_memory_utilization)


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
