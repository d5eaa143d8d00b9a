"""The inference engine: vLLM's OpenAI-compatible server in a Docker container.

`desired_spec()` turns config + GPUs + the model catalog into an `EngineSpec` (what should
run); `EngineManager` reconciles Docker towards it in its own thread (pulls and health waits
are slow, and the agent's loop must stay responsive): create, start, health, restart with
backoff, adopt a running container whose spec hash matches, replace one whose spec changed,
and drain before stopping.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from . import planner
from .backoff import Backoff
from .config import EngineSection
from .dockerapi import Docker, DockerError
from .gpu import Inventory

log = logging.getLogger(__name__)

LABEL_MANAGED = "garage-node.managed"
LABEL_HASH = "garage-node.spec-hash"
LABEL_MODEL = "garage-node.model"
CONTAINER_PORT = 8000
CACHE_IN_CONTAINER = "/root/.cache/huggingface"
# configs/models.toml, shipped inside the package (garage_node/models.toml links to it).
PACKAGED_CATALOG = Path(__file__).with_name("models.toml")
SYSTEM_CATALOG = Path("/etc/garage-node/models.toml")


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


def catalog_path(cfg: EngineSection) -> Path:
    if cfg.catalog:
        return Path(cfg.catalog)
    return SYSTEM_CATALOG if SYSTEM_CATALOG.exists() else PACKAGED_CATALOG


@functools.lru_cache(maxsize=4)
def _load_catalog(path: Path, mtime_ns: int) -> planner.Catalog:
    """Parsed once per version of the file: desired_spec() runs on every engine and agent pass."""
    return planner.load_catalog(path)


def secret_env(cfg: EngineSection) -> dict[str, str]:
    return {"HF_TOKEN": cfg.hub_token} if cfg.hub_token else {}


def desired_spec(cfg: EngineSection, inventory: Inventory, bind_ip: str) -> tuple[EngineSpec, str]:
    """(spec, one-line explanation); raises EngineConfigError with what to do."""
    try:
        path = catalog_path(cfg)
        catalog = _load_catalog(path, path.stat().st_mtime_ns)
    except (planner.CatalogError, OSError) as e:
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


def plan_for(cfg: EngineSection, inventory: Inventory, catalog: planner.Catalog) -> planner.Plan:
    """The planner's choice for these GPUs under the [engine] pins (raises planner.PlanError)."""
    return planner.plan(inventory, catalog, pinned_model=cfg.model or None,
                        pinned_quantization=cfg.quantization or None,
                        max_model_len=cfg.max_model_len or None,
                        gpu_memory_utilization=cfg.gpu_memory_utilization)


def _cpu_args(cfg: EngineSection, catalog: planner.Catalog) -> tuple[list[str], str, str]:
    if not cfg.model:
        raise EngineConfigError("engine.device is \"cpu\" but no engine.model is set: name a catalog model "
                                "small enough for this CPU (the planner only sizes GPU memory).")
    found = catalog.resolve(cfg.model)
    if found is None:
        raise EngineConfigError(f"engine.model '{cfg.model}' is not in the catalog {catalog.path}")
    model, quant = found
    quant = quant or model.quantizations[0]
    length = cfg.max_model_len or model.default_context_length
    args = ["--model", quant.model_id, "--served-model-name", model.id, "--dtype", quant.dtype,
            "--max-model-len", str(length)]
    return args, model.id, f"{model.id} {quant.name} on CPU, context {length}"


