"""The head's Ray: its command line, and the watch of which nodes the Ray head holds alive."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from garage_node.core.raycmd import RayPorts, label_value, sizing_args


def head_argv(ray_cmd: str, ip: str, ports: RayPorts, temp_dir: Path, region: str,
              num_cpus: int = 0, memory_mib: int = 0, object_store_mib: int = 0) -> list[str]:
    return [
        ray_cmd, "start", "--head", "--block",
        "--node-ip-address", ip, *ports.head_args(),
        "--temp-dir", str(temp_dir),
        "--include-dashboard=false", "--disable-usage-stats",
        "--labels", f"garage.role=head,garage.region={label_value(region)}",
        *sizing_args(num_cpus, memory_mib, object_store_mib),
    ]


@dataclass(frozen=True)
class RayNode:
    ray_node_id: str
    address: str
    alive: bool
    is_head: bool
    labels: dict[str, str]
    resources: dict[str, float]


def watch_command(address: str, every_s: float, python: str = sys.executable) -> list[str]:
    """The long-lived membership watch the head keeps running (see rayprobe.py)."""
    return [python, "-m", "garage_node.head.rayprobe", "--watch", str(every_s), address]


def parse_watch_line(line: str) -> list[RayNode] | None:
    """One line of the watch: the nodes, or None when the Ray head could not be asked."""
    data = json.loads(line)
    if isinstance(data, dict):
        return None
    return [RayNode(**n) for n in data]
