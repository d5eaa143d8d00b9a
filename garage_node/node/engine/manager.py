"""EngineManager: reconciles Docker towards the `EngineSpec` the node should run, in its own
thread (pulls and health waits are slow, and the agent's loop must stay responsive): create,
start, health, restart with backoff, adopt a running container whose spec hash matches,
replace one whose spec changed, and drain before stopping.

Its edges are narrow and handed in: the Docker client (`docker.Docker`), the engine's HTTP
endpoints (`EngineProbe`) and the clock, so unit tests drive every decision in-process.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Protocol

import httpx

from garage_node.core.backoff import Backoff
from garage_node.core.clock import SYSTEM, Clock
from garage_node.core.wire import EngineState, EngineStatus
from garage_node.node.config import EngineSection
from garage_node.node.engine.docker import Container, Docker, DockerError, ImageConfig
from garage_node.node.engine.metrics import Metrics, parse_metrics
from garage_node.node.engine.startup import StartupWatch
from garage_node.node.engine.spec import LABEL_HASH, EngineConfigError, EngineSpec, check_image, secret_env

log = logging.getLogger(__name__)

S = EngineState
Desired = Callable[[], "tuple[EngineSpec, str] | None"]


class DockerApi(Protocol):
    """The calls EngineManager makes (docker.Docker implements them on the real daemon)."""

    def ping(self) -> None: ...
    def image_exists(self, ref: str) -> bool: ...
    def image_config(self, ref: str) -> ImageConfig: ...
    def pull(self, ref: str, progress: Callable[[str], None]) -> None: ...
    def container(self, name: str) -> Container | None: ...
    def create(self, name: str, body: dict[str, Any]) -> str: ...
    def start(self, name: str) -> None: ...
    def stop(self, name: str, timeout_s: int) -> None: ...
    def remove(self, name: str) -> None: ...
    def logs(self, name: str, tail: int = 20, since: int = 0) -> list[str]: ...
    def close(self) -> None: ...


class EngineProbe:
    """The engine's own HTTP endpoints: ready (`/health` and the model listed) and `/metrics`."""

    def __init__(self) -> None:
        self._http = httpx.Client(timeout=5.0)

    def ready(self, spec: EngineSpec) -> bool:
        try:
            if self._http.get(f"{spec.endpoint}/health").status_code != 200:
                return False
            # vLLM guards /v1 with the engine's key (/health is open).
            auth = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
            models = self._http.get(f"{spec.endpoint}/v1/models", headers=auth).json()
            return any(m.get("id") == spec.model for m in models.get("data", []))
        except (httpx.HTTPError, ValueError):
            return False

    def metrics(self, spec: EngineSpec) -> Metrics | None:
        try:
            return parse_metrics(self._http.get(f"{spec.endpoint}/metrics").text)
        except (httpx.HTTPError, ValueError):
            return None

    def close(self) -> None:
        self._http.close()


@dataclass(frozen=True)
class Load:
    """What the engine's /metrics say, named as EngineStatus's fields, which it replaces as a
    whole (all None: not measured, or no engine runs). A new metric is parsed in metrics.py,
    named here, and declared in EngineStatus (and EngineReport, for the head to see it)."""

    requests_running: int | None = None
    requests_waiting: int | None = None
    kv_cache_usage_pct: float | None = None
    generation_tokens_per_s: float | None = None

    @classmethod
    def of(cls, m: Metrics, tokens_per_s: float | None) -> Load:
        return cls(requests_running=m.running, requests_waiting=m.waiting, kv_cache_usage_pct=m.kv_cache_usage_pct,
                   generation_tokens_per_s=round(tokens_per_s, 1) if tokens_per_s is not None else None)


