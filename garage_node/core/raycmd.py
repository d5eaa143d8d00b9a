"""Ray pieces that the head and the nodes share: the versions that must match across a region,
the environment Ray runs in, label syntax and sizing arguments.

Nothing here imports ray (it would cost the agent hundreds of MB): Ray runs as a child process.
"""

from __future__ import annotations

import os
import re
import sys
from importlib import metadata
from pathlib import Path

from garage_node.core.wire import Versions

MiB = 1024 * 1024

# Ray refuses a node whose Python differs from the head's even in the patch level (3.11.2 on a
# Debian node against 3.11.7 on a head) unless told to compare major.minor only, which is
# what garage-node checks itself (Versions.mismatch) and what pickles need.
RAY_ENV = {"RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL": "minor"}


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
