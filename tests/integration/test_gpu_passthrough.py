"""GPU passthrough on the real dockerd, without the NVIDIA container toolkit and without a GPU.

A fake driver under a test root: character devices made with mknod (/dev/nvidia0 and
/dev/nvidia1, the control and uvm nodes) and a stub libcuda.so.1 built here (SONAME
libcuda.so.1, exporting cuInit). An engine-like image, built on the local vLLM CPU image,
registers a decoy libcuda.so.1 in its ld.so cache, as vLLM's CUDA images do with CUDA's
forward-compatibility libcuda, and runs a probe instead of vLLM. The agent's own
EngineManager and Docker client start it; the probe reports what the container sees.
Containers, images and files are removed by name, even when a test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from garage_node.core.wire import EngineState
from garage_node.node.config import EngineSection
from garage_node.node.engine.docker import Docker
from garage_node.node.engine.manager import EngineManager
from garage_node.node.engine.nvidia import CONTAINER_LIB_DIR
from garage_node.node.engine.spec import desired_spec
from garage_node.node.gpu import GPU, Inventory
from testing.driver_tree import DriverGPU, build_stub_libcuda, make_driver_tree

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = os.environ.get("GARAGE_ENGINE_TEST_IMAGE", "garage-node/vllm-cpu:test")
IMAGE = "garage-node/gpu-passthrough-test:cuda12.8"
IMAGE_CUDA13 = "garage-node/gpu-passthrough-test:cuda13.0"
CONTAINER = "garage-gpu-passthrough-test"
IMAGE_LD_PATH = "/usr/local/nvidia/lib:/usr/local/nvidia/lib64"

DOCKERFILE = f"""\
FROM {BASE_IMAGE}
# The decoy: what vLLM's CUDA images carry, CUDA's forward-compatibility libcuda, in the
# ld.so cache. On a GeForce card that one fails (error 804); the host's must win.
COPY libcuda-decoy-compat.so.1 /usr/local/cuda/compat/libcuda.so.1
RUN echo /usr/local/cuda/compat > /etc/ld.so.conf.d/000-cuda-compat.conf && ldconfig
COPY probe.py /probe.py
ENV CUDA_VERSION=12.8.1 LD_LIBRARY_PATH={IMAGE_LD_PATH}
ENTRYPOINT ["python3", "/probe.py"]
"""

PROBE = f"""\
import ctypes, glob, json, os, subprocess
LIB_DIR = {CONTAINER_LIB_DIR!r}

def load(env=None):
    code = ("import ctypes; l = ctypes.CDLL('libcuda.so.1'); l.garage_libcuda_origin.restype = ctypes.c_char_p; "
            "print(l.garage_libcuda_origin().decode(), l.cuInit(0))")
    return subprocess.run(["python3", "-c", code], env=env, capture_output=True, text=True).stdout.split()

r = {{}}
r["dev"] = {{p: [os.major(os.stat(p).st_rdev), os.minor(os.stat(p).st_rdev)] for p in sorted(glob.glob("/dev/nvidia*"))}}
r["ld_library_path"] = os.environ.get("LD_LIBRARY_PATH")
lib = ctypes.CDLL("libcuda.so.1")
lib.garage_libcuda_origin.restype = ctypes.c_char_p
r["libcuda_origin"] = lib.garage_libcuda_origin().decode()
r["cuInit"] = lib.cuInit(0)
r["libcuda_file"] = next(l.split()[-1] for l in open("/proc/self/maps") if "libcuda" in l)
# The same load without our LD_LIBRARY_PATH: the image's ld.so cache would give the decoy.
r["without_prepend"] = load({{k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}})
r["ldconfig"] = [l.strip() for l in subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout.splitlines()
                 if "libcuda.so.1" in l]
r["mounts"] = {{}}
for line in open("/proc/self/mountinfo"):
    f = line.split()
    if f[4].startswith(LIB_DIR + "/"):
        r["mounts"][f[4]] = f[5].split(",")[0]
try:
    open(LIB_DIR + "/libcuda.so.1", "ab").close()
    r["write"] = "allowed"
except OSError as e:
    r["write"] = e.strerror