class EngineManager:
    def __init__(self, cfg: EngineSection, drain_flag: Path, desired: Desired, *, interval_s: float = 2.0,
                 docker: DockerApi | None = None, probe: EngineProbe | None = None, clock: Clock = SYSTEM) -> None:
        """`desired` returns the spec to run (None while the node is not ready for an engine)."""
        self.cfg = cfg
        self.drain_flag = drain_flag
        self.desired = desired
        self.interval_s = interval_s
        self.docker: DockerApi = docker or Docker(cfg.docker_socket)
        self.probe = probe or EngineProbe()
        self.clock = clock
        self.name = cfg.container_name
        # Replaced, never changed in place (under _lock): snapshot() hands it out as it is.
        self.status = EngineStatus(state=S.DISABLED if not cfg.enabled else S.STARTING, restarts=0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._backoff = Backoff(2.0, 120.0)
        self._next_start = 0.0
        self._crashes: list[float] = []
        self._started_at: float | None = None
        self._startup: StartupWatch | None = None  # what a starting engine waits for
        self._last_tokens: tuple[float, float] | None = None  # (monotonic time, counter)
        self._spec: EngineSpec | None = None  # the last spec reconciled towards
        self._stand_down = threading.Event()
        self._pause = threading.Event()  # never set: the drain's pause, which a test clock skips
        self._hold: str | None = None  # the owner's serving hours or heat: why the engine is off

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
        self.drain_flag.write_text(f"{self.clock.time()}\n")
        self._wake.set()

    def resume(self) -> None:
        self.drain_flag.unlink(missing_ok=True)
        self._wake.set()

    def hold(self, reason: str | None) -> None:
        """Drain and keep the engine off for `reason` (outside serving hours, a hot GPU); None
        serves again. Not persisted: the agent decides it afresh on every pass. The owner's
        drain (the flag) wins over it, so a hold ending never resumes what the owner drained."""
        if reason != self._hold:
            self._hold = reason
            self._wake.set()

    def wake(self) -> None:
        """Reconcile now (the plan changed: a switch the head asked for)."""
        self._wake.set()

    @property
    def spec(self) -> EngineSpec | None:
        """The spec last reconciled towards (None: none yet)."""
        return self._spec

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
                self._drain_and_stop(S.STOPPED, "stopped with the agent")
            except DockerError as e:
                log.warning("could not stop the engine: %s", e)
        self.probe.close()
        self.docker.close()

    def snapshot(self) -> EngineStatus:
        with self._lock:
            status = self.status
        return replace(status, draining=self.draining, paused=self._hold)

    def _update(self, **changes: Any) -> None:
        with self._lock:
            self.status = replace(self.status, **changes)

    # -- loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.reconcile_safely()
            # A healthy engine is looked at less often: every probe (/health, /v1/models,
            # /metrics) runs on vLLM's own event loop and costs it a little throughput.
            self._wake.wait(self.interval_s * (3 if self.status.state is S.HEALTHY else 1))
            self._wake.clear()

    def reconcile_safely(self) -> None:
        """One pass that never raises: a failure becomes the engine's state."""
        try:
            self.reconcile_once()
        except DockerError as e:
            self._set(S.ERROR, str(e))
        except Exception as e:  # never take the agent down
            log.exception("engine reconcile failed")
            self._set(S.ERROR, f"internal error: {e}")

    def reconcile_once(self) -> None:
        if self.draining:
            if self.status.state is not S.DRAINED:
                self._drain_and_stop(S.DRAINED, "drained: no new work; run `garage-node resume` to serve again")
            return
        hold = self._hold
        if hold is not None:
            if (self.status.state, self.status.message) != (S.DRAINED, f"paused: {hold}"):
                try:
                    self._drain_and_stop(S.DRAINED, f"paused: {hold}")
                except DockerError as e:
                    if not e.unavailable:
                        raise
                    # Docker is down, so no engine runs to drain: the pause is the news. The
                    # message differs from the settled one, so the next pass looks again.
                    self._set(S.DRAINED, f"paused: {hold} (Docker is not answering; checked again each pass)")
            return
        try:
            wanted = self.desired()
        except EngineConfigError as e:
            self._set(S.REFUSED, str(e))
            return
        if wanted is None:
            if self._stand_down.is_set():
                self._drain_and_stop(S.STOPPED, "stopped: this node is no longer part of the region")
            else:
                self._set(S.STARTING, "waiting for the node to join before starting the engine")
            return
        self._stand_down.clear()
        spec, why = wanted
        previous, self._spec = self._spec, spec
        self.docker.ping()
        current = self.docker.container(self.name)
        if current is not None and current.labels.get(LABEL_HASH) != spec.spec_hash:
            log.info("engine spec changed (%s -> %s): replacing the container", current.labels.get(LABEL_HASH), spec.spec_hash)
            # Running requests finish first (another model assigned by the head, a new key):
            # the old engine's endpoint is the one to watch.
            if current.running:
                self._drain_and_stop(S.STARTING, f"replaced: starting {spec.model}", watch=previous)
            else:
                self._stop_container(remove=True)
            current = None
        self._update(image=spec.image, model=spec.model, endpoint=spec.endpoint, plan=why)
        if current is None:
            try:
                self._create_and_start(spec)
            except EngineConfigError as e:  # the CUDA gate: this image cannot run on this driver
                self._set(S.REFUSED, str(e))
        elif not current.running:
            self._crashed(current.exit_code)
        else:
            if self.status.container_id != current.id:
                log.info("adopted running engine container %s", current.id[:12])
                self._started_at = self._started_at or self.clock.monotonic()
            self._update(container_id=current.id)
            self._check_health(spec)

    def _create_and_start(self, spec: EngineSpec) -> None:
        if self.clock.monotonic() < self._next_start:
            return
        if not self.docker.image_exists(spec.image):
            self._pull(spec.image)
        image = self.docker.image_config(spec.image)
        note = check_image(spec, image.env, image.labels)  # raises EngineConfigError: refused
        if note:
            log.info("engine image %s: %s", spec.image, note)
        Path(spec.cache_dir).mkdir(parents=True, exist_ok=True)
        cid = self.docker.create(self.name, spec.container_body(secret_env(self.cfg, spec.api_key), image.env))
        self.docker.start(self.name)
        self._started_at = self.clock.monotonic()
        self._update(container_id=cid, healthy_since=None)
        self._set(S.STARTING, f"engine container started; loading {spec.model}")

    def _pull(self, image: str) -> None:
        self._set(S.PULLING, f"pulling {image}")
        last = [0.0]

        def progress(line: str) -> None:
            if self.clock.monotonic() - last[0] > 1:  # status, not a firehose
                last[0] = self.clock.monotonic()
                self._set(S.PULLING, f"pulling {image}: {line}")
        try:
            self.docker.pull(image, progress)
        except DockerError as e:
            if e.unavailable:
                raise
            raise DockerError(f"image {image} is not on this node and could not be pulled ({e}). "
                              "Check engine.image, or load the image with `docker load`.") from None

    def _crashed(self, exit_code: int | None) -> None:
        now = self.clock.monotonic()
        if self._next_start <= now and self.status.state not in (S.RESTARTING, S.DEGRADED):
            # First sight of this exit: count it and schedule the restart.
            self._crashes = [t for t in self._crashes if now - t < self.cfg.crash_window_s] + [now]
            delay = self._backoff.next_delay()
            self._next_start = now + delay
            lines = self.docker.logs(self.name, tail=15)
            with self._lock:
                self.status = replace(self.status, restarts=(self.status.restarts or 0) + 1, last_log_lines=lines,
                                      healthy_since=None)
            if len(self._crashes) >= self.cfg.crash_loop_restarts:
                self._set(S.DEGRADED, f"engine keeps crashing (exit code {exit_code}, {len(self._crashes)} times in "
                                      f"{self.cfg.crash_window_s / 60:.0f} min); retrying in {delay:.0f} s. Its last log lines are in status.")
            else:
                self._set(S.RESTARTING, f"engine exited (code {exit_code}); restarting in {delay:.0f} s")
            return
        if now >= self._next_start:
            self.docker.start(self.name)
            self._started_at = now
            self._set(S.STARTING, "engine restarted after a crash")

    def _check_health(self, spec: EngineSpec) -> None:
        if self.probe.ready(spec):
            if self.status.state is not S.HEALTHY:
                self._update(healthy_since=self.clock.time())
                self._backoff.reset()
            self._set(S.HEALTHY, f"serving {spec.model} at {spec.endpoint}")
            self._read_metrics(spec)
            return
        self._update(healthy_since=None)
        age = self.clock.monotonic() - (self._started_at or self.clock.monotonic())
        if age > self.cfg.startup_timeout_s:
            self._set(S.DEGRADED, f"engine running for {age:.0f} s but not answering /health; restarting it")
            self._stop_container(remove=False)
        else:
            self._set(S.STARTING, self._startup_message(spec, age))

    def _startup_message(self, spec: EngineSpec, age: float) -> str:
        """What the starting engine waits for, from its log since this start (startup.py)."""
        started = self._started_at or self.clock.monotonic()
        if self._startup is None or self._startup.started_at != started:
            self._startup = StartupWatch(started)
        try:
            # From this start on (a restarted container's log holds its earlier runs too); whole
            # seconds, rounded down, as Docker's `since` takes them.
            lines = self.docker.logs(self.name, tail=60, since=int(self.clock.time() - age))
        except DockerError:
            lines = []
        return self._startup.message(spec.model, lines, self.clock.monotonic(), secret=spec.api_key)

    def _read_metrics(self, spec: EngineSpec) -> Metrics | None:
        m = self.probe.metrics(spec)
        if m is None:
            # Unknown, not the last figures: the gateway reads an engine with nothing running
            # as idle ("alive but silent" ends its streams), so stale zeros could end a live one.
            self._update(**asdict(Load()))
            return None
        now = self.clock.monotonic()
        rate = None
        if self._last_tokens is not None and now > self._last_tokens[0]:
            rate = max(0.0, (m.generation_tokens_total - self._last_tokens[1]) / (now - self._last_tokens[0]))
        self._last_tokens = (now, m.generation_tokens_total)
        self._update(**asdict(Load.of(m, rate)))
        return m

    # -- drain and stop

    def _drain_and_stop(self, final_state: EngineState, message: str, watch: EngineSpec | None = None) -> None:
        """Wait (up to drain_grace_s) for the running requests of the engine at `watch` (default:
        the last spec reconciled towards) to finish, then stop and remove its container."""
        current = self.docker.container(self.name)
        if current is None or not current.running:
            self._set(final_state, message)
            return
        spec = watch or self._spec
        self._set(S.DRAINING, f"draining: waiting up to {self.cfg.drain_grace_s:.0f} s for running requests to finish")
        # No spec: this agent never ran the engine (it adopted nothing), so it has no endpoint to watch.
        deadline = self.clock.monotonic() + (self.cfg.drain_grace_s if spec else 0)
        while spec is not None and self.clock.monotonic() < deadline:
            m = self._read_metrics(spec)
            # Unreadable metrics prove nothing: keep waiting (up to the grace period).
            if m is not None and m.running == 0 and m.waiting == 0:
                break
            self.clock.wait(self._pause, 0.5)
        # Removed, not just stopped: a stopped container would look like a crash on resume.
        self._stop_container(remove=True)
        self._update(healthy_since=None, container_id=None, **asdict(Load()))
        self._set(final_state, message)

    def _stop_container(self, remove: bool) -> None:
        # SIGTERM first: vLLM finishes its shutdown; Docker kills only after the timeout.
        self.docker.stop(self.name, self.cfg.stop_timeout_s)
        if remove:
            self.docker.remove(self.name)

    def _set(self, state: EngineState, message: str) -> None:
        with self._lock:
            changed = state is not self.status.state
            self.status = replace(self.status, state=state, message=message)
        if changed:  # messages tick (progress, seconds); the log gets state changes only
            log.info("engine %s: %s", state.value, message)
