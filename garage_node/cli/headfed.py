"""`garage-node head federation secret | status` and `garage-node head usage --global`: the
federation between regions (head/federation/, issue #21)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

from garage_node.head.config import load_head_config

HELP = ("the federation between regions' heads: `federation secret` makes the secret every head of the "
        "network shares (once, on one head; copy the file to the others), `federation status` shows this "
        "head's NATS, the other regions (reachable, round trip, summary age) and the usage records held")


def add_command(cmd: Callable[..., argparse.ArgumentParser]) -> None:
    f = cmd("federation", federation, HELP)
    f.add_argument("action", choices=["secret", "status"])
    f.add_argument("--new", action="store_true", help="secret: replace an existing secret (then copy it to every head)")
    f.add_argument("--json", action="store_true", help="status: as JSON")


def federation(args: Any) -> int:
    from garage_node.head.federation.natsd import make_secret
    from garage_node.head.federation.service import secret_path, state_dir

    cfg = load_head_config(args.config)
    say = f"garage-node head federation {args.action}"
    if args.action == "secret":
        path = secret_path(cfg.federation, cfg.head.state_dir)
        if path.exists() and not args.new:
            print(f"{say}: {path} exists already (--new replaces it; every head then needs the new file)",
                  file=sys.stderr)
            return 2
        make_secret(path)
        print(f"federation secret written to {path} (0600). Copy this file, keeping it 0600, to the same path on "
              "every other region's head (scp); it never needs to be typed or shown.")
        return 0
    path = state_dir(cfg.head.state_dir) / "status.json"
    if not cfg.federation.enabled:
        print("federation is off ([federation] enabled = false): this region is on its own")
        return 0
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        print(f"{say}: no status yet ({path}): is `garage-node head run` running?", file=sys.stderr)
        return 69
    age = time.time() - status.get("written_at", 0)
    if args.json:
        print(json.dumps({**status, "age_s": round(age, 1)}, indent=2))
        return 0
    stale = f" (written {age:.0f} s ago: is the head running?)" if age > 10 else ""
    print(f"region {status['region']}: {'DEGRADED' if status['degraded'] else 'ok'}{stale}")
    n = status["nats"]
    print(f"  this region's NATS {n['url']}: {'up' if n['up'] else 'DOWN: ' + n['problem']}")
    print(f"  usage records held: {status['usage_records']}; this region's not yet in its stream: {status['unshipped']}")
    print(f"  {'REGION':<10} {'LINK':<6} {'RTT':>8} {'SUMMARY':>9}  MODELS")
    for region, p in sorted(status["peers"].items()):
        rtt = f"{p['rtt_ms']:.0f} ms" if p.get("rtt_ms") is not None else "-"
        summary = f"{p['summary_age_s']:.1f} s" if p.get("summary_age_s") is not None else "-"
        print(f"  {region:<10} {'up' if p['up'] else 'DOWN':<6} {rtt:>8} {summary:>9}  {', '.join(p.get('models', []))}")
    return 0


def usage_global(args: Any) -> int:
    """`head usage --global`: every region's requests, from this head's copy of the global ledger."""
    from garage_node.head.federation.fedstore import FedStore
    from garage_node.head.federation.service import state_dir

    cfg = load_head_config(args.config)
    path = state_dir(cfg.head.state_dir) / "federation.db"
    if not path.exists():
        print("garage-node head usage --global: no federation ledger here ([federation] enabled and "
              "`garage-node head run` make it)", file=sys.stderr)
        return 69
    rows = FedStore(path).usage(args.by, since=time.time() - args.since if args.since else 0.0)
    if args.json:
        print(json.dumps([{args.by: g, "requests": n, "prompt_tokens": p, "completion_tokens": c,
                           "total_tokens": p + c} for g, n, p, c in rows], indent=2))
        return 0
    if not rows:
        print("no usage recorded in any region" + (" in that period" if args.since else " yet"))
        return 0
    label = {"node": "PC"}.get(args.by, args.by.upper())
    print(f"{label:<28} {'REQUESTS':>9} {'PROMPT':>10} {'COMPLETION':>11} {'TOTAL':>10}")
    for g, n, p, c in rows:
        print(f"{g:<28} {n:>9} {p:>10} {c:>11} {p + c:>10}")
    return 0
