"""`garage-node update approve VERSION`: the owner's yes to one OS version, for a PC whose
garage.toml says [update] when = "ask" (node/update.py reads it); `garage-node update install
VERSION [--from DIR]`: install one now, by hand, with the agent's own installer (node/install.py),
from the head or from a release directory on this PC; and `garage-node health-gate`, the A/B
stick's boot check (node/healthgate.py) that garage-boot-check.service runs."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

from garage_node.node.config import load_node_config

HELP = ('`update approve VERSION`: allow one OS version on this PC when garage.toml says [update] when = "ask" '
        "(the version the head named; `garage-node status` shows it). `update install VERSION [--from DIR]`: "
        "install it now, whatever the [update] policy, from the head or from a release directory on this PC, "
        "with the same checks (the operator's signature, every file's sum, this stick's variant); then reboot")


HEALTH_HELP = ("judge this boot of the A/B stick: exit 0 when garage.toml is valid, the agent answers, Docker answers "
               "and (nvidia) NVML sees the GPUs of the last good boot; never judges the network. What "
               "garage-boot-check.service runs before boot-complete.target")


def add_command(cmd: Callable[..., argparse.ArgumentParser]) -> None:
    u = cmd("update", update, HELP)
    u.add_argument("action", choices=["approve", "install"])
    u.add_argument("version", help="the version, e.g. 2026.12.1")
    u.add_argument("--from", dest="release_dir", type=Path, metavar="DIR",
                   help="install: a release directory (what build-image.sh writes) instead of the head")
    u.add_argument("--no-reboot", action="store_true",
                   help="install: do not reboot afterwards (the new version starts at the next boot)")
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
        print(f"garage-node update {args.action}: {e}", file=sys.stderr)
        return 2
    if args.action == "install":
        return install(cfg, version, args.release_dir, reboot=not args.no_reboot)
    up.approve(cfg.node.state_dir, version)
    note = "" if cfg.update.when == "ask" else (f' (garage.toml says [update] when = "{cfg.update.when}", so no '
                                                "approval is needed)")
    print(f"approved {version}: this PC installs it when the head names it and the current boot is confirmed "
          f"good{note}")
    return 0


def install(cfg: Any, version: str, release_dir: Path | None, *, reboot: bool) -> int:
    """The agent's installer, by hand. Refused releases are recorded as the agent records them
    (status and the head see why; the agent does not try that version again)."""
    from garage_node.node import identity
    from garage_node.node import install as inst
    from garage_node.node import update as up
    from garage_node.node.paths import StatePaths
    from garage_node.node.weights import head_source

    missing = up.installer_missing()
    if missing is not None:
        print(f"garage-node update install: {version} cannot be installed here: {missing}", file=sys.stderr)
        return 2
    boot = up.boot_facts()
    if boot.blessed is False:
        print(f"garage-node update install: the current boot is not confirmed good yet ({boot.tries_left} tries "
              "left): an update now could overwrite the only version known to boot; wait for it", file=sys.stderr)
        return 2
    paths = StatePaths(cfg.node.state_dir)
    if release_dir is not None:
        source = inst.dir_source(release_dir)
    else:
        ident = identity.load(paths)
        if ident is None or ident.revoked:
            print("garage-node update install: this PC has not joined a region (no head to fetch from): give "
                  "--from DIR", file=sys.stderr)
            return 2
        source = head_source(lambda: ident, paths.head_ca.read_bytes())
    installer = inst.Installer(source, up.os_release_value("VARIANT_ID"))
    record_path = cfg.node.state_dir / "update.json"
    shown = [-10]

    def progress(pct: int) -> None:
        if pct >= shown[0] + 10 or pct == 100:
            shown[0] = pct
            print(f"  {version}: {pct}% downloaded and checked", flush=True)

    try:
        installer.install(installer.fetch(version, progress))
    except inst.InstallError as e:
        up.save_record(record_path, up.load_record(record_path).failed(version, str(e), time.time(),
                                                                       final=not e.retry))
        print(f"garage-node update install: {'failed' if e.retry else 'refused'}: {e}", file=sys.stderr)
        return 1
    finally:
        source.close()
    up.save_record(record_path, up.load_record(record_path).started(version, time.time(), up.current_boot_id()))
    print(f"{version} is installed in the other slot with 3 tries; "
          + ("rebooting into it" if reboot else "it starts at the next reboot"))
    if reboot:
        try:
            inst.reboot()
        except inst.InstallError as e:
            print(f"garage-node update install: {e}", file=sys.stderr)
            return 1
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
