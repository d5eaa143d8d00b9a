"""`garage-node head audit ...`: the region's audits of what PCs answer (issue #20). Read from
the gateway's database, where the running head keeps its audits and its loop's state.

    status               each PC: audits, requests, the sequential test's evidence, the honest
                         rate in use, its state; the verifier (or "no verifier") and the queue
    calibrate MODEL      record MODEL's honest rate (greedy answers with a bad token) from the audits of trusted PCs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

EX_UNAVAILABLE = 69
ACTIONS = ("status", "calibrate")
STALE_S = 60.0  # the head writes its loop's state at least every 10 s while it runs

HELP = ("the region's audits of what PCs answer: `audit status` shows each PC's audits, evidence and state and "
        "the verifier; `audit calibrate MODEL` records the model's honest rate from the audits of trusted PCs")


def add_command(cmd: Callable[..., argparse.ArgumentParser]) -> None:
    """Registered by cli/head.py with its `cmd` (which adds --config and --verbose)."""
    sp = cmd("audit", run, HELP)
    sp.add_argument("action", choices=ACTIONS)
    sp.add_argument("model", nargs="?", metavar="MODEL", help="calibrate: the model (its name as PCs serve it)")
    sp.add_argument("--precision", help="calibrate: only this precision (gpu or cpu; default: each found)")
    sp.add_argument("--since", help="calibrate: only audits of the last period, e.g. 7d (default: all kept)")
    sp.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from garage_node.cli.head import _gateway_store
    from garage_node.head.config import load_head_config

    cfg = load_head_config(args.config)
    store = _gateway_store(cfg)
    if store is None:
        return EX_UNAVAILABLE
    if args.action == "calibrate":
        return _calibrate(args, store)
    return _status(args, cfg, store)


def _names(cfg: Any) -> dict[str, str]:
    from garage_node.head import setup

    try:
        return {n.id: n.name for n in setup.open_registry(cfg).nodes()}
    except Exception:  # the names are a courtesy: ids do
        return {}


def status_document(cfg: Any, store: Any, names: dict[str, str], now: float) -> dict[str, Any]:
    """What `audit status` shows, as data (the --json output)."""
    from garage_node.head.audit import sprt
    from garage_node.head.audit.book import Book
    from garage_node.head.audit.trust import Trust

    a = cfg.audit
    book = Book(store)
    t = sprt.Thresholds.of(a.false_quarantine)
    rates = book.rates()
    trust = Trust(store).all()
    state = book.state()
    last = book.last_models()
    pcs = []
    for line in book.nodes():
        model, precision = last.get(line.node_id, ("", ""))
        rate = rates.get((model, precision))
        h = sprt.Hypotheses.of(rate.eps0 if rate else None)
        tr = trust.get(line.node_id)
        pcs.append({"node": line.node_id, "name": names.get(line.node_id, ""), "state": tr.state if tr else "ok",
                    "why": tr.why if tr else "", "trusted": bool(tr and tr.trusted), "audits": line.audits,
                    "requests": line.requests, "evidence": line.sums, "model": model, "precision": precision,
                    "rate": h.eps0, "calibrated": rate is not None})
    written = max((at for _, at in state.values()), default=None)
    loop = {k: v for k, (v, _) in state.items()}
    return {"enabled": a.enabled, "rates": {"rate": a.rate, "new_rate": a.new_rate, "new_requests": a.new_requests,
                                            "suspect_rate": a.suspect_rate, "canary_rate": a.canary_rate},
            "threshold": t.upper, "false_quarantine": a.false_quarantine,
            "loop": loop, "loop_written_at": written,
            "loop_running": written is not None and now - written < STALE_S,
            "calibrated": [{"model": r.model, "precision": r.precision, "rate": r.eps0, "tokens": r.tokens,
                            "audits": r.audits, "calibrated_at": r.calibrated_at} for r in rates.values()],
            "pcs": pcs}


def _status(args: argparse.Namespace, cfg: Any, store: Any) -> int:
    now = time.time()
    doc = status_document(cfg, store, _names(cfg), now)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(render(doc, now))
    return 0


def render(doc: dict[str, Any], now: float) -> str:
    r = doc["rates"]
    lines = []
    if not doc["enabled"]:
        lines.append("audits: off ([audit] enabled = false): no answer is checked")
    else:
        lines.append(f"audits: {r['rate']:.1%} of requests ({r['new_rate']:.0%} for a PC's first {r['new_requests']}, "
                     f"{r['suspect_rate']:.0%} while its evidence is above 0), canaries {r['canary_rate']:.1%}; "
                     f"quarantine at evidence {doc['threshold']:.1f} (false_quarantine {doc['false_quarantine']:g})")
    loop = doc["loop"]
    if doc["loop_written_at"] is None:
        lines.append("verifier: unknown: the head has not run with audits yet")
    else:
        ago = now - doc["loop_written_at"]
        when = f"{ago:.0f} s ago" if doc["loop_running"] else f"{ago / 60:.0f} min ago: is the head running?"
        lines.append(f"verifier ({when}): {loop.get('verifier', 'unknown')}")
        if loop.get("last_error"):
            lines.append(f"  last error: {loop['last_error']}")
        lines.append(f"samples: {loop.get('pending', 0)} waiting, {loop.get('scored', 0)} scored, "
                     f"{loop.get('dropped', 0)} dropped (queue full), {loop.get('errors', 0)} not scorable; "
                     f"{loop.get('canaries', 0)} canaries sent")
        for node, rc in (loop.get("rechecks") or {}).items():
            lines.append(f"  re-check of {node}: {rc['sent']} canaries answered, {rc['scored']} scored")
    if not doc["pcs"]:
        lines.append("no PC audited yet")
        return "\n".join(lines)
    lines.append(f"{'PC':<28} {'STATE':<12} {'AUDITS':>6} {'REQUESTS':>9} {'EVIDENCE tokens/partial/stops/usage':>36}  RATE IN USE")
    for p in doc["pcs"]:
        who = f"{p['name']} ({p['node']})" if p["name"] else p["node"]
        ev = p["evidence"]
        evidence = "/".join(f"{ev[t]:.1f}" for t in ("tokens", "partial", "stops", "usage"))
        rate = (f"{p['rate']:.3f} ({p['model']}/{p['precision']}, "
                + ("calibrated)" if p["calibrated"] else "default: not calibrated)")) if p["model"] else "-"
        state = p["state"] + (" *" if p["trusted"] else "")
        lines.append(f"{who:<28} {state:<12} {p['audits']:>6} {p['requests']:>9} {evidence:>36}  {rate}")
        if p["why"]:
            lines.append(f"  why: {p['why']}")
    lines.append("(* trusted: its engine verifies the others)")
    return "\n".join(lines)


def _calibrate(args: argparse.Namespace, store: Any) -> int:
    from garage_node.cli.head import duration
    from garage_node.head.audit.book import Book, CalibrationError
    from garage_node.head.audit.trust import Trust

    if not args.model:
        print("garage-node head audit calibrate: name the model, e.g. `garage-node head audit calibrate MODEL`",
              file=sys.stderr)
        return 2
    try:
        since = time.time() - duration(args.since) if args.since else 0.0
    except argparse.ArgumentTypeError as e:
        print(f"garage-node head audit calibrate: --since: {e}", file=sys.stderr)
        return 2
    trusted = frozenset(n for n, t in Trust(store).all().items() if t.trusted)
    try:
        rates = Book(store).calibrate(args.model, args.precision, trusted, time.time(), since)
    except CalibrationError as e:
        print(f"garage-node head audit calibrate: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.__dict__ for r in rates], indent=2))
        return 0
    for r in rates:
        print(f"{r.model} on {r.precision}: honest rate {r.eps0:.4f} (99 % bound of {r.bad} greedy answers with a bad "
              f"token in {r.audits} audits of trusted PCs, {r.tokens} tokens); the running head uses it within a minute")
    return 0
