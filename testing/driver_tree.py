"""A fake NVIDIA driver on the host, as files under a root: what garage_node.node.engine.nvidia
reads (/proc/driver/nvidia/gpus/<bus id>/information, /dev/nvidia*, the driver's libraries in
Debian's layout), for machines without an NVIDIA GPU.

Unit tests use plain files for the device nodes; the Docker test makes real character devices
with mknod (Docker's device list needs them) and a stub libcuda.so.1 compiled here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from garage_node.node.engine.nvidia import OPTIONAL_LIBRARIES, REQUIRED_LIBRARIES

LIB_DIR = "usr/lib/x86_64-linux-gnu/nvidia/current"  # Debian's driver 535 layout
DRIVER = "535.261.03"
# Character device numbers as the real driver uses them (195: nvidia; uvm's is dynamic).
NVIDIA_MAJOR, UVM_MAJOR = 195, 510
CONTROL_NODES = {"nvidiactl": (NVIDIA_MAJOR, 255), "nvidia-modeset": (NVIDIA_MAJOR, 254),
                 "nvidia-uvm": (UVM_MAJOR, 0), "nvidia-uvm-tools": (UVM_MAJOR, 1)}
STUB_LIBCUDA_C = """
/* A stand-in for the driver's libcuda.so.1: cuInit answers success, and a symbol says which
   library the loader found. */
int cuInit(unsigned int flags) { (void)flags; return 0; }
const char *garage_libcuda_origin(void) { return "%s"; }
"""


@dataclass(frozen=True)
class DriverGPU:
    bus_id: str  # as /proc/driver/nvidia/gpus names it: "0000:0a:00.0"
    minor: int  # its /dev/nvidiaN
    model: str = "NVIDIA GeForce RTX 4090"


def make_driver_tree(root: Path, gpus: list[DriverGPU], *, mknod: bool = False, libcuda: Path | None = None,
                     skip_nodes: tuple[str, ...] = (), skip_libraries: tuple[str, ...] = ()) -> Path:
    """Write a fake driver under root and return root. mknod: real character devices (root
    only); libcuda: a built library to install as libcuda.so.1 (else an empty file)."""
    root = Path(root)
    for g in gpus:
        info = root / "proc/driver/nvidia/gpus" / g.bus_id / "information"
        info.parent.mkdir(parents=True, exist_ok=True)
        # The real file's layout: "Key: \t value" lines.
        info.write_text(f"Model: \t\t {g.model}\nIRQ:   \t\t 150\nGPU UUID: \t GPU-fake-{g.minor}\n"
                        f"Bus Type: \t PCIe\nBus Location: \t {g.bus_id}\nDevice Minor: \t {g.minor}\n"
                        "GPU Excluded:\t No\n")
    (root / "proc/driver/nvidia").mkdir(parents=True, exist_ok=True)
    (root / "proc/driver/nvidia/version").write_text(f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {DRIVER}\n")
    nodes = {f"nvidia{g.minor}": (NVIDIA_MAJOR, g.minor) for g in gpus} | CONTROL_NODES
    (root / "dev").mkdir(parents=True, exist_ok=True)
    for name, (major, minor) in nodes.items():
        if name in skip_nodes:
            continue
        path = root / "dev" / name
        if mknod:
            os.mknod(path, 0o666 | 0o020000, os.makedev(major, minor))  # S_IFCHR
        else:
            path.write_text("")
    libs = root / LIB_DIR
    libs.mkdir(parents=True, exist_ok=True)
    for soname in REQUIRED_LIBRARIES + OPTIONAL_LIBRARIES:
        if soname in skip_libraries:
            continue
        # Debian's layout: the SONAME is a relative link to the versioned file.
        real = libs / f"{soname.rsplit('.so', 1)[0]}.so.{DRIVER}"
        if soname == "libcuda.so.1" and libcuda is not None:
            shutil.copyfile(libcuda, real)
        else:
            real.write_text("")
        (libs / soname).symlink_to(real.name)
    return root


def build_stub_libcuda(dest: Path, origin: str = "host-driver") -> Path:
    """Compile a libcuda.so.1 (SONAME libcuda.so.1) exporting cuInit and
    garage_libcuda_origin() -> origin; returns the library's path."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc is needed to build the stub libcuda.so.1 but is not installed")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    src = dest / f"stub-libcuda-{origin}.c"
    src.write_text(STUB_LIBCUDA_C % origin)
    out = dest / f"libcuda-{origin}.so.1"
    subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-Wall", "-Wl,-soname,libcuda.so.1", "-o", str(out), str(src)],
                   check=True, capture_output=True, text=True)
    return out
