"""`garage-node update approve VERSION`: the owner's yes to one OS version, for a PC whose
garage.toml says [update] when = "ask" (node/update.py reads it)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from garage_node.node.config import load_node_config

HELP = ('approve one OS version for this PC when garage.toml says [update] when = "ask": '
        "`update approve VERSION` (the version the head named; `garage-node status` shows it)")


def add_command(cmd: Callable[..., argparse.ArgumentParser]) -> None:
    u = cmd("update", update, HELP)
    u.add_argument("action", choices=["approve"])
    u.add_argument("version", help="the version to allow, e.g. 2026.12.1")


def update(args: Any) -> int:
    from garage_node.core import releasefiles
    from garage_node.node import update as up

    cfg = load_node_config(args.config, args.override)
    try:
        version = releasefiles.check_version(args.version)
    except ValueError as e:
        print(f"garage-node update approve: {e}", file=sys.stderr)
        return 2
    up.approve(cfg.node.state_dir, version)
    note = "" if cfg.update.when == "ask" else (f' (garage.toml says [update] when = "{cfg.update.when}", so no '
                                                "approval is needed)")
    print(f"approved {version}: this PC installs it when the head names it and the current boot is confirmed "
          f"good{note}")
    return 0
