"""`garage-node update approve VERSION`: the owner's yes to one OS version, for a PC whose
garage.toml says [update] when = "ask" (node/update.py reads it); and `garage-node health-gate`,
the A/B stick's boot check (node/healthgate.py) that garage-boot-check.service runs."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from garage_node.node.config import load_node_config

HELP = ('approve one OS version for this PC when garage.toml says [update] when = "ask": '
        "`update approve VERSION` (the version the head named; `garage-node status` shows it)")


HEALTH_HELP = ("judge this boot of the A/B stick: exit 0 when garage.toml is valid, the agent answers, Docker answers "
               "and (nvidia) NVML sees the GPUs of the last good boot; never judges the network. What "
               "garage-boot-check.service runs before boot-complete.target")


def add_command(cmd: Callable[..., argparse.ArgumentParser]) -> None:
    u = cmd("update", update, HELP)
    u.add_argument("action", choices=["approve"])
    u.add_argument("version", help="the version to allow, e.g. 2026.12.1")
    g = cmd("health-gate", health_gate, HEALTH_HELP)
    g.add_argument("--wait", type=float, default=90.0, metavar="SECONDS",
                   help="retry the checks this long before judging the boot bad (default 90: the agent takes a while "
                        "to come up)")


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


def health_gate(args: Any) -> int:
    from garage_node.node import healthgate
    from garage_node.node.update import os_release_value

    failed = healthgate.run(healthgate.probes(args.config, args.override, os_release_value("VARIANT_ID")),
                            wait_s=max(0.0, args.wait))
    for c in failed:
        print(f"health-gate: FAIL {c.name}: {c.why}", file=sys.stderr)
    if failed:
        print("health-gate: this boot is not confirmed good: after its tries the stick boots the other version",
              file=sys.stderr)
        return 1
    print("health-gate: ok (config, agent, docker" + (", gpus" if os_release_value("VARIANT_ID") == "nvidia" else "")
          + ")")
    return 0
