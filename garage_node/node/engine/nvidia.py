"""The GPU reaches the engine container through the Docker Engine API alone.

NVIDIA's container toolkit (what `--gpus` and a `DeviceRequests` entry of driver "nvidia" call)
is in no repository our stick's builds reach, and Debian's docker.io 20.10 has no CDI. So the
agent does what the toolkit does for a compute container (libnvidia-container's list, for
driver 535): the chosen GPUs' `/dev/nvidiaN` plus the control and unified-memory nodes go into
`HostConfig.Devices`, and the driver's user-space libraries are bind-mounted read-only, each on
its SONAME, into one directory that `LD_LIBRARY_PATH` puts first. First matters: vLLM's images
register CUDA's forward-compatibility `libcuda` in their ld.so cache, which fails on GeForce
cards (error 804); the host's own `libcuda` must win.

Everything is read below `root` (/ on a node), so tests hand in a fake tree: device nodes,
`proc/driver/nvidia/gpus/<bus id>/information` and library directories.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

# Per GPU: /dev/nvidia<minor>. Besides them: the control node and unified memory are required
# by CUDA; uvm-tools (profilers) and modeset are passed when present, as the toolkit does.
REQUIRED_NODES = ("nvidiactl", "nvidia-uvm")
OPTIONAL_NODES = ("nvidia-uvm-tools", "nvidia-modeset")
# The compute libraries of the driver, by SONAME (libnvidia-container's compute set).
REQUIRED_LIBRARIES = ("libcuda.so.1", "libnvidia-ml.so.1")
OPTIONAL_LIBRARIES = ("libnvidia-ptxjitcompiler.so.1", "libnvidia-nvvm.so.4", "libnvidia-cfg.so.1",
                      "libnvidia-allocator.so.1")
# Extra names a library is mounted under: Triton links its launcher with -lcuda, which needs
# the unversioned name.
ALIASES = {"libcuda.so.1": ("libcuda.so",)}
# Searched in order, below root. Debian puts the driver in nvidia/current/ (the others are
# alternatives links to it); other distributions use the multiarch or lib64 directory.
LIBRARY_DIRS = ("usr/lib/x86_64-linux-gnu/nvidia/current", "usr/lib/x86_64-linux-gnu", "usr/lib64", "usr/lib")
# In the container: a directory no image uses, so nothing of the image is shadowed.
CONTAINER_LIB_DIR = "/usr/local/garage-nvidia/lib"
_PACKAGES = "libcuda1 and libnvidia-ml1 on Debian (the garage-node stick's nvidia variant has them)"


class DriverHostError(Exception):
    """The host's NVIDIA driver cannot give the engine a GPU; the message says what to do."""


@dataclass(frozen=True)
class Passthrough:
    """What the engine container gets of the host's driver: device nodes and libraries."""

    devices: tuple[tuple[str, str], ...]  # (path on the host, path in the container)
    libraries: tuple[tuple[str, str], ...]  # (file on the host, name in CONTAINER_LIB_DIR)
    lib_dir: str = CONTAINER_LIB_DIR

    def devices_body(self) -> list[dict[str, str]]:
        return [{"PathOnHost": host, "PathInContainer": inside, "CgroupPermissions": "rwm"}
                for host, inside in self.devices]

    def mounts(self) -> list[dict[str, Any]]:
        # Read-only: a container must never be able to replace the host's driver.
        return [{"Type": "bind", "Source": host, "Target": f"{self.lib_dir}/{name}", "ReadOnly": True}
                for host, name in self.libraries]

    def environment(self, image_env: Sequence[str], configured: Mapping[str, str]) -> dict[str, str]:
        """LD_LIBRARY_PATH with the driver's directory first, keeping what was there (the
        [engine] env's value, else the image's own); Triton told where libcuda is."""
        rest = configured.get("LD_LIBRARY_PATH") or env_value(image_env, "LD_LIBRARY_PATH") or ""
        parts = [self.lib_dir] + [p for p in rest.split(":") if p and p != self.lib_dir]
        # Triton asks `ldconfig -p` first, which lists the image's compat libcuda.
        return {"LD_LIBRARY_PATH": ":".join(parts), "TRITON_LIBCUDA_PATH": self.lib_dir}


