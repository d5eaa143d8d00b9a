"""`garage-node head weights add NAME DIR | list | remove NAME`: the head's model store, from
which the region's PCs fetch model weights over the overlay (head/modelstore.py)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from garage_node.head.config import load_head_config

HELP = ("the head's model store, from which PCs fetch weights over the overlay instead of the internet: "
        "`weights add NAME DIR` copies a local model directory in (replacing one of that name), `weights list`, "
        "`weights remove NAME`, `weights verify NAME` (reads every file again against its SHA-256)")


def add_command(cmd: Callable[..., argparse.ArgumentParser]) -> None:
    """Adds `weights` with `cmd`, head.py's helper that makes a `head` subcommand."""
    w = cmd("weights", weights, HELP)
    w.add_argument("action", choices=["add", "list", "remove", "verify"])
    w.add_argument("name", nargs="?", help="the model's catalog name (add, remove, verify), e.g. qwen2.5-7b")
    w.add_argument("dir", nargs="?", type=Path, help="add: the model's local directory (the one holding config.json)")
    w.add_argument("--json", action="store_true", help="print as JSON")


def weights(args: Any) -> int:
    from garage_node.head.modelstore import ModelStore, StoreError, store_root

    cfg = load_head_config(args.config)
    store = ModelStore(store_root(cfg.head.state_dir))
    say = f"garage-node head weights {args.action}"
    if args.action in ("add", "remove", "verify") and not args.name:
        example = "qwen2.5-7b /srv/models/Qwen2.5-7B-Instruct" if args.action == "add" else "qwen2.5-7b"
        print(f"{say}: name the model, e.g. `garage-node head weights {args.action} {example}`", file=sys.stderr)
        return 2
    if args.action == "add":
        if args.dir is None:
            print(f"{say}: give the model's directory, e.g. `garage-node head weights add {args.name} "
                  "/srv/models/Qwen2.5-7B-Instruct`", file=sys.stderr)
            return 2
        try:
            m = store.add(args.name, args.dir, progress=_progress_printer())
        except StoreError as e:
            print(f"{say}: {e}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(_row(store, m.name), indent=2))
        else:
            print(f"added {m.name}: {len(m.files)} files, {_size(m.total_bytes)}, digest {m.digest[:12]}; "
                  f"PCs assigned it fetch it from the head ({store.weights_path(m.name)})")
        return 0
    if args.action == "verify":
        try:
            bad = store.verify(args.name)
        except StoreError as e:
            print(f"{say}: {e}", file=sys.stderr)
            return 2
        if bad:
            print(f"{say}: {args.name} is damaged: {', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''} no longer "
                  f"match the manifest; PCs refuse these files. Add the model again: `garage-node head weights add "
                  f"{args.name} DIR`", file=sys.stderr)
            return 1
        print(f"{args.name}: every file matches its SHA-256")
        return 0
    if args.action == "remove":
        if not store.remove(args.name):
            print(f"{say}: the store does not hold {args.name!r} (see `garage-node head weights list`)",
                  file=sys.stderr)
            return 2
        print(f"removed {args.name}: PCs that hold it keep their copy; new ones fetch it from the model hub")
        return 0
    rows = [_row(store, name) for name in store.names()]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"the store holds no model ({store.root}); add one with `garage-node head weights add NAME DIR`")
    else:
        print(f"{'NAME':<28} {'FILES':>5} {'SIZE':>10}  {'ADDED':<17} DIGEST")
        for r in rows:
            added = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["added_at"]))
            print(f"{r['name']:<28} {r['files']:>5} {_size(r['bytes']):>10}  {added:<17} {r['digest'][:12]}")
    return 0


def _row(store: Any, name: str) -> dict[str, Any]:
    m = store.manifest(name)
    return {"name": name, "files": len(m.files), "bytes": m.total_bytes, "digest": m.digest, "added_at": m.added_at,
            "weights_path": store.weights_path(name)}


def _size(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _progress_printer() -> Callable[[int, int], None]:
    """Progress on stderr, at most once a second, only to a terminal (a script's log stays clean)."""
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if sys.stderr.isatty() and (now - last[0] >= 1.0 or done == total):
            last[0] = now
            print(f"\rcopying: {done * 100 // max(total, 1)} % of {_size(total)}", end="" if done < total else "\n",
                  file=sys.stderr)

    return show
