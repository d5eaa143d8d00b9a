"""The assignment part of the agent: carries out what the head wants this PC to serve (issue #18).

The head answers each heartbeat with an `Assignment` (core/wire.py): a model (or none), its
precision, context, GPUs and parallelism, where its store holds the weights, and a generation
that grows with every change. This part turns the newest one into the engine's spec and
switches to it in the order that fails no request:

  1. fetch    the weights from the head's store (node/weights.py), checked against the manifest;
              the old engine keeps serving meanwhile (`switching_to` and `fetch_pct` in status)
  2. announce the engine is reported as draining and the head is told at once (a heartbeat
              out of turn): the gateway, which routes by the report, sends no new request
  3. switch   the engine's plan becomes the new spec: the manager drains the running requests,
              stops the old engine, starts the new one
  4. done     the new engine is healthy: `switching_to` clears and the generation counts as
              carried out; the next report brings the gateway back

A new engine that never becomes healthy (refused by the engine manager, crashing until it is
"degraded", or not healthy within [engine] drain_grace_s + startup_timeout_s of the switch's
start) makes the generation refused, with the engine's last message as why: the PC goes back to
what the head assigned before (or its own plan), and the head, told by the report, reassigns.

Without an assignment (an older head, or placement off) the PC plans for itself, as before.
An unreachable head changes nothing: the last assignment stays in effect. An assignment this PC
cannot carry out (it does not fit, the owner pinned another model, the weights fail the check)
is refused: a problem in status says why, the report says so to the head, and the PC goes on
serving what it serves.

The part never touches Docker or the head itself: each pass it reads the head's last answer
and the engine's state and says what the engine should run (`Directive`); the agent hands that
to the plan, and tells it when a heartbeat carried the announcement (`told`).
"""

from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Callable, Protocol

from garage_node.core.clock import Clock
from garage_node.core.fsutil import read_json, write_json
from garage_node.core.wire import (MESSAGE_MAX, Assignment, EngineState, EngineStatus, PlacementFacts, WireError, clip,
                                   decode, encode)
from garage_node.node.config import EngineSection
from garage_node.node.engine.spec import EngineConfigError, EngineSpec, assigned_spec, resolve_pin
from garage_node.node.gpu import Inventory
from garage_node.node.health import Health, Source
from garage_node.node.identity import Identity
from garage_node.node.weights import Source as WeightSource
from garage_node.node.weights import Weights, WeightsError

log = logging.getLogger(__name__)

Wanted = tuple[EngineSpec, str]
MIB = 1024 * 1024
RETRY_FETCH_S = 15.0  # a fetch that failed for want of the head is tried again after this


class WeightStore(Protocol):
    """The weights this PC keeps (node/weights.py): what it holds, checked; fetching one."""

    def held(self) -> list[str]: ...
    def local_dir(self, model: str) -> Path | None: ...
    def fetch(self, model: str, path: str, progress: Callable[[float], None],
              stop: threading.Event | None = None) -> Path: ...
    @property
    def root(self) -> Path: ...


class WeightsRefused(Exception):
    """The weights failed their check (the store's own error is turned into this by the
    adapter): the assignment cannot be carried out with them."""


class HeadWeights:
    """The store of node/weights.py as this part uses it: fetched over `source()` (the head's
    control API, made when first needed), the model in use never evicted for another."""

    def __init__(self, store: Weights, source: Callable[[], WeightSource]) -> None:
        self.store = store
        self.source = source
        self.in_use: str | None = None
        self._source: WeightSource | None = None

    @property
    def root(self) -> Path:
        return self.store.root

    def held(self) -> list[str]:
        return self.store.held()

    def local_dir(self, model: str) -> Path | None:
        return self.store.local_dir(model)

    def fetch(self, model: str, path: str, progress: Callable[[float], None],
              stop: threading.Event | None = None) -> Path:
        if self._source is None:
            self._source = self.source()
        keep = {self.in_use} if self.in_use else set()
        try:
            # `stop`: a download no longer wanted ends soon and lets the store's lock go, so the
            # next one does not wait for all of it (what arrived is resumed on a later try).
            return self.store.fetch(model, path, self._source, lambda pct: progress(float(pct)), keep=keep,
                                    stop=stop)
        except WeightsError as e:
            if e.retry:
                raise
            raise WeightsRefused(str(e)) from None


