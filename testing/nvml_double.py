"""An NVML test double: the real pynvml bindings load a small fake libnvidia-ml.so.1.

build_fake_nvml() compiles fake_nvml.c (shipped next to this module) with gcc; write_config()
describes the GPUs it reports; env_for() gives the environment that makes a child process load
it. pynvml loads the library once per process, so each scenario runs in its own process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("fake_nvml.c")
LIBRARY_NAME = "libnvidia-ml.so.1"  # the exact name pynvml passes to ctypes.CDLL
CONFIG_ENV = "GARAGE_FAKE_NVML_CONFIG"


@dataclass(frozen=True)
class FakeGPU:
    name: str
    uuid: str
    total_mib: int
    free_mib: int
    cc: tuple[int, int] = (8, 9)
    # None: the card answers NVML_ERROR_NOT_SUPPORTED for this reading.
    temp: int | None = 45
    power_w: float | None = 80.0
    util: int | None = 0
    # True (or 1): every query on this GPU answers NVML_ERROR_GPU_IS_LOST (fallen off the
    # bus); another number: that NVML error code (e.g. 999, NVML_ERROR_UNKNOWN) on this GPU.
    fail: bool | int = False
    # The PCI address NVML reports ("00000000:01:00.0"); None: GPU i sits on bus i+1.
    bus_id: str | None = None
    # (min, max, default) power limit in watts; None: the card does not allow power limits.
    power_limits: tuple[int, int, int] | None = None
    # A critical Xid: delivered once to a waiting event set whenever the value written changes.
    xid: int = 0

    def line(self) -> str:
        """One line of the fake's config (format documented at the top of fake_nvml.c)."""
        power_mw = None if self.power_w is None else round(self.power_w * 1000)
        fields = [self.name, self.uuid, self.total_mib, self.free_mib, *self.cc,
                  self.temp, power_mw, self.util, int(self.fail)]
        if self.bus_id is not None:
            fields.append(self.bus_id)
        if self.power_limits is not None:
            fields.append("plimit=" + ":".join(str(w * 1000) for w in self.power_limits))
        if self.xid:
            fields.append(f"xid={self.xid}")
        text = ["-" if f is None else str(f) for f in fields]
        if any("|" in t or "\n" in t for t in text):
            raise ValueError(f"'|' and newlines cannot appear in a fake GPU field: {self}")
        return "|".join(text)


# Usable VRAM as NVML reports it on these cards (a little under the marketing size).
RTX_4090 = FakeGPU("NVIDIA GeForce RTX 4090", "GPU-4090aaaa-0000-4000-8000-000000000001",
                   24564, 23900, temp=41, power_w=28.5, util=0)
RTX_4060 = FakeGPU("NVIDIA GeForce RTX 4060", "GPU-4060bbbb-0000-4000-8000-000000000002",
                   8188, 7800, temp=38, power_w=12.0, util=3)
RTX_3060_12GB = FakeGPU("NVIDIA GeForce RTX 3060", "GPU-3060cccc-0000-4000-8000-000000000003",
                        12288, 11900, cc=(8, 6), temp=44, power_w=17.2, util=0)
RTX_4060_TI_16GB = FakeGPU("NVIDIA GeForce RTX 4060 Ti", "GPU-4060dddd-0000-4000-8000-000000000004",
                           16380, 15900, temp=40, power_w=9.8, util=1)


def build_fake_nvml(dest_dir: Path) -> Path:
    """Compile the fake into dest_dir/libnvidia-ml.so.1 unless it is up to date; return dest_dir."""
    dest_dir = Path(dest_dir)
    lib = dest_dir / LIBRARY_NAME
    if lib.exists() and lib.stat().st_mtime >= SOURCE.stat().st_mtime:
        return dest_dir
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc is needed to build the fake libnvidia-ml.so.1 but is not installed")
    dest_dir.mkdir(parents=True, exist_ok=True)
    # Build to a temporary name and rename, so a parallel test never loads a half-written file.
    fd, tmp = tempfile.mkstemp(prefix=".fake-nvml-", suffix=".so", dir=dest_dir)
    os.close(fd)
    try:
        subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-Wall", f"-Wl,-soname,{LIBRARY_NAME}",
                        "-o", tmp, str(SOURCE)], check=True, capture_output=True, text=True)
        os.replace(tmp, lib)
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"building the fake NVML failed:\n{err.stderr}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest_dir


def write_config(path: Path, gpus: list[FakeGPU], driver: tuple[str, str] | None = None) -> Path:
    """Write the GPUs the fake reports; an empty list is a driver with zero GPUs.

    driver: (version, CUDA "major.minor") the driver reports, e.g. ("535.261.03", "12.2");
    None keeps the fake's default, 550.54.14 with CUDA 12.4.
    """
    path = Path(path)
    head = ""
    if driver is not None:
        major, minor = (int(x) for x in driver[1].split("."))
        head = f"driver|{driver[0]}|{major * 1000 + minor * 10}\n"  # NVML's encoding of CUDA versions
    # Renamed over, not rewritten: the fake re-reads the file of a running process when it
    # changes, and must never see half of it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(head + "".join(g.line() + "\n" for g in gpus))
    os.replace(tmp, path)
    return path


def power_limits_set(config_path: Path) -> dict[int, float]:
    """The power limits (watts, by GPU index) the fake's "driver" holds for this config: what
    a process set through nvmlDeviceSetPowerManagementLimit, kept after it exits."""
    limits = Path(f"{config_path}.limits")
    if not limits.exists():
        return {}
    out = {}
    for line in limits.read_text().splitlines():
        index, mw = line.split("|")
        out[int(index)] = int(mw) / 1000
    return out


def env_for(lib_dir: Path, config_path: Path) -> dict[str, str]:
    """Environment entries that make a child process's pynvml load the fake with this config.

    Merge into os.environ. LD_LIBRARY_PATH comes before the ld.so cache, so the fake wins
    even on a machine that has the real library.
    """
    inherited = os.environ.get("LD_LIBRARY_PATH")
    search = str(lib_dir) if not inherited else f"{lib_dir}{os.pathsep}{inherited}"
    return {"LD_LIBRARY_PATH": search, CONFIG_ENV: str(config_path)}
