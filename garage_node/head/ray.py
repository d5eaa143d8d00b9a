"""The head's Ray: its command line, and the watch of which nodes the Ray head holds alive."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from garage_node.core.raycmd import RayPorts, label_value, sizing_args


# How fast the GCS declares a PC dead. A check waits for its answer up to the timeout, then the
# period, so a PC cut off is dead after about period + threshold x (timeout + period): Ray's
# defaults (3 s, 10 s, 5) gave 65 s measured; 2 s / 2 s / 5 still gave 19 s. Here 2 s / 1 s / 4:
# 14 s at worst, inside the 15 s in which the head calls a PC offline
# (HeadOptions.offline_after_s). 1 s is still 20-50 times a home link's round trip, and the
# check is a gRPC call the raylet answers off its main work, so a busy gaming PC is not called
# dead. 1,000 PCs make 500 checks/s, small work for the GCS (C++).
# Read by the GCS from its environment (Ray's RAY_<setting> convention).
HEALTH_CHECK_ENV = {
    "RAY_health_check_initial_delay_ms": "2000",
    "RAY_health_check_period_ms": "2000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "4",
}


def head_argv(ray_cmd: str, ip: str, ports: RayPorts, temp_dir: Path, region: str,
              num_cpus: int = 0, memory_mib: int = 0, object_store_mib: int = 0,
              redis_password: str = "") -> list[str]:
    """`redis_password`: the GCS keeps its state in the head's Redis (head/gcs.py; its address
    goes in the environment, RAY_REDIS_ADDRESS). Ray takes the password on this command line
    only (see docs/operating.md, Security)."""
    argv = [
        ray_cmd, "start", "--head", "--block",
        "--node-ip-address", ip, *ports.head_args(),
        "--temp-dir", str(temp_dir),
        "--include-dashboard=false", "--disable-usage-stats",
        "--labels", f"garage.role=head,garage.region={label_value(region)}",
        *sizing_args(num_cpus, memory_mib, object_store_mib),
    ]
    if redis_password:
        argv += ["--redis-password", redis_password]
    return argv


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


@dataclass(frozen=True)
class Membership:
    """One answer of the Ray head: its nodes, and the id of its Ray cluster (hex; "" if the
    probe could not tell). A Ray head that came back without its GCS state is a new cluster."""

    nodes: list[RayNode]
    cluster_id: str = ""


def garage_ids(nodes: list[RayNode]) -> tuple[set[str], set[str]]:
    """(alive, dead): the garage node ids with a live Ray node, and those whose Ray nodes are
    all dead (a PC whose worker restarted has its old node dead and the new one alive: alive)."""
    alive, seen = set(), set()
    for n in nodes:
        node_id = n.labels.get("garage.node_id", "")
        if n.is_head or not node_id:
            continue
        seen.add(node_id)
        if n.alive:
            alive.add(node_id)
    return alive, seen - alive


def parse_watch_line(line: str) -> Membership | None:
    """One line of the watch: the Ray head's answer, or None when it could not be asked."""
    data = json.loads(line)
    if "nodes" not in data:  # {"error": ...}
        return None
    cluster_id = data.get("cluster_id") or ""
    if not isinstance(cluster_id, str):
        raise TypeError("cluster_id is not a string")
    return Membership([RayNode(**n) for n in data["nodes"]], cluster_id)
