"""The head decides what each PC serves (issue #18): the placement loop.

Every [placement] interval_s the loop reads the region's catalog (`garage-node head model add`,
kept in the registry), each PC's last report (its GPUs, engine and PlacementFacts), the
assignments it handed out before, and the gateway's demand per model; runs the placer
(garage_node/placement/decide.py, the same fit arithmetic the agent runs); and stores the
assignments that changed, with their generations, in the registry before any PC hears of
them, so a head restart answers with the same assignments and never lowers a generation.
Each heartbeat's answer carries the PC's assignment (`assignment`, a dictionary lookup: the
heartbeat path stays as cheap as it was).

With placement off, or a region catalog that is empty, the head assigns nothing and every PC
plans for itself, as before this existed. The last decision (models, replicas, demand, each
PC's reason) is stored too, for `garage-node head model list`, which runs in another process.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from garage_node.core.clock import SYSTEM, Clock
from garage_node.core.settings import parse, read_toml
from garage_node.core.wire import Assignment, NodeReport, WireError, decode, encode
from garage_node.head.config import HeadConfig
from garage_node.head.gateway.demand import ModelDemand
from garage_node.head.modelstore import ModelStore, store_root
from garage_node.head.registry import CatalogEntry, Registry, RegionModel
from garage_node.placement.catalog import Catalog, CatalogError, CatalogFile, ModelSpec, catalog_path, load_catalog
from garage_node.placement.decide import Decision, PcView, Placer, Wanted
from garage_node.placement.decide import Demand as PlacerDemand

log = logging.getLogger(__name__)

IMPORT_HINT = ("add its entry to a TOML file in the format of configs/models.toml and run "
               "`garage-node head model import FILE`")


class ModelError(Exception):
    """A region-catalog command was refused; the message says what to do."""


# ---------------------------------------------------------------- the catalog the head places from


def base_catalog(cfg: HeadConfig) -> Path:
    return catalog_path(cfg.placement.catalog)


def region_catalog(base: Path, entries: Sequence[CatalogEntry]) -> Catalog:
    """The base catalog with the imported entries laid over it (an imported model of the same
    name replaces the base's), checked by the one settings validator as a whole."""
    raw = read_toml(base, CatalogError)
    models = dict(raw.get("models") or {})
    images = dict(raw.get("images") or {})
    for e in entries:
        (models if e.kind == "model" else images)[e.name] = e.body
    return _catalog({**raw, "models": models, "images": images}, base)


def _catalog(raw: dict[str, Any], source: Path) -> Catalog:
    # As placement.catalog.load_catalog, from tables already read (the base file's and the
    # registry's imported ones together).
    data = parse(CatalogFile, raw, source, error=CatalogError)
    images = tuple(replace(img, name=ref) for ref, img in data.images.items())
    return Catalog(source, tuple(_named(name, m) for name, m in data.models.items()), images)


def _named(name: str, m: ModelSpec) -> ModelSpec:
    quants = {q: replace(spec, name=q, model_id=spec.model_id or m.id) for q, spec in m.quantizations.items()}
    return replace(m, name=name, quantizations=quants)


def import_catalog(registry: Registry, base: Path, path: Path) -> list[str]:
    """Check `path` (configs/models.toml's format) with the settings validator, alone and laid
    over the region's catalog, then store its entries; returns the names of the models in it.
    Raises CatalogError (naming file, table and key) and stores nothing if anything is wrong."""
    load_catalog(path)  # the file alone: its errors name it
    raw = read_toml(path, CatalogError)
    entries = [("model", name, body) for name, body in (raw.get("models") or {}).items()]
    entries += [("image", name, body) for name, body in (raw.get("images") or {}).items()]
    now = time.time()
    region_catalog(base, [*registry.region.entries(), *(CatalogEntry(k, n, b, str(path), now) for k, n, b in entries)])
    registry.region.import_entries(entries, str(path.resolve()))
    return [name for kind, name, _ in entries if kind == "model"]


def add_model(registry: Registry, catalog: Catalog, model: str, min_replicas: int = 0,
              max_replicas: int | None = None, weight: float = 1.0) -> RegionModel:
    """Add (or change) a model of the region's catalog. `model`: a catalog name (or its repo id)."""
    if min_replicas < 0:
        raise ModelError("--min must be 0 or more")
    if max_replicas is not None and (max_replicas < 1 or max_replicas < min_replicas):
        raise ModelError(f"--max must be 1 or more and at least --min ({min_replicas})")
    if not weight > 0 or weight != weight or weight == float("inf"):
        raise ModelError("--weight must be a number greater than 0")
    found = catalog.resolve(model)
    if found is None:
        names = ", ".join(m.name for m in catalog.models if not m.test_only)
        raise ModelError(f"'{model}' is not in the model catalog ({catalog.path} and what was imported); "
                         f"it has: {names}. For another model, {IMPORT_HINT}")
    return registry.region.put_model(RegionModel(found[0].name, min_replicas, max_replicas, weight))


def remove_model(registry: Registry, model: str) -> None:
    if not registry.region.remove_model(model):
        wanted = ", ".join(m.model for m in registry.region.models()) or "none"
        raise ModelError(f"'{model}' is not in the region's catalog (it has: {wanted}; see `garage-node head model list`)")


# ---------------------------------------------------------------- the loop


@dataclass(frozen=True)
class PassResult:
    decision: Decision | None  # None: nothing to decide (placement off, or no model wanted)
    changed: dict[str, Assignment]  # node id -> its new assignment, stored before PCs hear of it
    took_s: float


class PlacementLoop:
    def __init__(self, registry: Registry, cfg: HeadConfig,
                 demand: Callable[[], dict[str, ModelDemand]] = dict, clock: Clock = SYSTEM,
                 store: ModelStore | None = None) -> None:
        """`demand()`: the gateway's demand per model (gateway.demand.snapshot); a head without
        a gateway places by the catalog's min and weight alone. `store`: the head's model store
        (default: the one in the state dir); a new assignment of a model it holds says where."""
        self.registry = registry
        self.store = store or ModelStore(store_root(cfg.head.state_dir))
        self.cfg = cfg
        self.demand = demand
        self.clock = clock
        self.base = base_catalog(cfg)
        self._catalog_key: tuple[Any, ...] | None = None
        self._catalog: Catalog | None = None
        self._placer: Placer | None = None
        # What the heartbeats answer: node id -> assignment. Replaced whole by each pass (a
        # heartbeat's read needs no lock), and loaded from the registry at start.
        self._assignments: dict[str, Assignment] = self._stored()
        models = registry.region.models()
        self._active = cfg.placement.enabled and bool(models)
        # The names PCs' engines serve the region's models under (vLLM's --served-model-name:
        # the catalog's repo id, what clients ask the gateway for): catalog name -> served name.
        self._served: dict[str, str] = {}
        self._placed: frozenset[str] = frozenset()
        if cfg.placement.enabled and models:
            try:
                self._served = self._served_names(models, self._current_placer()[0])
            except Exception:  # a catalog that does not load: the first pass says why
                log.exception("the region's catalog could not be read")
            self._placed = frozenset(self._served.values())
        self.last: PassResult | None = None
        self._names: dict[str, str] = {}  # node id -> name, as of the last pass
        self._terms: dict[str, RegionModel] = {m.model: m for m in models}
        self.switches: dict[str, int] = {}  # model -> assignments changed to it since start (metrics)
        # The PCs the audits keep from customers (the gateway's trust store): set by the head.
        self.excluded: Callable[[], frozenset[str]] = frozenset
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="head-placement", daemon=True)

    def _stored(self) -> dict[str, Assignment]:
        out = {}
        generations = self.registry.region.assignment_generations()
        for node_id, body in self.registry.region.assignments().items():
            try:
                out[node_id] = decode(body, Assignment)
            except WireError:
                # Written by another version, say. The PC has seen that generation, so what
                # replaces it must be newer: without this floor the new one started at 1, the
                # registry refused it as older, and every pass of the region failed.
                log.warning("the stored assignment of %s is unreadable; the next pass makes a new one", node_id)
                out[node_id] = Assignment(generation=generations.get(node_id, 0), model=None,
                                          reason="the head's stored assignment was unreadable")
        return out

    # -- what the heartbeats and the gateway ask

    def assignment(self, node_id: str) -> Assignment | None:
        """The PC's assignment for its heartbeat's answer; None (plan for yourself) with
        placement off or nothing in the region's catalog."""
        if not self._active:
            return None
        return self._assignments.get(node_id)

    def fleet_models(self) -> list[dict[str, Any]]:
        """The region's models as the last pass left them, for the fleet page."""
        last = self.last
        if last is None or last.decision is None:
            return []
        out = []
        for v in last.decision.models:
            terms = self._terms.get(v.model)
            out.append({"model": v.model, "wanted": v.wanted, "running": v.running,
                        "pcs": [{"id": n, "name": self._names.get(n, n)} for n in v.pcs],
                        "demand": encode(v.demand), "why": v.why,
                        "min_replicas": terms.min_replicas if terms else None,
                        "max_replicas": terms.max_replicas if terms else None,
                        "weight": terms.weight if terms else None})
        return out

    def placed(self) -> frozenset[str]:
        """The region's models by the names clients ask for them (their engines' served
        names, the catalog's repo ids): the gateway holds requests for these."""
        return self._placed

    @staticmethod
    def _served_names(models: Sequence[RegionModel], catalog: Catalog) -> dict[str, str]:
        out = {}
        for m in models:
            found = catalog.resolve(m.model)
            if found is not None:
                out[m.model] = found[0].id
        return out

    # -- lifecycle

    def start(self) -> None:
        if self.cfg.placement.enabled:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # the next pass retries; PCs keep their last assignment meanwhile
                log.exception("placement pass failed")
            self._stop.wait(self.cfg.placement.interval_s)

    # -- one pass

    def step(self) -> PassResult:
        started = time.perf_counter()
        models = self.registry.region.models() if self.cfg.placement.enabled else []
        self._terms = {m.model: m for m in models}
        if not models:
            self._active = False
            self._served, self._placed = {}, frozenset()
            result = PassResult(None, {}, time.perf_counter() - started)
            self.last = result
            self._store_state(result, [])
            return result
        catalog, placer = self._current_placer()
        self._served = self._served_names(models, catalog)
        self._placed = frozenset(self._served.values())
        wanted = [Wanted(m.model, m.min_replicas, m.max_replicas, m.weight) for m in models
                  if catalog.resolve(m.model) is not None]
        previous = self._assignments
        decision = placer.decide(self._pcs(previous), wanted, self._demand(wanted))
        changed = {}
        held = set(self.store.names())  # one directory listing per pass
        for node_id, a in decision.assignments.items():
            before = previous.get(node_id)
            if before == a:
                continue
            if a.model is not None and a.model in held and a.weights_path is None:
                # Fetched from the head's store (its control API), not from the internet. Set on a
                # new assignment only: the placer compares assignments without it, so a model
                # stored later changes nothing for a PC already given it.
                a = replace(a, weights_path=self.store.weights_path(a.model))
            if before is not None and a.generation <= before.generation:
                a = replace(a, generation=before.generation + 1)  # never tell a PC an older plan
            changed[node_id] = a
        self.registry.region.store_assignments({n: encode(a) for n, a in changed.items()})
        self._assignments = {**previous, **changed}
        self._active = True
        for a in changed.values():
            if a.model is not None:
                self.switches[a.model] = self.switches.get(a.model, 0) + 1
        result = PassResult(decision, changed, time.perf_counter() - started)
        self.last = result
        self._store_state(result, models)
        for node_id, a in changed.items():
            log.info("placement: %s -> %s (generation %d): %s", node_id, a.model or "nothing", a.generation, a.reason)
        return result

    def _current_placer(self) -> tuple[Catalog, Placer]:
        """The catalog and a placer over it, made again only when the base file or the
        imported entries change (the placer keeps its move budget and hysteresis state)."""
        entries = self.registry.region.entries()
        try:
            mtime = self.base.stat().st_mtime_ns
        except OSError:
            mtime = 0
        key = (mtime, tuple((e.kind, e.name, e.imported_at) for e in entries))
        if self._placer is None or self._catalog is None or key != self._catalog_key:
            self._catalog = region_catalog(self.base, entries)
            self._placer = Placer(self._catalog, moves_per_minute=self.cfg.placement.moves_per_minute)
            self._catalog_key = key
        return self._catalog, self._placer

    def _pcs(self, previous: dict[str, Assignment]) -> list[PcView]:
        now = time.time()
        out = []
        names = {}
        excluded = self.excluded()
        for node in self.registry.nodes():
            names[node.id] = node.name
            if node.revoked or node.confirmed_at is None or not isinstance(node.report, dict):
                continue
            try:
                report = decode(node.report, NodeReport)
            except WireError:
                continue  # a report the head cannot read (a damaged row): the PC is left alone
            alive = node.last_seen is not None and now - node.last_seen <= self.cfg.options.offline_after_s
            out.append(PcView(node_id=node.id, name=node.name, report=report, assignment=previous.get(node.id),
                              alive=alive, quarantined=node.id in excluded))
        self._names = names
        return out

    def _demand(self, wanted: list[Wanted]) -> dict[str, PlacerDemand]:
        seen = self.demand()
        out = {}
        for w in wanted:
            d = seen.get(self._served.get(w.model, w.model))  # the gateway counts by the name asked for
            out[w.model] = (PlacerDemand(tokens_per_s=d.tokens_per_s, queue_depth=d.queue_depth,
                                         unserved_per_s=d.unserved_per_s) if d else PlacerDemand())
        return out

    def _store_state(self, result: PassResult, models: list[RegionModel]) -> None:
        d = result.decision
        names = self._names
        self.registry.region.store_state({
            "at": time.time(),
            "took_s": round(result.took_s, 4),
            "enabled": self.cfg.placement.enabled,
            "models": encode(d.models) if d is not None else [],
            "moves": list(d.moves) if d is not None else [],
            "pcs": {node_id: {"name": names.get(node_id, ""), "model": a.model, "generation": a.generation,
                              "reason": (d.explain.get(node_id) or a.reason) if d is not None else a.reason,
                              # what it refused and why, while that model is held off it
                              "refused": d.refused.get(node_id) if d is not None else None}
                    for node_id, a in (d.assignments.items() if d is not None else [])},
        })