class Phase(StrEnum):
    FETCHING = "fetching"  # the weights are downloading; the old engine serves
    ANNOUNCING = "announcing"  # reported as draining; waiting for the head to have heard it
    SWITCHING = "switching"  # the engine drains, stops, starts the new one


@dataclass(frozen=True)
class Directive:
    """What the engine should run this pass. own_plan: the PC plans for itself (no assignment,
    or one not yet taken over); else `engine` (None: nothing) and `idle`, why nothing runs."""

    own_plan: bool = True
    engine: Wanted | None = None
    engine_error: EngineConfigError | None = None
    idle: str | None = None
    reason: str = ""  # the head's reason, for `garage-node plan` and status


OWN_PLAN = Directive()


@dataclass
class _Fetch:
    """A download under way, in a thread of its own (a model is gigabytes)."""

    model: str
    pct: float = 0.0
    done: Path | None = None
    error: str | None = None
    refused: bool = False  # the weights failed their check (not a transport failure)
    finished: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)  # set: no longer wanted


class AssignPart:
    def __init__(self, cfg: EngineSection, clock: Clock, health: Health, weights: WeightStore | None,
                 kept: Path | None = None) -> None:
        self.cfg = cfg
        self.clock = clock
        self.health = health
        self.weights = weights
        # Where the carried assignment is kept (the state directory): an agent restarted with
        # the head down, mid-switch even, goes on running what it ran (node/session.py keeps
        # the head's last word beside it). None: not kept (a test's part).
        self.kept = kept
        self.carried: Assignment | None = None  # the assignment the engine runs
        self.carried_dir: str = ""  # its weights' local directory ("": none from the store)
        self._load_carried()
        self.target: Assignment | None = None  # newer, being switched to
        self.target_dir: str = ""
        self.phase: Phase | None = None
        self.refused: tuple[int, str] | None = None  # (generation, why): reported to the head
        self._fetch: _Fetch | None = None
        self._retry_at = 0.0
        self._fetch_failed: str | None = None  # why the last download failed (waiting for its retry)
        self._reported = False  # a report built since the announcement began carried it
        self._told = False  # and a heartbeat took it to the head
        self.wants_beat = False  # the agent sends a heartbeat now (the announcement)
        self._ignored: int | None = None  # an older generation, logged once
        self._switch_since: float | None = None  # when the engine was told to switch (monotonic)
        # The engine's (state, message) then: the old engine's, never taken for the new one's.
        self._switch_from: tuple[EngineState, str | None] | None = None

    # ------------------------------------------------------------ the pass

    def step(self, assignment: Assignment | None, inventory: Inventory, ident: Identity | None,
             engine: EngineStatus, engine_spec: EngineSpec | None) -> Directive:
        """Take the head's newest assignment a step further; what the engine runs now."""
        self.wants_beat = False
        if assignment is None or ident is None:
            if self.carried is not None or self.target is not None:
                log.info("no assignment from the head: this PC plans for itself again")
            self._reset()
            return OWN_PLAN
        newest = max(self._generation(), self.refused[0] if self.refused else 0)
        if assignment.generation > newest:
            self._accept(assignment, inventory, ident)
        elif assignment.generation < self._generation() and self._ignored != assignment.generation:
            self._ignored = assignment.generation
            log.warning("ignoring the head's assignment generation %d: generation %d is newer",
                        assignment.generation, self._generation())
        self._advance(inventory, ident, engine, engine_spec)
        return self._directive(inventory, ident)

    def reported(self) -> None:
        """A heartbeat's report was just built (agent._report): it carries the announcement."""
        if self.phase is Phase.ANNOUNCING:
            self._reported = True

    def told(self, ok: bool) -> None:
        """The heartbeat with that report reached the head (ok) or not."""
        if ok and self._reported and self.phase is Phase.ANNOUNCING:
            self._told = True

    # ------------------------------------------------------------ what others read

    # The readers below run on the local API's thread (status) while step() runs on the
    # agent's: each reads an attribute once into a local, as step() may set it to None between
    # two reads (the values themselves are immutable or only ever replaced whole).

    @property
    def switching_to(self) -> str | None:
        target = self.target
        if target is None:
            return None
        return target.model or "(nothing)"

    @property
    def draining(self) -> bool:
        """The engine is reported as draining: the gateway sends it nothing new."""
        return self.phase in (Phase.ANNOUNCING, Phase.SWITCHING)

    @property
    def fetch_pct(self) -> float | None:
        job = self._fetch
        return round(job.pct, 1) if job is not None and self.phase is Phase.FETCHING else None

    def facts(self, paused: bool) -> PlacementFacts:
        """What the head's placement learns of this PC (NodeReport.placement)."""
        held: list[str] = []
        free: int | None = None
        if self.weights is not None:
            try:
                held = self.weights.held()[:64]
                free = shutil.disk_usage(_existing(self.weights.root)).free // MIB
            except OSError as e:
                log.warning("cannot read the weights store: %s", e)
        target, carried, refused = self.target, self.carried, self.refused
        return PlacementFacts(
            device=self.cfg.device, pinned_model=self.cfg.model or None,
            pinned_quantization=self.cfg.quantization or None, paused=paused, weights_held=held,
            free_disk_mib=free, assignment_generation=carried.generation if carried else 0,
            switching_to=target.model if target is not None else None, fetch_pct=self.fetch_pct,
            refused_generation=refused[0] if refused else 0,
            refused_why=clip(refused[1], MESSAGE_MAX) if refused else None)

    def words(self) -> str | None:
        """One line for status: what the head assigned and where the switch stands."""
        target, carried, phase, job, failed = self.target, self.carried, self.phase, self._fetch, self._fetch_failed
        if target is not None:
            what = target.model or "serving nothing"
            if phase is Phase.FETCHING:
                if job is not None:
                    return f"switching to {what} (downloading {job.pct:.0f} %)"
                # A failed download waits for its retry: the old engine serves undisturbed.
                wait = max(0.0, self._retry_at - self.clock.monotonic())
                return (f"switching to {what} once its weights arrive: the download failed "
                        f"({clip(failed or 'no reason given', 200)}); tried again in {wait:.0f} s; "
                        "the old engine serves meanwhile")
            if phase is Phase.ANNOUNCING:
                return f"switching to {what} (telling the head; the gateway stops sending new requests)"
            return f"switching to {what} (draining the old engine, starting the new one)"
        if carried is not None:
            if carried.model is None:
                return "serving nothing, as the head assigned"
            return f"serving {carried.model}, assigned by the head"
        return None

    # ------------------------------------------------------------ steps

    def _generation(self) -> int:
        if self.target is not None:
            return self.target.generation
        return self.carried.generation if self.carried is not None else 0

    def _accept(self, a: Assignment, inventory: Inventory, ident: Identity) -> None:
        """A newer assignment: check that this PC can carry it out, then begin the switch."""
        try:
            why_not = self._unfit(a, inventory, ident)
        except EngineConfigError as e:
            why_not = str(e)
        if why_not is not None:
            self._refuse(a, why_not)
            return
        log.info("the head assigns generation %d: %s (%s)", a.generation, a.model or "nothing", a.reason)
        self.refused = None
        self.health.clear(Source.PLACEMENT)
        settled = self.phase is None  # no switch under way: the engine runs the carried one
        self.target, self.target_dir = a, ""
        self._drop_fetch()
        self._reported = self._told = False
        if settled and self._same_as_carried(a):
            self._finish()  # only the generation or the reason changed
            return
        held = self._held_dir(a)
        if a.model is not None and a.weights_path and held is None:
            self.phase = Phase.FETCHING
            self._start_fetch(a)
        else:
            self.target_dir = held or ""
            self.phase = Phase.ANNOUNCING

    def _unfit(self, a: Assignment, inventory: Inventory, ident: Identity) -> str | None:
        if a.model is None:
            return None
        pin = resolve_pin(self.cfg)
        if pin is not None and (pin[0] != a.model or (pin[1] is not None and a.quantization not in (None, pin[1]))):
            return (f"the owner pinned {pin[0]}{' ' + pin[1] if pin[1] else ''} in garage.toml ([engine] model), "
                    f"and this PC serves only that")
        if a.weights_path and self.weights is None:
            return "this agent keeps no weights store, so it cannot fetch the head's copy"
        # The spec is built once to check (the catalog knows the model, the GPUs are there,
        # it fits them); raises EngineConfigError with why not.
        assigned_spec(self.cfg, inventory, ident.overlay_ip, ident.engine_api_key, a, model_dir="")
        return None

    def _refuse(self, a: Assignment, why: str) -> None:
        text = f"refused the head's assignment of {a.model} (generation {a.generation}): {why}"
        if self.refused is None or self.refused[0] != a.generation:
            log.warning("%s; this PC keeps serving what it serves", text)
        self.refused = (a.generation, why)
        self.health.fail(Source.PLACEMENT, text, "the head sees the refusal in this PC's report and places the model "
                                                  "elsewhere; this PC keeps serving what it serves")

    def _held_dir(self, a: Assignment) -> str | None:
        if self.weights is None or a.model is None or not a.weights_path:
            return None
        found = self.weights.local_dir(a.model)
        return str(found) if found is not None else None

    def _same_as_carried(self, a: Assignment) -> bool:
        c = self.carried
        return c is not None and replace(c, generation=a.generation, reason=a.reason) == a

    def _drop_fetch(self) -> None:
        """The download under way, if any, is no longer wanted: stopped (its thread ends soon
        and lets go of the store, which the next download needs), its outcome ignored."""
        job, self._fetch, self._fetch_failed = self._fetch, None, None
        if job is not None:
            job.stop.set()

    def _start_fetch(self, a: Assignment) -> None:
        assert a.model is not None and a.weights_path is not None and self.weights is not None
        job = _Fetch(a.model)
        self._fetch = job
        store, path = self.weights, a.weights_path

        def run() -> None:
            try:
                job.done = store.fetch(job.model, path, lambda pct: setattr(job, "pct", pct), stop=job.stop)
            except WeightsRefused as e:
                job.error, job.refused = str(e), True
            except Exception as e:  # transport, disk: tried again while the old engine serves
                job.error = str(e) or type(e).__name__
            finally:
                job.finished.set()
        threading.Thread(target=run, name=f"fetch {a.model}", daemon=True).start()

    def _advance(self, inventory: Inventory, ident: Identity, engine: EngineStatus,
                 engine_spec: EngineSpec | None) -> None:
        target = self.target
        if target is None:
            return
        if self.phase is Phase.FETCHING:
            self._fetching(target)
        if self.phase is Phase.ANNOUNCING:
            # Nothing to tell the head when no engine takes requests, or when the one running
            # is already the assigned one (an agent restarted under its engine).
            if not self._engine_serves(engine) or self._told or self._switched(target, inventory, ident, engine,
                                                                                   engine_spec):
                self.phase = Phase.SWITCHING
                self._switch_since = self.clock.monotonic()
                self._switch_from = (engine.state, engine.message)
            else:
                self.wants_beat = True
        if self.phase is Phase.SWITCHING:
            if self._switched(target, inventory, ident, engine, engine_spec):
                self._finish()
                return
            why = self._failed(target, inventory, ident, engine, engine_spec)
            if why is not None:
                self._give_up(target, why)

    def _fetching(self, target: Assignment) -> None:
        job = self._fetch
        if job is None:  # a failed fetch waits for its retry
            if self.clock.monotonic() >= self._retry_at:
                self._start_fetch(target)
            return
        if not job.finished.is_set():
            return
        self._fetch = None
        self._fetch_failed = job.error
        if job.done is not None:
            self.target_dir = str(job.done)
            self.phase = Phase.ANNOUNCING
            self.health.clear(Source.PLACEMENT)
        elif job.refused:
            self._refuse(target, f"its weights failed the check: {job.error}")
            self.target, self.phase = None, None
        else:
            self._retry_at = self.clock.monotonic() + RETRY_FETCH_S
            self.health.fail(Source.PLACEMENT, f"fetching the weights of {target.model} from the head failed: {job.error}",
                             "this PC keeps serving what it serves and tries again", retry_in=RETRY_FETCH_S)

    @staticmethod
    def _engine_serves(engine: EngineStatus) -> bool:
        """Whether an engine is taking requests now (then the head must hear first)."""
        return engine.state is EngineState.HEALTHY

    def _switched(self, target: Assignment, inventory: Inventory, ident: Identity, engine: EngineStatus,
                  engine_spec: EngineSpec | None) -> bool:
        if target.model is None:
            return engine.state in (EngineState.DRAINED, EngineState.STOPPED, EngineState.DISABLED)
        return engine.state is EngineState.HEALTHY and self._runs_target(target, inventory, ident, engine_spec)

    def _runs_target(self, target: Assignment, inventory: Inventory, ident: Identity,
                     engine_spec: EngineSpec | None) -> bool:
        """Whether the engine manager works on the target's spec (its state is about it)."""
        try:
            wanted, _ = assigned_spec(self.cfg, inventory, ident.overlay_ip, ident.engine_api_key, target,
                                      model_dir=self.target_dir)
        except EngineConfigError:
            return False
        return engine_spec is not None and engine_spec.spec_hash == wanted.spec_hash

    def _failed(self, target: Assignment, inventory: Inventory, ident: Identity, engine: EngineStatus,
                engine_spec: EngineSpec | None) -> str | None:
        """Why the switch to `target` will not come to a healthy engine; None: it may yet."""
        if target.model is None:
            return None  # stopping an engine cannot fail that way
        message = engine.message or engine.state.value
        if engine.state in (EngineState.REFUSED, EngineState.DEGRADED) and \
                (engine.state, engine.message) != self._switch_from and \
                self._runs_target(target, inventory, ident, engine_spec):
            # The manager refused the new spec (the CUDA gate), or gave up waiting for its
            # health or on its crashes: it only retries from here, with backoff. (The manager
            # takes the new spec before it acts on it, so a verdict on the old engine, still
            # shown for a moment, is told apart by being the one shown when the switch began.)
            return f"its engine did not become healthy ({engine.state.value}): {message}"
        since = self._switch_since
        limit = self.cfg.drain_grace_s + self.cfg.startup_timeout_s
        if since is not None and self.clock.monotonic() - since > limit:
            return (f"its engine was not healthy {limit:.0f} s after the switch began ([engine] drain_grace_s + "
                    f"startup_timeout_s): {message}")
        return None

    def _give_up(self, target: Assignment, why: str) -> None:
        """Refuse the generation and go back to what ran before: the previous assignment's
        engine (or, with none, the PC's own plan); the head reads the refusal and reassigns."""
        self._refuse(target, why)
        back = (self.carried.model or "nothing") if self.carried is not None else "this PC's own plan"
        log.warning("switch to %s abandoned; going back to %s", target.model, back)
        self.target, self.target_dir, self.phase = None, "", None
        self._drop_fetch()
        self._switch_since = None
        self._reported = self._told = False

    def _finish(self) -> None:
        assert self.target is not None
        if self.carried is None or self.carried.model != self.target.model:
            log.info("now serving %s, as the head assigned (generation %d)", self.target.model or "nothing",
                     self.target.generation)
        self.carried, self.carried_dir = self.target, self.target_dir
        self._keep_carried()
        if isinstance(self.weights, HeadWeights):
            self.weights.in_use = self.carried.model  # never evicted to make room for another
        self.target, self.target_dir, self.phase = None, "", None
        self._switch_since = None
        self._reported = self._told = False

    def _directive(self, inventory: Inventory, ident: Identity) -> Directive:
        if self.phase is Phase.SWITCHING:
            running, folder = self.target, self.target_dir
        elif self.carried is not None:
            running, folder = self.carried, self.carried_dir
        else:
            return OWN_PLAN  # the first assignment is not taken over yet: the PC's own plan runs
        assert running is not None
        if running.model is None:
            return Directive(own_plan=False, idle="the head assigns this PC no model now", reason=running.reason)
        try:
            wanted = assigned_spec(self.cfg, inventory, ident.overlay_ip, ident.engine_api_key, running,
                                   model_dir=folder)
        except EngineConfigError as e:
            return Directive(own_plan=False, engine_error=e, reason=running.reason)
        return Directive(own_plan=False, engine=wanted, reason=running.reason)

    def _load_carried(self) -> None:
        if self.kept is None:
            return
        try:
            data = read_json(self.kept)
            self.carried, self.carried_dir = decode(data["carried"], Assignment), str(data.get("dir") or "")
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, WireError) as e:
            log.warning("ignoring %s (%s): the head's assignment is taken over anew", self.kept, e)
            return
        if isinstance(self.weights, HeadWeights):
            self.weights.in_use = self.carried.model

    def _keep_carried(self) -> None:
        if self.kept is None:
            return
        try:
            if self.carried is None:
                self.kept.unlink(missing_ok=True)
            else:
                write_json(self.kept, {"carried": encode(self.carried), "dir": self.carried_dir})  # atomic
        except OSError as e:
            log.warning("cannot keep the assignment carried out in %s (a restart while the head is down "
                        "would take it over anew): %s", self.kept, e)

    def _reset(self) -> None:
        if self.carried is not None:
            self.carried = None
            self._keep_carried()
        self.carried = self.target = None
        self.carried_dir = self.target_dir = ""
        self.phase, self.refused = None, None
        self._drop_fetch()
        self._reported = self._told = False
        self.health.clear(Source.PLACEMENT)


def _existing(path: Path) -> Path:
    """The nearest existing directory at or above `path` (the store may not exist yet)."""
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path("/")

