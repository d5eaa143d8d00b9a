"""The A/B stick's health gate (issue #19): is this boot good enough to keep?

`garage-node health-gate` runs from garage-boot-check.service, which boot-complete.target
requires: systemd-bless-boot marks the boot good (strips the UKI's try counter) only when it
passes. A version whose boots never pass runs out of tries, and systemd-boot falls back to the
other one by itself.

It judges the PC alone, never its network: a home network that is down, or a head that is
unreachable, is not a bad boot (seapath/meta-seapath#287 rolled back for an unplugged cable).
The checks:

- `config`: garage.toml (over node.toml) is valid, as the agent reads it;
- `agent`: the agent answers on its local socket (it runs, whatever its state with the head);
- `docker`: the Docker daemon answers /_ping on its socket;
- `gpus` (the nvidia variant): NVML sees at least as many GPUs as on the last boot that passed,
  kept in <state_dir>/`GPUS_FILE` (a new driver that lost the GPU is a bad version);
- `test-fail`: test builds only: the file `TEST_FAIL` in the root makes the gate fail, so the
  image tests can build a version that must roll back. No release build puts it there.

The agent may need tens of seconds to come up after boot, so the gate retries every few seconds
until `wait_s` has passed, and then reports each check that still fails (one line each, in the
journal through stderr).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from garage_node.core.fsutil import write_private
from garage_node.node.config import NodeConfig, load_node_config

log = logging.getLogger(__name__)

TEST_FAIL = Path("/usr/lib/garage-node/test-fail-health-gate")
GPUS_FILE = "blessed-gpus.json"
WAIT_S = 90.0
EVERY_S = 3.0


@dataclass(frozen=True)
class Check:
    name: str
    why: str | None  # None: passed


@dataclass
class Probes:
    """How each check looks at the PC; the defaults are the real ones."""

    load_config: Callable[[], NodeConfig]
    agent: Callable[[NodeConfig], str | None] = lambda cfg: agent_answers(cfg)
    docker: Callable[[NodeConfig], str | None] = lambda cfg: docker_answers(cfg)
    gpus_seen: Callable[[], tuple[int, str | None]] = lambda: nvml_gpus()
    variant: str | None = None
    test_fail: Path = TEST_FAIL


def agent_answers(cfg: NodeConfig) -> str | None:
    from garage_node.core.wire import WireError
    from garage_node.node.localapi import AgentClient, AgentDown

    try:
        with AgentClient(cfg.socket_path) as c:
            c.status()
    except (AgentDown, WireError) as e:
        return f"the agent does not answer on {cfg.socket_path} ({str(e)[:200]})"
    return None


def docker_answers(cfg: NodeConfig) -> str | None:
    from garage_node.node.engine.docker import Docker, DockerError

    d = Docker(cfg.engine.docker_socket, timeout=5.0)
    try:
        d.ping()
    except DockerError as e:
        return str(e)[:300]
    finally:
        d.close()
    return None


def nvml_gpus() -> tuple[int, str | None]:
    """(GPUs NVML lists, why NVML could not be used or None)."""
    from garage_node.node import gpu

    inv = gpu.read_inventory()
    return len(inv.gpus), inv.nvml_error


def checks(p: Probes) -> list[Check]:
    """Every check once; the config first, as the others read it."""
    out: list[Check] = []
    if p.test_fail.exists():
        out.append(Check("test-fail", f"{p.test_fail} exists: a test build whose health gate is made to fail"))
    try:
        cfg = p.load_config()
    except Exception as e:  # ConfigError, or the file unreadable: both a bad boot
        return [*out, Check("config", f"garage.toml is not valid: {str(e)[:300]}")]
    out.append(Check("config", None))
    out.append(Check("agent", p.agent(cfg)))
    out.append(Check("docker", p.docker(cfg)))
    if p.variant == "nvidia":
        out.append(Check("gpus", _gpus_why(p, cfg.node.state_dir)))
    return out


def _gpus_why(p: Probes, state_dir: Path) -> str | None:
    seen, error = p.gpus_seen()
    before = blessed_gpus(state_dir)
    if before is None or seen >= before:
        return None
    return (f"NVML sees {seen} GPU(s) but {before} on the last good boot"
            f"{f' ({error[:200]})' if error else ''}: the driver of this version does not see this PC's GPUs")


def blessed_gpus(state_dir: Path) -> int | None:
    try:
        return int(json.loads((state_dir / GPUS_FILE).read_text())["gpus"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run(p: Probes, wait_s: float = WAIT_S, every_s: float = EVERY_S,
        clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> list[Check]:
    """The checks, again every `every_s` until they all pass or `wait_s` has passed; the failed
    ones of the last round (empty: the boot is good). A test build's fail file is not waited on."""
    deadline = clock() + wait_s
    while True:
        failed = [c for c in checks(p) if c.why is not None]
        if not failed or any(c.name == "test-fail" for c in failed) or clock() >= deadline:
            break
        sleep(every_s)
    if not failed and p.variant == "nvidia":
        _record_gpus(p)
    return failed


def _record_gpus(p: Probes) -> None:
    """What the next version's boots must see at least: this good boot's GPUs."""
    try:
        cfg = p.load_config()
        seen, _ = p.gpus_seen()
        write_private(cfg.node.state_dir / GPUS_FILE, (json.dumps({"gpus": seen}) + "\n").encode(), mode=0o644)
    except Exception as e:  # the gate passed: a record that could not be written does not change that
        log.warning("could not record the GPUs of this boot: %s", e)


def probes(config: Path | None, override: Path | None, variant: str | None) -> Probes:
    return Probes(load_config=lambda: load_node_config(config, override), variant=variant)