print("GARAGE-PROBE " + json.dumps(r), flush=True)
"""


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mknod, dockerd)"
    if shutil.which("gcc") is None:
        return "gcc is not installed (the stub libcuda is compiled)"
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "no running dockerd (image/engine/ensure-dockerd.sh starts one)"
    if subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True).returncode != 0:
        return f"image {BASE_IMAGE} not built (image/engine/build-vllm-cpu-image.sh)"
    return None


pytestmark = [pytest.mark.engine, pytest.mark.skipif(bool(_missing()), reason=str(_missing()))]


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["docker", *args], capture_output=True, text=True, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    if check and res.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {res.stderr}")
    return res


@pytest.fixture(scope="module")
def images():
    work = Path(tempfile.mkdtemp(prefix="gnt-gpu-image-"))
    try:
        build_stub_libcuda(work, origin="decoy-compat")
        (work / "probe.py").write_text(PROBE)
        (work / "Dockerfile").write_text(DOCKERFILE)
        docker("build", "-q", "-t", IMAGE, str(work))
        docker("build", "-q", "-t", IMAGE_CUDA13, "--label", "garage-node.cuda=13.0", str(work))
        yield
    finally:
        docker("rm", "-f", CONTAINER, check=False)
        docker("rmi", IMAGE, IMAGE_CUDA13, check=False)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def driver_root():
    # Under /var/tmp: a disk filesystem that allows device nodes (some /tmp are nodev).
    root = Path(tempfile.mkdtemp(prefix="gnt-gpu-driver-", dir="/var/tmp"))
    try:
        stub = build_stub_libcuda(root / "build", origin="host-driver")
        # NVML lists the chosen GPU (index 0) on bus 0a, which the driver numbered 1.
        make_driver_tree(root / "host", [DriverGPU("0000:0a:00.0", 1), DriverGPU("0000:01:00.0", 0)],
                         mknod=True, libcuda=stub)
        yield root / "host"
    finally:
        docker("rm", "-f", CONTAINER, check=False)
        shutil.rmtree(root, ignore_errors=True)


RIG = Inventory((GPU(0, "NVIDIA GeForce RTX 4090", "GPU-0", 24564, 24564, "8.9", 40, 30.0, 0),
                 GPU(1, "NVIDIA GeForce RTX 4060", "GPU-1", 8188, 8188, "8.9", 40, 30.0, 0)),
                "535.261.03", "12.2", pci_bus_ids=((0, "0000:0a:00.0"), (1, "0000:01:00.0")))


def manager(root: Path, image: str, tmp_path: Path) -> EngineManager:
    cfg = EngineSection(image=image, catalog=str(ROOT / "configs/models.toml"), driver_root=root,
                        container_name=CONTAINER, cache_dir=tmp_path / "cache", port=18931)
    return EngineManager(cfg, tmp_path / "drain", lambda: desired_spec(cfg, RIG, "127.0.0.1"),
                         docker=Docker(cfg.docker_socket))


def probe_report(dock: Docker, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = dock.container(CONTAINER)
        if c is not None and not c.running and c.status == "exited":
            lines = [ln for ln in dock.logs(CONTAINER, tail=50) if ln.startswith("GARAGE-PROBE ")]
            assert lines, f"the probe printed no report (exit {c.exit_code}): {dock.logs(CONTAINER, tail=20)}"
            return json.loads(lines[-1].removeprefix("GARAGE-PROBE "))
        time.sleep(0.5)
    raise AssertionError(f"the probe container did not finish in {timeout} s")


def test_container_sees_the_chosen_gpu_and_loads_the_hosts_libcuda(images, driver_root, tmp_path):
    m = manager(driver_root, IMAGE, tmp_path)
    try:
        m.reconcile_once()
        assert m.snapshot().state is EngineState.STARTING, m.snapshot().message
        r = probe_report(m.docker)
    finally:
        m.docker.remove(CONTAINER)
        m.docker.close()
    print(json.dumps(r, indent=1))
    # Exactly the chosen GPU's node (its minor, not its NVML index) and the control nodes.
    assert r["dev"] == {"/dev/nvidia-modeset": [195, 254], "/dev/nvidia-uvm": [510, 0], "/dev/nvidia-uvm-tools": [510, 1],
                        "/dev/nvidia1": [195, 1], "/dev/nvidiactl": [195, 255]}
    # The host's libcuda wins over the decoy the image's ld.so cache lists.
    assert any("/usr/local/cuda/compat/libcuda.so.1" in line for line in r["ldconfig"]), r["ldconfig"]
    assert r["without_prepend"] == ["decoy-compat", "0"]
    assert (r["libcuda_origin"], r["cuInit"]) == ("host-driver", 0)
    assert r["libcuda_file"] == f"{CONTAINER_LIB_DIR}/libcuda.so.1"
    assert r["ld_library_path"] == f"{CONTAINER_LIB_DIR}:{IMAGE_LD_PATH}"
    # Every driver library is a read-only mount; writing to one fails.
    assert r["mounts"] and set(r["mounts"].values()) == {"ro"}, r["mounts"]
    assert f"{CONTAINER_LIB_DIR}/libcuda.so.1" in r["mounts"] and f"{CONTAINER_LIB_DIR}/libnvidia-ml.so.1" in r["mounts"]
    assert r["write"] == "Read-only file system"


def test_cuda_13_image_is_refused_on_driver_535_and_nothing_starts(images, driver_root, tmp_path):
    m = manager(driver_root, IMAGE_CUDA13, tmp_path)
    try:
        for _ in range(2):
            m.reconcile_safely()
            s = m.snapshot()
            assert s.state is EngineState.REFUSED, s.message
        assert "CUDA 13.0 (label garage-node.cuda)" in s.message and "supports CUDA up to 12.2" in s.message
        assert "newer driver" in s.message and "[engine] image" in s.message
        assert m.docker.container(CONTAINER) is None
    finally:
        m.docker.remove(CONTAINER)
        m.docker.close()


def test_cuda_12_8_image_is_allowed_on_driver_535(images, driver_root, tmp_path):
    m = manager(driver_root, IMAGE, tmp_path)
    try:
        m.reconcile_once()
        assert m.snapshot().state is EngineState.STARTING
        assert m.docker.container(CONTAINER) is not None
        # And on a CUDA 12.0 driver older than minor version compatibility allows, refused.
        m.desired = lambda: desired_spec(m.cfg, replace(RIG, driver_version="520.61.05", cuda_version="12.0"),
                                         "127.0.0.1")
        m.docker.remove(CONTAINER)
        m.reconcile_safely()
        assert m.snapshot().state is EngineState.REFUSED and "525.60.13" in m.snapshot().message
    finally:
        m.docker.remove(CONTAINER)
        m.docker.close()
