"""The CUDA gate: does the engine image's CUDA run on this node's NVIDIA driver?

NVIDIA's rules (CUDA compatibility guide): a driver runs images built on its own CUDA major
version or older. A newer minor version of the same major runs too ("minor version
compatibility", from the driver each major names below), except for PTX that must be
JIT-compiled, which vLLM's images do not need for the GPUs they ship kernels for. A newer major
never runs: CUDA 13 needs driver 580. Debian bookworm's 535 reports CUDA 12.2, so it runs
CUDA 12.x images and refuses CUDA 13 ones.

A pairing that cannot work is refused at once with what to do, instead of an engine that
crashes on start, again and again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

CudaVersion = tuple[int, int]
DriverVersion = tuple[int, ...]

# The oldest driver that runs any CUDA <major>.x image (minor version compatibility).
MIN_DRIVER_FOR_MAJOR: dict[int, DriverVersion] = {11: (450, 80, 2), 12: (525, 60, 13), 13: (580, 65, 6)}
# Where an image states its CUDA: our own label first (a builder can set it), then what
# NVIDIA's CUDA base images (which vLLM's build on) put in the environment.
LABEL = "garage-node.cuda"


class CudaMismatch(Exception):
    """The image's CUDA cannot run on this driver; the message says what to do."""


def parse_cuda(text: object) -> CudaVersion:
    """"12.8" or "12.8.1" -> (12, 8); ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError(text)
    m = re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.\d+)?\s*", text)
    if m is None:
        raise ValueError(text)
    return int(m.group(1)), int(m.group(2))


def parse_driver(text: object) -> DriverVersion:
    """"535.261.03" -> (535, 261, 3); ValueError otherwise."""
    if not isinstance(text, str) or not re.fullmatch(r"\d+(\.\d+){0,2}", text.strip()):
        raise ValueError(text)
    return tuple(int(p) for p in text.strip().split("."))


def fmt(version: tuple[int, ...]) -> str:
    return ".".join(str(p) for p in version)


def fmt_driver(version: DriverVersion) -> str:
    # Drivers are written 535.261.03: the third part has two digits.
    return ".".join(f"{p:02d}" if i == 2 else str(p) for i, p in enumerate(version))


@dataclass(frozen=True)
class ImageCuda:
    version: CudaVersion
    source: str  # where it was read, for messages: 'label garage-node.cuda', 'env CUDA_VERSION'


def image_cuda(env: Sequence[str], labels: Mapping[str, str]) -> ImageCuda | None:
    """The CUDA version an image is built on, from its config; None when it states none."""
    if LABEL in labels:
        try:
            return ImageCuda(parse_cuda(labels[LABEL]), f"label {LABEL}")
        except ValueError:
            pass
    values = dict(e.split("=", 1) for e in env if "=" in e)
    if "CUDA_VERSION" in values:
        try:
            return ImageCuda(parse_cuda(values["CUDA_VERSION"]), "env CUDA_VERSION")
        except ValueError:
            pass
    # "cuda>=12.8 brand=tesla,driver>=470,driver<471 ..."
    m = re.search(r"cuda>=(\d+\.\d+)", values.get("NVIDIA_REQUIRE_CUDA", ""))
    if m:
        return ImageCuda(parse_cuda(m.group(1)), "env NVIDIA_REQUIRE_CUDA")
    return None


def check(image: str, cuda: CudaVersion, driver_version: str | None, driver_cuda: str | None,
          source: str = "") -> str:
    """'' when the image's CUDA runs on this driver, or a note (minor version compatibility);
    raises CudaMismatch with what to do when it cannot. An unknown driver passes: NVML said
    nothing, and the engine's own error will."""
    if not driver_cuda:
        return ""
    try:
        have = parse_cuda(driver_cuda)
    except ValueError:
        return ""
    drv = _driver(driver_version)
    where = f" ({source})" if source else ""
    what_driver = f"NVIDIA driver {driver_version}" if driver_version else "NVIDIA driver"
    if cuda[0] > have[0]:
        need = MIN_DRIVER_FOR_MAJOR.get(cuda[0])
        need_text = f"; CUDA {cuda[0]} needs driver >= {fmt_driver(need)}" if need else ""
        raise CudaMismatch(
            f"engine image {image} is built on CUDA {fmt(cuda)}{where}, but this node's {what_driver} "
            f"supports CUDA up to {fmt(have)}{need_text}. Boot a garage-node stick with a newer driver, "
            f"or set [engine] image to a vLLM image built on CUDA {have[0]}.x")
    if cuda[0] == have[0] and cuda[1] > have[1]:
        need = MIN_DRIVER_FOR_MAJOR.get(cuda[0])
        if need and drv and drv < need:
            raise CudaMismatch(
                f"engine image {image} is built on CUDA {fmt(cuda)}{where}; this node's {what_driver} "
                f"supports CUDA {fmt(have)}, and runs newer CUDA {cuda[0]}.x images only from driver "
                f"{fmt_driver(need)} on. Boot a garage-node stick with a newer driver, or set [engine] image "
                f"to a vLLM image built on CUDA {fmt(have)} or older")
        return (f"CUDA {fmt(cuda)} image on a CUDA {fmt(have)} driver: runs through minor version "
                "compatibility (no PTX JIT)")
    return ""


def check_driver(image: str, min_driver: DriverVersion, driver_version: str | None) -> None:
    """The catalog's minimum driver for an image (raises CudaMismatch)."""
    drv = _driver(driver_version)
    if drv is not None and drv < min_driver:
        raise CudaMismatch(
            f"engine image {image} needs NVIDIA driver >= {fmt_driver(min_driver)}, this node has {driver_version}. "
            "Boot a garage-node stick with a newer driver, or set [engine] image to an image this driver runs")


def _driver(text: str | None) -> DriverVersion | None:
    try:
        return parse_driver(text) if text else None
    except ValueError:
        return None