def _replace_arg(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


# ---------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Metrics:
    running: int
    waiting: int
    generation_tokens_total: float


def parse_metrics(text: str) -> Metrics:
    """vLLM's Prometheus metrics, summed over its label sets (one per served model)."""
    values = {"vllm:num_requests_running": 0.0, "vllm:num_requests_waiting": 0.0, "vllm:generation_tokens": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name in values:
            values[family.name] += sum(s.value for s in family.samples if not s.name.endswith("_created"))
    return Metrics(int(values["vllm:num_requests_running"]), int(values["vllm:num_requests_waiting"]),
                   values["vllm:generation_tokens"])


# ---------------------------------------------------------------- manager


@dataclass
class EngineStatus:
    state: str = "starting"  # disabled refused error pulling starting healthy restarting degraded draining drained stopped
    message: str = ""
    image: str | None = None
    model: str | None = None
    endpoint: str | None = None
    container_id: str | None = None
    healthy_since: float | None = None
    restarts: int = 0
    requests_running: int | None = None
    requests_waiting: int | None = None
    generation_tokens_per_s: float | None = None
    last_log_lines: list[str] = field(default_factory=list)
    plan: str | None = None


class EngineManager:
    def __init__(self, cfg: EngineSection, drain_flag: Path, desired: Callable[[], tuple[EngineSpec, str] | None],
                 interval_s: float = 2.0) -> None:
        """`desired` returns the spec to run (None while the node is not ready for an engine)."""
        self.cfg = cfg
        self.drain_flag = drain_flag
        self.desired = desired
        self.interval_s = interval_s
        self.docker = Docker(cfg.docker_socket)
        self.name = cfg.container_name
        self.status = EngineStatus(state="disabled" if not cfg.enabled else "starting")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._backoff = Backoff(2.0, 120.0)
        self._next_start = 0.0
        self._crashes: list[float] = []
        self._started_at: float | None = None
        self._last_tokens: tuple[float, float] | None = None  # (time, counter)
        self._http = httpx.Client(timeout=5.0)
        self._spec: EngineSpec | None = None  # the last spec reconciled towards
        self._stand_down = threading.Event()

    # -- control

    def start(self) -> None:
        if self.cfg.enabled:
            self._thread.start()

    @property
    def draining(self) -> bool:
        return self.drain_flag.exists()

    def drain(self) -> None:
        """Persisted: a drain survives agent restarts and reboots until resume()."""
        self.drain_flag.parent.mkdir(parents=True, exist_ok=True)
        self.drain_flag.write_text(f"{time.time()}\n")
        self._wake.set()

    def resume(self) -> None:
        self.drain_flag.unlink(missing_ok=True)
        self._wake.set()

    def stand_down(self) -> None:
        """The node left the region (revoked): drain and stop the engine until it joins again."""
        self._stand_down.set()
        self._wake.set()

    def shutdown(self) -> None:
        """Agent stopping (SIGTERM): drain the engine, then stop it gently."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.cfg.drain_grace_s + self.cfg.stop_timeout_s + 60)
        if self.cfg.enabled:
            try:
                self._drain_and_stop("stopped", "stopped with the agent")
            except DockerError as e:
                log.warning("could not stop the engine: %s", e)
        self._http.close()
        self.docker.close()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            d = asdict(self.status)
        d["draining"] = self.draining
        return d

    # -- loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile_once()
            except DockerError as e:
                self._set("error", str(e))
            except Exception as e:  # never take the agent down
                log.exception("engine reconcile failed")
                self._set("error", f"internal error: {e}")
            # A healthy engine is looked at less often: every probe (/health, /v1/models,
            # /metrics) runs on vLLM's own event loop and costs it a little throughput.
            self._wake.wait(self.interval_s * (3 if self.status.state == "healthy" else 1))
            self._wake.clear()

    def reconcile_once(self) -> None:
        if self.draining:
            if self.status.state not in ("drained",):
                self._drain_and_stop("drained", "drained: no new work; run `garage-node resume` to serve again")
            return
        try:
            wanted = self.desired()
        except EngineConfigError as e:
            self._set("refused", str(e))
            return
        if wanted is None:
            if self._stand_down.is_set():
                self._drain_and_stop("stopped", "stopped: this node is no longer part of the region")
            else:
                self._set("starting", "waiting for the node to join before starting the engine")
            return
        self._stand_down.clear()
        spec, why = wanted
        self._spec = spec
        with self._lock:
            self.status.image, self.status.model, self.status.endpoint, self.status.plan = spec.image, spec.model, spec.endpoint, why
        self.docker.ping()
        current = self.docker.container(self.name)
        if current is not None and current.labels.get(LABEL_HASH) != spec.spec_hash:
            log.info("engine spec changed (%s -> %s): replacing the container", current.labels.get(LABEL_HASH), spec.spec_hash)
            self._stop_container(remove=True)
            current = None
        if current is None:
            self._create_and_start(spec)
        elif not current.running:
            self._crashed(current.exit_code)
        else:
            if self.status.container_id != current.id:
                log.info("adopted running engine container %s", current.id[:12])
                self._started_at = self._started_at or time.monotonic()
            with self._lock:
                self.status.container_id = current.id
            self._check_health(spec)

    def _create_and_start(self, spec: EngineSpec) -> None:
        if time.monotonic() < self._next_start:
            return
        if not self.docker.image_exists(spec.image):
            self._pull(spec.image)
        Path(spec.cache_dir).mkdir(parents=True, exist_ok=True)
        cid = self.docker.create(self.name, spec.container_body(secret_env(self.cfg)))
        self.docker.start(self.name)
        self._started_at = time.monotonic()
        with self._lock:
            self.status.container_id, self.status.healthy_since = cid, None
        self._set("starting", f"engine container started; loading {spec.model}")

    def _pull(self, image: str) -> None:
        self._set("pulling", f"pulling {image}")
        last = [0.0]

        def progress(line: str) -> None:
            if time.monotonic() - last[0] > 1:  # status, not a firehose
                last[0] = time.monotonic()
                self._set("pulling", f"pulling {image}: {line}")
        try:
            self.docker.pull(image, progress)
        except DockerError as e:
            if e.unavailable:
                raise
            raise DockerError(f"image {image} is not on this node and could not be pulled ({e}). "
                              "Check engine.image, or load the image with `docker load`.") from None

    def _crashed(self, exit_code: int | None) -> None:
        now = time.monotonic()
        if self._next_start <= now and self.status.state not in ("restarting", "degraded"):
            # First sight of this exit: count it and schedule the restart.
            self._crashes = [t for t in self._crashes if now - t < self.cfg.crash_window_s] + [now]
            delay = self._backoff.next_delay()
            self._next_start = now + delay
            lines = self.docker.logs(self.name, tail=15)
            with self._lock:
                self.status.restarts += 1
                self.status.last_log_lines = lines
                self.status.healthy_since = None
            if len(self._crashes) >= self.cfg.crash_loop_restarts:
                self._set("degraded", f"engine keeps crashing (exit code {exit_code}, {len(self._crashes)} times in "
                                      f"{self.cfg.crash_window_s / 60:.0f} min); retrying in {delay:.0f} s. Its last log lines are in status.")
            else:
                self._set("restarting", f"engine exited (code {exit_code}); restarting in {delay:.0f} s")
            return
        if now >= self._next_start:
            self.docker.start(self.name)
            self._started_at = now
            self._set("starting", "engine restarted after a crash")

    def _check_health(self, spec: EngineSpec) -> None:
        healthy = self._probe(spec)
        if healthy:
            if self.status.state != "healthy":
                with self._lock:
                    self.status.healthy_since = time.time()
                self._backoff.reset()
            self._set("healthy", f"serving {spec.model} at {spec.endpoint}")
            self._read_metrics(spec)
            return
        with self._lock:
            self.status.healthy_since = None
        age = time.monotonic() - (self._started_at or time.monotonic())
        if age > self.cfg.startup_timeout_s:
            self._set("degraded", f"engine running for {age:.0f} s but not answering /health; restarting it")
            self._stop_container(remove=False)
        else:
            self._set("starting", f"engine loading {spec.model} ({age:.0f} s)")

    def _probe(self, spec: EngineSpec) -> bool:
        try:
            if self._http.get(f"{spec.endpoint}/health").status_code != 200:
                return False
            models = self._http.get(f"{spec.endpoint}/v1/models").json()
            return any(m.get("id") == spec.model for m in models.get("data", []))
        except (httpx.HTTPError, ValueError):
            return False

    def _read_metrics(self, spec: EngineSpec) -> Metrics | None:
        try:
            m = parse_metrics(self._http.get(f"{spec.endpoint}/metrics").text)
        except (httpx.HTTPError, ValueError):
            return None
        now = time.monotonic()
        rate = None
        if self._last_tokens is not None and now > self._last_tokens[0]:
            rate = max(0.0, (m.generation_tokens_total - self._last_tokens[1]) / (now - self._last_tokens[0]))
        self._last_tokens = (now, m.generation_tokens_total)
        with self._lock:
            self.status.requests_running, self.status.requests_waiting = m.running, m.waiting
            self.status.generation_tokens_per_s = round(rate, 1) if rate is not None else None
        return m

    # -- drain and stop

    def _drain_and_stop(self, final_state: str, message: str) -> None:
        current = self.docker.container(self.name)
        if current is None or not current.running:
            self._set(final_state, message)
            return
        spec = self._spec
        self._set("draining", f"draining: waiting up to {self.cfg.drain_grace_s:.0f} s for running requests to finish")
        # No spec: this agent never ran the engine (it adopted nothing), so it has no endpoint to watch.
        deadline = time.monotonic() + (self.cfg.drain_grace_s if spec else 0)
        while time.monotonic() < deadline:
            m = self._read_metrics(spec)
            # Unreadable metrics prove nothing: keep waiting (up to the grace period).
            if m is not None and m.running == 0 and m.waiting == 0:
                break
            time.sleep(0.5)
        # Removed, not just stopped: a stopped container would look like a crash on resume.
        self._stop_container(remove=True)
        with self._lock:
            self.status.healthy_since, self.status.container_id = None, None
            self.status.requests_running = self.status.requests_waiting = None
        self._set(final_state, message)

    def _stop_container(self, remove: bool) -> None:
        # SIGTERM first: vLLM finishes its shutdown; Docker kills only after the timeout.
        self.docker.stop(self.name, self.cfg.stop_timeout_s)
        if remove:
            self.docker.remove(self.name)

    def _set(self, state: str, message: str) -> None:
        with self._lock:
            changed = state != self.status.state
            self.status.state, self.status.message = state, message
        if changed:  # messages tick (progress, seconds); the log gets state changes only
            log.info("engine %s: %s", state, message)
