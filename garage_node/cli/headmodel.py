"""`garage-node head model ...`: the region's catalog, the models the head places on the PCs
(issue #18). The commands write the registry; the running head reads it at its next placement
pass ([placement] interval_s) and answers the PCs' heartbeats with their assignments.

    add MODEL [--min N] [--max M] [--weight W]   serve a catalog model (again: change its terms)
    list                                         each model: terms, replicas wanted and running,
                                                 where it runs, demand, and why; each PC's reason
    remove MODEL                                 stop placing it (PCs serving it are reassigned)
    import FILE                                  catalog entries (configs/models.toml's format)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

EX_UNAVAILABLE = 69
ACTIONS = ("add", "list", "remove", "import")
PCS_SHOWN = 20  # `model list` lists each PC's reason up to this many PCs, or with --pcs

HELP = ("the region's catalog: `model add MODEL [--min N] [--max M] [--weight W]` has the head place a catalog "
        "model on the PCs, `model list` shows where each runs, its demand and why, `model remove MODEL`, "
        "`model import FILE` adds catalog entries (configs/models.toml's format)")


def add_command(cmd: Callable[..., argparse.ArgumentParser]) -> None:
    """Registered by cli/head.py with its `cmd` (which adds --config and --verbose)."""
    sp = cmd("model", run, HELP)
    sp.add_argument("action", choices=ACTIONS)
    sp.add_argument("target", nargs="?", metavar="MODEL|FILE", help="a catalog name (add, remove) or a TOML file (import)")
    sp.add_argument("--min", type=int, default=0, dest="min_replicas",
                    help="PCs that serve it whatever the demand (default 0: only when asked for)")
    sp.add_argument("--max", type=int, dest="max_replicas", help="at most this many PCs (default: as demand asks)")
    sp.add_argument("--weight", type=float, default=1.0,
                    help="its share when PCs are short, against the other models' (default 1.0)")
    sp.add_argument("--pcs", action="store_true",
                    help="list: each PC's assignment and reason too (shown anyway for up to 20 PCs)")
    sp.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from garage_node.head import setup
    from garage_node.head.config import load_head_config

    cfg = load_head_config(args.config)
    try:
        setup.require_init(cfg)
    except setup.SetupError as e:
        print(f"garage-node head: {e}", file=sys.stderr)
        return EX_UNAVAILABLE
    if args.action != "list" and not args.target:
        what = "FILE" if args.action == "import" else "MODEL"
        print(f"garage-node head model {args.action}: name the {what.lower()}, e.g. "
              f"`garage-node head model {args.action} {what}`", file=sys.stderr)
        return 2
    registry = setup.open_registry(cfg)
    actions: dict[str, Callable[..., int]] = {"add": _add, "list": _list, "remove": _remove, "import": _import}
    return actions[args.action](args, cfg, registry)


def _fail(action: str, message: str) -> int:
    print(f"garage-node head model {action}: {message}", file=sys.stderr)
    return 2


def _add(args: argparse.Namespace, cfg: Any, registry: Any) -> int:
    from garage_node.head.placement import ModelError, add_model, base_catalog, region_catalog
    from garage_node.placement.catalog import CatalogError

    try:
        catalog = region_catalog(base_catalog(cfg), registry.region.entries())
        m = add_model(registry, catalog, args.target, args.min_replicas, args.max_replicas, args.weight)
    except (ModelError, CatalogError) as e:
        return _fail("add", str(e))
    if args.json:
        print(json.dumps(_terms(m), indent=2))
        return 0
    note = "" if cfg.placement.enabled else " ([placement] enabled is false in the head's config: nothing is placed)"
    found = catalog.resolve(m.model)
    served = found[0].id if found else m.model
    print(f"{m.model} is in the region's catalog: {_terms_text(m)}. The head places it within "
          f"{cfg.placement.interval_s:.0f} s{note}; `garage-node head model list` shows where. Clients ask the "
          f"gateway for it as \"{served}\".")
    return 0


def _remove(args: argparse.Namespace, cfg: Any, registry: Any) -> int:
    from garage_node.head.placement import ModelError, remove_model

    try:
        remove_model(registry, args.target)
    except ModelError as e:
        return _fail("remove", str(e))
    if args.json:
        print(json.dumps({"removed": args.target}))
    else:
        print(f"{args.target} left the region's catalog: PCs serving it are given other work within "
              f"{cfg.placement.interval_s:.0f} s (its requests get 404 once no PC serves it).")
    return 0


def _import(args: argparse.Namespace, cfg: Any, registry: Any) -> int:
    from garage_node.head.placement import base_catalog, import_catalog
    from garage_node.placement.catalog import CatalogError

    path = Path(args.target)
    try:
        names = import_catalog(registry, base_catalog(cfg), path)
    except CatalogError as e:
        return _fail("import", f"{e} Nothing was imported.")
    if args.json:
        print(json.dumps({"imported": names, "file": str(path.resolve())}))
    else:
        print(f"imported {len(names)} model{'s' if len(names) != 1 else ''} from {path}: {', '.join(names) or 'none'}. "
              "`garage-node head model add NAME` has the head place one.")
    return 0


def _terms(m: Any) -> dict[str, Any]:
    return {"model": m.model, "min_replicas": m.min_replicas, "max_replicas": m.max_replicas, "weight": m.weight,
            "added_at": m.added_at}


def _terms_text(m: Any) -> str:
    top = "as many as demand asks" if m.max_replicas is None else f"at most {m.max_replicas}"
    low = "only while asked for" if m.min_replicas == 0 else \
        f"at least {m.min_replicas} PC{'s' if m.min_replicas != 1 else ''} whatever the demand"
    return f"{low}, {top}, weight {m.weight:g}"


def listing(cfg: Any, registry: Any) -> dict[str, Any]:
    """What `model list --json` prints: each model of the region's catalog with the head's
    last decision about it, the PCs' reasons, and how fresh that decision is."""
    from garage_node.head.placement import base_catalog, region_catalog
    from garage_node.placement.catalog import CatalogError

    try:
        catalog = region_catalog(base_catalog(cfg), registry.region.entries())
    except CatalogError:
        catalog = None  # listed without the served names; `model add` says what is wrong
    state = registry.region.state()
    body, at = state if state is not None else ({}, None)
    views = {v["model"]: v for v in body.get("models", [])}
    pcs = body.get("pcs", {})
    models = []
    for m in registry.region.models():
        v = views.get(m.model, {})
        where = [{"node_id": n, "name": pcs.get(n, {}).get("name", "")} for n in v.get("pcs", [])]
        found = catalog.resolve(m.model) if catalog is not None else None
        models.append({**_terms(m), "served_as": found[0].id if found else None, "wanted": v.get("wanted"), "running": v.get("running"), "pcs": where,
                       "demand": v.get("demand"), "why": v.get("why", "not placed yet: the head's next pass decides")})
    age = time.time() - at if at is not None else None
    return {"placement": {"enabled": cfg.placement.enabled, "last_pass_at": at,
                          "last_pass_age_s": round(age, 1) if age is not None else None,
                          "took_s": body.get("took_s"), "moves": body.get("moves", [])},
            "models": models, "pcs": pcs}


