"""`garage-node head release trust-key FILE | add DIR | list | keys`: the signed releases of the
stick's OS the head keeps and serves to its PCs (head/releases.py)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from garage_node.cli.headweights import _size  # the same sizes as `head weights list`
from garage_node.head.config import load_head_config

HELP = ("releases of the stick's OS, signed by the operator and served to the region's PCs: `release trust-key FILE` "
        "(the operator's public signing key), `release add DIR` (checks the signature, every file's SHA-256 and the "
        "Ray and Python versions, then stores it once), `release list`, `release keys`")


def add_command(cmd: Callable[..., argparse.ArgumentParser]) -> None:
    """Adds `release` with `cmd`, head.py's helper that makes a `head` subcommand."""
    r = cmd("release", release, HELP)
    r.add_argument("action", choices=["trust-key", "add", "list", "keys"])
    r.add_argument("path", nargs="?", type=Path,
                   help="trust-key: the public key file (armored or binary); add: the release directory")
    r.add_argument("--json", action="store_true", help="print as JSON")


def release(args: Any) -> int:
    from garage_node.head.releases import ReleaseError, ReleaseStore, releases_root

    cfg = load_head_config(args.config)
    store = ReleaseStore(releases_root(cfg.head.state_dir))
    say = f"garage-node head release {args.action}"
    if args.action in ("trust-key", "add") and args.path is None:
        example = "release-key.asc" if args.action == "trust-key" else "out/release-2026.12.1"
        print(f"{say}: give the {'key file' if args.action == 'trust-key' else 'release directory'}, e.g. "
              f"`garage-node head release {args.action} {example}`", file=sys.stderr)
        return 2
    try:
        if args.action == "trust-key":
            for k in store.trust_key(args.path):
                print(f"trusted {k.fingerprint} {k.user_id}: releases signed by it can be added")
            return 0
        if args.action == "add":
            r, new = store.add(args.path)
            if args.json:
                print(json.dumps(asdict(r), indent=2))
            elif new:
                print(f"added release {r.version} ({r.variant}, Ray {r.ray}, Python {r.python}): {r.files} files, "
                      f"{_size(r.bytes)}, signed by {r.signer[-16:]}; start it with "
                      f"`garage-node head rollout start {r.version}`")
            else:
                print(f"release {r.version} is already stored (the same signed files): nothing to do")
            return 0
    except ReleaseError as e:
        print(f"{say}: {e}", file=sys.stderr)
        return 2
    if args.action == "keys":
        keys = store.trusted_keys()
        if args.json:
            print(json.dumps([{"fingerprint": k.fingerprint, "user_id": k.user_id} for k in keys], indent=2))
        elif not keys:
            print("the head trusts no release signing key; add one with `garage-node head release trust-key FILE`")
        for k in [] if args.json else keys:
            print(f"{k.fingerprint}  {k.user_id}")
        return 0
    rows = store.releases()
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    elif not rows:
        print(f"the head holds no release ({store.versions_dir}); add one with `garage-node head release add DIR`")
    else:
        print(f"{'VERSION':<20} {'VARIANT':<8} {'RAY':<8} {'PYTHON':<7} {'SIZE':>10}  {'ADDED':<17} SIGNER")
        for r in rows:
            added = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.added_at))
            print(f"{r.version:<20} {r.variant:<8} {r.ray:<8} {r.python:<7} {_size(r.bytes):>10}  {added:<17} "
                  f"{r.signer[-16:]}")
    return 0
