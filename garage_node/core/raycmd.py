"""Ray pieces that the head and the nodes share: the versions that must match across a region,
the environment Ray runs in, label syntax and sizing arguments.

Nothing here imports ray (it would cost the agent hundreds of MB): Ray runs as a child process.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from garage_node.core.wire import Versions

MiB = 1024 * 1024

# Ray refuses a node whose Python differs from the head's even in the patch level (3.11.2 on a
# Debian node against 3.11.7 on a head) unless told to compare major.minor only, which is
# what garage-node checks itself (Versions.mismatch) and what pickles need.
#
# RAY_gcs_rpc_server_reconnect_timeout_s: how long a raylet keeps trying to reach a GCS that went
# away before it gives up and exits (Ray's default: 60 s). The head's GCS keeps its state in
# Redis (head/gcs.py), so a head that comes back after a crash, an upgrade or a reboot finds
# the same cluster and the PC's raylet carries on with its node id; 10 minutes covers a
# reboot of the head. A head that came back with a new cluster still makes the raylet exit
# when it reaches it (it checks the cluster id): the longer wait never keeps a raylet in the
# wrong cluster, it only keeps one waiting for a head that is down.
RAY_ENV = {
    "RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL": "minor",
    "RAY_gcs_rpc_server_reconnect_timeout_s": "600",
}


def local_versions() -> Versions:
    try:
        ray_version = metadata.version("ray")
    except metadata.PackageNotFoundError:
        ray_version = "not installed"
    return Versions(ray=ray_version, python=f"{sys.version_info.major}.{sys.version_info.minor}")


def ray_env() -> dict[str, str]:
    return {**os.environ, **RAY_ENV}


def ray_executable(configured: str) -> str:
    # The `ray` of our own venv, so node and agent share one pinned version.
    return configured or str(Path(sys.executable).with_name("ray"))


def label_value(text: str) -> str:
    """Ray labels follow Kubernetes syntax: ≤63 of [A-Za-z0-9_.-], alphanumeric at both ends."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-_.")
    return cleaned[:63].rstrip("-_.") or "none"


def sizing_args(num_cpus: int, memory_mib: int, object_store_mib: int) -> list[str]:
    args = []
    if num_cpus:
        args += ["--num-cpus", str(num_cpus)]
    if memory_mib:
        args += ["--memory", str(memory_mib * MiB)]
    if object_store_mib:
        args += ["--object-store-memory", str(object_store_mib * MiB)]
    return args


@dataclass(frozen=True)
class RayPorts:
    """Every port Ray listens on, pinned, so the firewall can name them (core/firewall.py).

    Ray binds them on all addresses whatever `--node-ip-address` says (that only sets the
    address it advertises); the firewall lets them be reached through WireGuard alone.
    """

    gcs: int = 6379  # the head's GCS (`--port`)
    client_server: int = 10001  # the head's Ray client server
    node_manager: int = 6380
    object_manager: int = 6381
    metrics_export: int = 6382
    dashboard_agent_grpc: int = 6383
    dashboard_agent_listen: int = 6384
    runtime_env_agent: int = 6385
    min_worker: int = 10002
    max_worker: int = 10999  # one port per Ray worker process; a PC runs a handful

    def node_args(self) -> list[str]:
        """Arguments of `ray start` for the ports every Ray node has (head and workers)."""
        return [
            "--node-manager-port", str(self.node_manager),
            "--object-manager-port", str(self.object_manager),
            "--metrics-export-port", str(self.metrics_export),
            "--dashboard-agent-grpc-port", str(self.dashboard_agent_grpc),
            "--dashboard-agent-listen-port", str(self.dashboard_agent_listen),
            "--runtime-env-agent-port", str(self.runtime_env_agent),
            "--min-worker-port", str(self.min_worker),
            "--max-worker-port", str(self.max_worker),
        ]

    def head_args(self) -> list[str]:
        # No --ray-client-server-port: our minimal Ray has no client server (it needs ray[client]);
        # its default port stays in ranges() in case a head installs it.
        return ["--port", str(self.gcs), *self.node_args()]

    def ranges(self) -> list[tuple[int, int]]:
        """All of Ray's TCP ports as (first, last) ranges."""
        singles = sorted({self.gcs, self.client_server, self.node_manager, self.object_manager, self.metrics_export,
                          self.dashboard_agent_grpc, self.dashboard_agent_listen, self.runtime_env_agent})
        out: list[tuple[int, int]] = []
        for p in singles:
            if out and out[-1][1] + 1 == p:
                out[-1] = (out[-1][0], p)
            else:
                out.append((p, p))
        return out + [(self.min_worker, self.max_worker)]


RAY_PORTS = RayPorts()