def _list(args: argparse.Namespace, cfg: Any, registry: Any) -> int:
    out = listing(cfg, registry)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if not out["models"]:
        print("the region's catalog is empty: every PC plans for itself (the largest catalog model that fits, or "
              "its owner's pin). `garage-node head model add MODEL` has the head place a model.")
        return 0
    p = out["placement"]
    if not p["enabled"]:
        print("[placement] enabled is false in the head's config: the head assigns nothing, every PC plans for itself.")
    elif p["last_pass_age_s"] is None or p["last_pass_age_s"] > max(30.0, 3 * cfg.placement.interval_s):
        when = "never" if p["last_pass_age_s"] is None else f"{p['last_pass_age_s']:.0f} s ago"
        print(f"the head's last placement pass: {when}. Is `garage-node head run` running? (shown: what it last decided)")
    print(f"{'MODEL':<24} {'MIN':>3} {'MAX':>3} {'WEIGHT':>6} {'WANTED':>6} {'RUNNING':>7} {'TOKENS/S':>9} "
          f"{'QUEUE':>5} {'UNSERVED/S':>10}  WHERE")
    for m in out["models"]:
        d = m["demand"] or {}
        where = ", ".join(pc["name"] or pc["node_id"] for pc in m["pcs"]) or "-"
        print(f"{m['model']:<24} {m['min_replicas']:>3} {_dash(m['max_replicas']):>3} {m['weight']:>6g} "
              f"{_dash(m['wanted']):>6} {_dash(m['running']):>7} {d.get('tokens_per_s', 0.0):>9.1f} "
              f"{d.get('queue_depth', 0):>5} {d.get('unserved_per_s', 0.0):>10.2f}  {where}")
        print(f"    asked for as: {m['served_as'] or '?'}; why: {m['why']}")
    if out["pcs"] and not args.pcs and len(out["pcs"]) > PCS_SHOWN:
        refusing = sum(1 for pc in out["pcs"].values() if pc.get("refused"))
        print(f"\n{len(out['pcs'])} PCs placed: `garage-node head model list --pcs` shows each one's reason"
              + (f" ({refusing} refused a model lately)" if refusing else ""))
    elif out["pcs"]:
        print("\nPCS")
        for node_id, pc in sorted(out["pcs"].items(), key=lambda kv: kv[1].get("name", "")):
            print(f"  {pc.get('name') or node_id} ({node_id}): {pc.get('model') or 'nothing'} "
                  f"(generation {pc.get('generation')}): {pc.get('reason', '')}")
            if pc.get("refused"):
                print(f"    REFUSED: {pc['refused']}")
    return 0


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)
