"""Ray, as seen from garage-node: the command lines of the Ray head and a Ray worker, the
versions that must match, and a probe of which nodes the Ray head holds alive.

The agent never imports ray (it would cost hundreds of MB): Ray runs as a supervised child
(`ray start --block`), and the probe runs in a short-lived child process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .gpu import Inventory

# Ray's GCS needs a port outside its default worker port range (10002-19999).
DEFAULT_PORT = 6379
MiB = 1024 * 1024


@dataclass(frozen=True)
class Versions:
    ray: str
    python: str  # major.minor: Ray's wire protocol and pickles need the same on every node

    def mismatch(self, head: "Versions") -> str | None:
        problems = []
        if self.ray != head.ray:
            problems.append(f"Ray {self.ray} here but the head runs Ray {head.ray}")
        if self.python != head.python:
            problems.append(f"Python {self.python} here but the head runs Python {head.python}")
        if not problems:
            return None
        return "; ".join(problems) + f". Install ray=={head.ray} on Python {head.python} (the head's versions)."


def local_versions() -> Versions:
    try:
        ray_version = metadata.version("ray")
    except metadata.PackageNotFoundError:
        ray_version = "not installed"
    return Versions(ray=ray_version, python=f"{sys.version_info.major}.{sys.version_info.minor}")


# Ray refuses a node whose Python differs from the head's even in the patch level (3.11.2 on a
# Debian node against 3.11.7 on a head) unless told to compare major.minor only, which is
# what garage-node checks itself (Versions.mismatch) and what pickles need.
RAY_ENV = {"RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL": "minor"}


def ray_env() -> dict[str, str]:
    return {**os.environ, **RAY_ENV}


def ray_executable(configured: str) -> str:
    # The `ray` of our own venv, so node and agent share one pinned version.
    return configured or str(Path(sys.executable).with_name("ray"))


def ray_worker_command(configured: str) -> list[str]:
    """`ray` for a node: our own venv's Ray through garage_node.raystart, which keeps the
    raylet from giving up on agents that start slowly (see that module); a configured
    command is used as it is."""
    if configured:
        return [configured]
    return [sys.executable, "-m", "garage_node.raystart"]


def label_value(text: str) -> str:
    """Ray labels follow Kubernetes syntax: ≤63 of [A-Za-z0-9_.-], alphanumeric at both ends."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-_.")
    return cleaned[:63].rstrip("-_.") or "none"


def _sizing_args(num_cpus: int, memory_mib: int, object_store_mib: int) -> list[str]:
    args = []
    if num_cpus:
        args += ["--num-cpus", str(num_cpus)]
    if memory_mib:
        args += ["--memory", str(memory_mib * MiB)]
    if object_store_mib:
        args += ["--object-store-memory", str(object_store_mib * MiB)]
    return args


def head_argv(ray_cmd: str, ip: str, port: int, temp_dir: Path, region: str,
              num_cpus: int = 0, memory_mib: int = 0, object_store_mib: int = 0) -> list[str]:
    return [
        ray_cmd, "start", "--head", "--block",
        "--node-ip-address", ip, "--port", str(port),
        "--temp-dir", str(temp_dir),
        "--include-dashboard=false", "--disable-usage-stats",
        "--labels", f"garage.role=head,garage.region={label_value(region)}",
        *_sizing_args(num_cpus, memory_mib, object_store_mib),
    ]


def worker_labels(node_id: str, region: str, inventory: Inventory, model: str | None = None) -> dict[str, str]:
    healthy = inventory.healthy_gpus
    labels = {
        "garage.node_id": label_value(node_id),
        "garage.region": label_value(region),
        "garage.gpu": label_value(healthy[0].name) if healthy else "none",
        "garage.gpu_count": str(len(healthy)),
    }
    if model:
        labels["garage.model"] = label_value(model)
    return labels


def worker_argv(ray_cmd: list[str], head_address: str, ip: str, temp_dir: Path, labels: dict[str, str],
                inventory: Inventory, num_cpus: int = 0, memory_mib: int = 0,
                object_store_mib: int = 0) -> list[str]:
    argv = [
        *ray_cmd, "start", "--block",
        "--address", head_address,
        "--node-ip-address", ip,
        "--temp-dir", str(temp_dir),
        "--disable-usage-stats",
        # Count only the GPUs NVML calls healthy; a bad GPU is quarantined, not scheduled.
        "--num-gpus", str(len(inventory.healthy_gpus)),
        "--labels", ",".join(f"{k}={v}" for k, v in sorted(labels.items())),
        *_sizing_args(num_cpus, memory_mib, object_store_mib),
    ]
    if inventory.vram_mib:
        argv += ["--resources", json.dumps({"vram_mib": inventory.vram_mib})]
    return argv


@dataclass(frozen=True)
class RayNode:
    ray_node_id: str
    address: str
    alive: bool
    is_head: bool
    labels: dict[str, str]
    resources: dict[str, float]


def probe(address: str, python: str = sys.executable, timeout_s: float = 20.0) -> list[RayNode]:
    """Nodes the Ray head's GCS knows, read in a child process (keeps ray out of our memory)."""
    res = subprocess.run(
        [python, "-m", "garage_node.rayprobe", address],
        capture_output=True, text=True, timeout=timeout_s,
    )
    if res.returncode != 0:
        raise RuntimeError(f"Ray head at {address} did not answer: {res.stderr.strip().splitlines()[-1:] or '?'}")
    return [RayNode(**n) for n in json.loads(res.stdout)]
