"""`garage-node head rollout start VERSION | status | pause | resume | abort`: a stored release
rolled out across the region's PCs, canary first, then wave by wave (head/rollout.py). The
running head picks each change up within seconds (head/rolloutkeeper.py)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

from garage_node.head.config import load_head_config

HELP = ("roll a stored release out across the region: `rollout start VERSION [--canary N] [--waves 1,10,50,100] "
        "[--max-failures PCT]` (a wave starts only when the one before succeeded; a failed canary or failures above "
        "the threshold stop it by itself), `rollout status`, `rollout pause`, `rollout resume`, `rollout abort`")


def _waves(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of percentages, e.g. 1,10,50,100") from None


def add_command(cmd: Callable[..., argparse.ArgumentParser], duration: Callable[[str], float]) -> None:
    """Adds `rollout` with `cmd`, head.py's helper that makes a `head` subcommand."""
    r = cmd("rollout", rollout, HELP)
    r.add_argument("action", choices=["start", "status", "pause", "resume", "abort"])
    r.add_argument("version", nargs="?", help="start: the release's version (see `head release list`)")
    r.add_argument("--canary", type=int, default=1, help="PCs that update first, alone (default 1)")
    r.add_argument("--waves", type=_waves, default=(1.0, 10.0, 50.0, 100.0),
                   help="cumulative percentages of the PCs, one wave each, ending at 100 (default 1,10,50,100)")
    r.add_argument("--max-failures", type=float, default=2.0,
                   help="failed PCs a wave may have, in percent of its size, before the rollout stops (default 2; "
                        "the canary may have none)")
    r.add_argument("--start-timeout", type=duration, default=3600.0,
                   help="a PC told to update that has not begun by then is passed over (default 1h)")
    r.add_argument("--update-timeout", type=duration, default=1800.0,
                   help="a PC that began and is not back on the new version, blessed, by then has failed (default 30m)")
    r.add_argument("--json", action="store_true", help="status: print as JSON")


def rollout(args: Any) -> int:
    from garage_node.head import rolloutops, setup
    from garage_node.head.releases import ReleaseStore, releases_root
    from garage_node.head.rollout import RolloutError, RolloutPlan
    from garage_node.head.rolloutstore import RolloutStore, database_path

    cfg = load_head_config(args.config)
    say = f"garage-node head rollout {args.action}"
    try:
        setup.require_init(cfg)
    except setup.SetupError as e:
        print(f"{say}: {e}", file=sys.stderr)
        return 69
    store = RolloutStore(database_path(cfg.head.state_dir))
    now = time.time()
    try:
        if args.action == "start":
            if not args.version:
                print(f"{say}: name the release, e.g. `garage-node head rollout start 2026.12.1` "
                      "(see `garage-node head release list`)", file=sys.stderr)
                return 2
            plan = RolloutPlan(args.version, canary=args.canary, waves=args.waves, max_failures_pct=args.max_failures,
                               start_timeout_s=args.start_timeout, update_timeout_s=args.update_timeout)
            r = rolloutops.start(store, ReleaseStore(releases_root(cfg.head.state_dir)),
                                 setup.open_registry(cfg).nodes(), plan, now, cfg.options.offline_after_s)
            sizes = ", ".join(f"{w.name}: {w.size}" for w in rolloutops.waves(r))
            n = len(r.members)
            print(f"rollout of {r.plan.version} started over {n} PC{'s' if n != 1 else ''} ({sizes}); the head tells the "
                  f"canary with its next heartbeat. Watch it with `garage-node head rollout status`")
            return 0
        if args.action in ("pause", "resume", "abort"):
            r = rolloutops.command(store, args.action, now)
            what = {"pause": "paused: PCs that have not begun are not told until `rollout resume`",
                    "resume": "resumed", "abort": "aborted: no PC that has not begun will be told; PCs that began finish"}
            print(f"rollout of {r.plan.version} {what[args.action]}")
            return 0
    except RolloutError as e:
        print(f"{say}: {e}", file=sys.stderr)
        return 2
    cur = store.current()
    if cur is None:
        print("no rollout yet; start one with `garage-node head rollout start VERSION`")
        return 0
    r = cur
    if args.json:
        print(json.dumps(rolloutops.summary(r), indent=2))
        return 0
    print(f"rollout of {r.plan.version} ({r.plan.variant}): {r.state.value}" + (f": {r.reason}" if r.reason else ""))
    print(f"  started {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(r.started_at))}, {r.touched()} PC{'s' if r.touched() != 1 else ''} began, "
          f"max failures {r.plan.max_failures_pct:g} % a wave")
    print(f"  {'WAVE':<14} {'SIZE':>5} {'OK':>5} {'FAILED':>7} {'BUSY':>5} {'WAITING':>8} {'PASSED':>7}")
    for w in rolloutops.waves(r):
        c = w.counts
        print(f"  {w.name:<14} {w.size:>5} {c['ok']:>5} {c['failed']:>7} {c['started']:>5} "
              f"{c['targeted'] + (c['queued'] if w.open else 0):>8} {c['passed-over']:>7}"
              + ("" if w.open else "  (not started)"))
    for f in rolloutops.summary(r)["failed"][:10]:
        print(f"  failed: {f['node_id']} (wave {f['wave']}): {f['why']}")
    return 0