def env_value(env: Sequence[str], key: str) -> str | None:
    """The value of KEY in a Docker-style ["KEY=value", ...] list (the last one wins, as in Docker)."""
    found = None
    for entry in env:
        k, sep, v = entry.partition("=")
        if sep and k == key:
            found = v
    return found


@dataclass(frozen=True)
class DriverHost:
    """The host's NVIDIA driver as the files below `root` show it."""

    root: Path = Path("/")
    library_dirs: tuple[str, ...] = LIBRARY_DIRS

    def _path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    @property
    def proc_gpus(self) -> Path:
        return self._path("proc/driver/nvidia/gpus")

    def passthrough(self, gpus: Sequence[tuple[int, str | None]]) -> Passthrough:
        """Devices and libraries for these GPUs, given as (NVML index, PCI bus id)."""
        if not self._path("proc/driver/nvidia").is_dir():
            raise DriverHostError(
                f"the NVIDIA kernel driver is not loaded ({self._path('proc/driver/nvidia')} does not exist): "
                "boot the garage-node stick's nvidia variant, or install and load the NVIDIA driver "
                '(or set [engine] device = "cpu")')
        minors = [self.gpu_minor(index, bus) for index, bus in gpus]
        nodes = [f"nvidia{m}" for m in minors] + list(REQUIRED_NODES)
        devices = [self._device(name, required=True) for name in nodes]
        devices += [d for name in OPTIONAL_NODES if (d := self._device(name, required=False))]
        return Passthrough(devices=tuple(d for d in devices if d), libraries=self.libraries())

    def gpu_minor(self, index: int, bus_id: str | None) -> int:
        """The /dev/nvidiaN minor of the GPU NVML numbers `index`: NVML's order is not the
        driver's, so read it from the GPU's information file, found by its PCI bus id."""
        if not bus_id:
            raise DriverHostError(f"NVML did not give GPU {index}'s PCI bus id, so its /dev/nvidiaN is unknown: "
                                  "check the driver with `nvidia-smi -q`, or pin the GPUs the engine may use")
        info = self.proc_gpus / bus_id / "information"
        try:
            text = info.read_text()
        except OSError as e:
            raise DriverHostError(f"cannot read {info} for GPU {index} ({e.strerror or e}): "
                                  "is the NVIDIA driver loaded for this GPU?") from None
        m = re.search(r"^Device Minor:\s*(\d+)\s*$", text, re.M)
        if m is None:
            raise DriverHostError(f"{info} has no 'Device Minor' line: an NVIDIA driver this agent does not know")
        return int(m.group(1))

    def _device(self, name: str, required: bool) -> tuple[str, str] | None:
        host = self._path(f"dev/{name}")
        if host.exists():
            return str(host), f"/dev/{name}"
        if not required:
            return None
        fix = "nvidia-modprobe -u -c=0" if name.startswith("nvidia-uvm") or name == "nvidiactl" \
            else f"nvidia-modprobe -c={name.removeprefix('nvidia')}"
        raise DriverHostError(f"{host} does not exist, and a container cannot create it: run `{fix}` on the "
                              "host (the garage-node stick does at boot, in garage-nvidia.service)")

    def libraries(self) -> tuple[tuple[str, str], ...]:
        """(real file, name) for each compute library found; the required ones must be."""
        found: list[tuple[str, str]] = []
        for soname in REQUIRED_LIBRARIES + OPTIONAL_LIBRARIES:
            path = self._find(soname)
            if path is None:
                if soname in REQUIRED_LIBRARIES:
                    dirs = ", ".join(str(self._path(d)) for d in self.library_dirs)
                    raise DriverHostError(f"the NVIDIA driver's {soname} is not installed (looked in {dirs}): "
                                          f"install {_PACKAGES}")
                continue
            for name in (soname,) + ALIASES.get(soname, ()):
                found.append((path, name))
        return tuple(found)

    def _find(self, soname: str) -> str | None:
        for d in self.library_dirs:
            candidate = self._path(d) / soname
            if candidate.exists():
                # The real file: Docker would bind-mount a dangling link's target otherwise
                # (alternatives links point into /etc/alternatives).
                return os.path.realpath(candidate)
        return None
