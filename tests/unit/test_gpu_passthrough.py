"""GPU passthrough without the NVIDIA container toolkit, and the CUDA gate: pure logic against a
fake driver tree (testing/driver_tree.py) and the fake Docker; the real dockerd proves the same
in tests/integration/test_gpu_passthrough.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from garage_node.core.wire import EngineState
from garage_node.node.config import EngineSection
from garage_node.placement import cuda
from garage_node.placement import fit as planner
from garage_node.placement.catalog import load_catalog
from garage_node.node.engine.nvidia import CONTAINER_LIB_DIR, DriverHost, DriverHostError
from garage_node.node.engine.spec import EngineConfigError, check_image, desired_spec
from garage_node.node.gpu import GPU, Inventory
from testing.driver_tree import LIB_DIR, DriverGPU, make_driver_tree

ROOT = Path(__file__).resolve().parents[2]
CATALOG = str(ROOT / "configs/models.toml")
IMAGE = "vllm/vllm-openai:v0.32.0"
# Debian bookworm's driver: NVML reports CUDA 12.2.
DEBIAN_535 = ("535.261.03", "12.2")
IMAGE_LD_PATH = "/usr/local/nvidia/lib:/usr/local/nvidia/lib64"


def card(i: int, name="NVIDIA GeForce RTX 4090", mib=24564, cc="8.9") -> GPU:
    return GPU(i, name, f"GPU-{i}", mib, mib, cc, 40, 30.0, 0)


def inventory(*cards: GPU, buses: tuple[str, ...], driver=DEBIAN_535) -> Inventory:
    return Inventory(cards, driver[0], driver[1], pci_bus_ids=tuple(enumerate(buses)))


# A 4090 and a 4060 (not a TP pair: the planner takes the 4090 alone). NVML lists the 4090
# first, on bus 0a; the driver gave it minor 1 and the 4060 (bus 01) minor 0.
RIG = inventory(card(0), card(1, "NVIDIA GeForce RTX 4060", 8188), buses=("0000:0a:00.0", "0000:01:00.0"))
TREE = [DriverGPU("0000:0a:00.0", 1), DriverGPU("0000:01:00.0", 0, "NVIDIA GeForce RTX 4060")]


def cfg(root: Path, **kw) -> EngineSection:
    return EngineSection(catalog=CATALOG, image=IMAGE, driver_root=root, **kw)


def body_for(root: Path, inv: Inventory = RIG, image_env=(f"LD_LIBRARY_PATH={IMAGE_LD_PATH}",), **kw) -> dict:
    spec, _ = desired_spec(cfg(root, **kw), inv, "100.96.0.2")
    return spec.container_body({}, image_env)


def test_container_gets_the_chosen_gpu_node_by_its_minor_and_the_control_nodes(tmp_path):
    root = make_driver_tree(tmp_path, TREE)
    host = body_for(root)["HostConfig"]
    devices = {d["PathInContainer"]: d for d in host["Devices"]}
    # NVML index 0 (the 4090) is /dev/nvidia1; the 4060's /dev/nvidia0 stays out.
    assert sorted(devices) == ["/dev/nvidia-modeset", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia1",
                               "/dev/nvidiactl"]
    assert devices["/dev/nvidia1"] == {"PathOnHost": str(root / "dev/nvidia1"), "PathInContainer": "/dev/nvidia1",
                                       "CgroupPermissions": "rwm"}
    assert "DeviceRequests" not in host


def test_both_gpus_of_a_tp_pair_map_through_their_minors(tmp_path):
    root = make_driver_tree(tmp_path, [DriverGPU("0000:0a:00.0", 1), DriverGPU("0000:01:00.0", 0)])
    pair = inventory(card(0), card(1), buses=("0000:0a:00.0", "0000:01:00.0"))
    spec, _ = desired_spec(cfg(root, model="qwen2.5-32b"), pair, "100.96.0.2")
    assert spec.gpu_ids == ("0", "1")
    paths = {d["PathInContainer"] for d in spec.container_body({})["HostConfig"]["Devices"]}
    assert {"/dev/nvidia0", "/dev/nvidia1"} <= paths


def test_driver_libraries_are_mounted_read_only_on_their_sonames(tmp_path):
    root = make_driver_tree(tmp_path, TREE)
    mounts = body_for(root)["HostConfig"]["Mounts"]
    libs = {m["Target"].rsplit("/", 1)[1]: m for m in mounts if m["Target"].startswith(CONTAINER_LIB_DIR + "/")}
    assert sorted(libs) == ["libcuda.so", "libcuda.so.1", "libnvidia-allocator.so.1", "libnvidia-cfg.so.1",
                            "libnvidia-ml.so.1", "libnvidia-nvvm.so.4", "libnvidia-ptxjitcompiler.so.1"]
    for m in libs.values():
        assert m["Type"] == "bind" and m["ReadOnly"] is True
    # The real file, not Debian's SONAME link (a link's target would not resolve in the container).
    assert libs["libcuda.so.1"]["Source"] == str(root / LIB_DIR / "libcuda.so.535.261.03")
    assert libs["libcuda.so"]["Source"] == libs["libcuda.so.1"]["Source"]


def test_ld_library_path_puts_the_driver_first_and_keeps_the_images_value(tmp_path):
    root = make_driver_tree(tmp_path, TREE)
    env = dict(e.split("=", 1) for e in body_for(root)["Env"])
    assert env["LD_LIBRARY_PATH"] == f"{CONTAINER_LIB_DIR}:{IMAGE_LD_PATH}"
    assert env["TRITON_LIBCUDA_PATH"] == CONTAINER_LIB_DIR
    # An image without LD_LIBRARY_PATH; and an [engine] env value, which wins over the image's.
    env = dict(e.split("=", 1) for e in body_for(root, image_env=())["Env"])
    assert env["LD_LIBRARY_PATH"] == CONTAINER_LIB_DIR
    env = dict(e.split("=", 1) for e in body_for(root, env={"LD_LIBRARY_PATH": "/opt/x"})["Env"])
    assert env["LD_LIBRARY_PATH"] == f"{CONTAINER_LIB_DIR}:/opt/x"


def test_toolkit_switch_keeps_device_requests(tmp_path):
    # No driver tree at all: the toolkit finds the driver itself.
    host = body_for(tmp_path / "nothing", gpu_access="nvidia-toolkit")["HostConfig"]
    assert host["DeviceRequests"] == [{"Driver": "nvidia", "Capabilities": [["gpu"]], "DeviceIDs": ["0"]}]
    assert "Devices" not in host
    assert not any(m["Target"].startswith(CONTAINER_LIB_DIR) for m in host["Mounts"])


def test_devices_change_the_spec_hash(tmp_path):
    a = make_driver_tree(tmp_path / "a", TREE)
    b = make_driver_tree(tmp_path / "b", [DriverGPU("0000:0a:00.0", 2), DriverGPU("0000:01:00.0", 0)])
    sa, _ = desired_spec(cfg(a), RIG, "100.96.0.2")
    sb, _ = desired_spec(cfg(b), RIG, "100.96.0.2")
    assert sa.spec_hash != sb.spec_hash


@pytest.mark.parametrize("breakage, words", [
    ({"no_driver": True}, "NVIDIA kernel driver is not loaded"),
    ({"skip_nodes": ("nvidia-uvm",)}, "nvidia-modprobe -u -c=0"),
    ({"skip_nodes": ("nvidia1",)}, "nvidia-modprobe -c=1"),
    ({"skip_libraries": ("libcuda.so.1",)}, "install libcuda1"),
])
def test_a_host_that_cannot_pass_the_gpu_says_what_to_do(tmp_path, breakage, words):
    root = tmp_path / "host"
    if breakage.pop("no_driver", False):
        root.mkdir()
    else:
        make_driver_tree(root, TREE, **breakage)
    with pytest.raises(EngineConfigError, match=words):
        desired_spec(cfg(root), RIG, "100.96.0.2")


def test_unknown_bus_id_or_missing_minor_line(tmp_path):
    root = make_driver_tree(tmp_path, TREE)
    with pytest.raises(DriverHostError, match="PCI bus id"):
        DriverHost(root).passthrough([(0, None)])
    (root / "proc/driver/nvidia/gpus/0000:0a:00.0/information").write_text("Model: x\n")
    with pytest.raises(DriverHostError, match="Device Minor"):
        DriverHost(root).passthrough([(0, "0000:0a:00.0")])


def test_optional_nodes_and_libraries_may_be_missing(tmp_path):
    root = make_driver_tree(tmp_path, TREE, skip_nodes=("nvidia-modeset", "nvidia-uvm-tools"),
                            skip_libraries=("libnvidia-nvvm.so.4", "libnvidia-allocator.so.1"))
    p = DriverHost(root).passthrough([(0, "0000:0a:00.0")])
    assert [c for _, c in p.devices] == ["/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm"]
    assert "libnvidia-nvvm.so.4" not in [n for _, n in p.libraries]


# ---------------------------------------------------------------- the CUDA gate


def gpu_spec(tmp_path, driver=DEBIAN_535):
    """The pinned image's spec on driver 535; the catalog lets it through (it says CUDA 12.8),
    so what the pulled image's own config says decides."""
    root = make_driver_tree(tmp_path, TREE)
    inv = replace(RIG, driver_version=driver[0], cuda_version=driver[1])
    return desired_spec(cfg(root), inv, "100.96.0.2")[0]


def test_gate_refuses_a_cuda_13_image_on_driver_535(tmp_path):
    spec = gpu_spec(tmp_path)
    with pytest.raises(EngineConfigError) as e:
        check_image(spec, ["CUDA_VERSION=13.0.1", "PATH=/usr/bin"], {})
    msg = str(e.value)
    assert "CUDA 13.0" in msg and "535.261.03" in msg and "up to 12.2" in msg and "580.65.06" in msg
    assert "newer driver" in msg and "[engine] image" in msg
    # The same from our label (it wins over the environment).
    with pytest.raises(EngineConfigError, match="label garage-node.cuda"):
        check_image(spec, ["CUDA_VERSION=12.8.1"], {"garage-node.cuda": "13.0"})


def test_gate_allows_cuda_12_8_on_driver_535(tmp_path):
    spec = gpu_spec(tmp_path)
    note = check_image(spec, ["CUDA_VERSION=12.8.1"], {})
    assert "minor version compatibility" in note
    assert check_image(spec, ["NVIDIA_REQUIRE_CUDA=cuda>=12.2 brand=tesla,driver>=470"], {}) == ""
    assert "states no CUDA version" in check_image(spec, ["PATH=/usr/bin"], {})


def test_gate_needs_the_minor_compat_driver_floor():
    with pytest.raises(cuda.CudaMismatch, match="from driver 525.60.13 on"):
        cuda.check("img", (12, 8), "520.61.05", "12.0")


def test_planner_refuses_an_image_the_catalog_says_the_driver_cannot_run(tmp_path):
    cat = tmp_path / "models.toml"
    cat.write_text(Path(CATALOG).read_text().replace(
        '[images."vllm/vllm-openai:v0.32.0"]\ncuda = "12.8"\nmin_driver = "525.60.13"',
        '[images."vllm/vllm-openai:v0.32.0"]\ncuda = "13.0"\nmin_driver = "580.65.06"'))
    catalog = load_catalog(cat)
    with pytest.raises(planner.PlanError, match="needs NVIDIA driver >= 580.65.06, this node has 535.261.03"):
        planner.plan(RIG, catalog, image=catalog.image(IMAGE))
    # The shipped catalog's pinned image (CUDA 12.8) plans on 535.
    shipped = load_catalog(CATALOG)
    assert planner.plan(RIG, shipped, image=shipped.image(IMAGE)).gpu_indices == (0,)


def test_planner_skips_gpus_older_than_the_image_supports():
    shipped = load_catalog(CATALOG)
    pascal = inventory(card(0, "NVIDIA GeForce GTX 1080 Ti", 11264, "6.1"), buses=("0000:01:00.0",))
    with pytest.raises(planner.PlanError, match=r"compute capability >= 7.0; this node's are 6.1"):
        planner.plan(pascal, shipped, image=shipped.image(IMAGE))


def test_catalog_image_table_is_validated(tmp_path):
    cat = tmp_path / "models.toml"
    cat.write_text(Path(CATALOG).read_text().replace('min_driver = "525.60.13"', 'min_driver = "new"'))
    with pytest.raises(Exception, match=r"images\.\"vllm/vllm-openai:v0.32.0\"\.min_driver' must be a driver version"):
        load_catalog(cat)


# ---------------------------------------------------------------- in the engine manager


def manager_with(tmp_path, image_env: tuple[str, ...], driver=DEBIAN_535):
    # Imported here: the real-GPU test below runs where httpx (the Docker client's) may be missing.
    from garage_node.node.engine.docker import ImageConfig
    from garage_node.node.engine.manager import EngineManager
    from testing.fakes import FakeClock, FakeDocker, FakeProbe

    root = make_driver_tree(tmp_path / "host", TREE)
    c = cfg(root, cache_dir=tmp_path / "cache")
    inv = replace(RIG, driver_version=driver[0], cuda_version=driver[1])
    docker = FakeDocker(images=(IMAGE,))
    docker.image_configs[IMAGE] = ImageConfig(env=image_env, labels={})
    m = EngineManager(c, tmp_path / "drain", lambda: desired_spec(c, inv, "100.96.0.2"), docker=docker,
                      probe=FakeProbe(), clock=FakeClock())
    return m, docker


def test_manager_refuses_at_once_and_starts_nothing(tmp_path):
    m, docker = manager_with(tmp_path, ("CUDA_VERSION=13.0.1",))
    for _ in range(3):  # every pass says the same; nothing is created, nothing crash-loops
        m.reconcile_safely()
        s = m.snapshot()
        assert s.state is EngineState.REFUSED and "CUDA 13.0" in s.message
    assert docker.containers == {} and s.restarts == 0


def test_manager_starts_a_cuda_12_8_image_with_the_gpu_passed_through(tmp_path):
    m, docker = manager_with(tmp_path, ("CUDA_VERSION=12.8.1", f"LD_LIBRARY_PATH={IMAGE_LD_PATH}"))
    m.reconcile_safely()
    assert m.snapshot().state is EngineState.STARTING
    body = docker.bodies["garage-engine"]
    assert "/dev/nvidia1" in [d["PathInContainer"] for d in body["HostConfig"]["Devices"]]
    assert f"LD_LIBRARY_PATH={CONTAINER_LIB_DIR}:{IMAGE_LD_PATH}" in body["Env"]
    assert "DeviceRequests" not in body["HostConfig"]


# ---------------------------------------------------------------- on a real GPU


@pytest.mark.gpu
@pytest.mark.skipif(not Path("/proc/driver/nvidia/gpus").is_dir(), reason="no NVIDIA driver with a GPU here")
def test_real_driver_gives_every_gpu_its_node_and_libcuda():
    from garage_node.node.gpu import read_inventory

    inv = read_inventory()
    assert inv.nvml_error is None, inv.nvml_error
    p = DriverHost(Path("/")).passthrough([(g.index, inv.bus_id(g.index)) for g in inv.gpus])
    inside = [c for _, c in p.devices]
    assert len([c for c in inside if c[len("/dev/nvidia"):].isdigit()]) == len(inv.gpus)
    assert "/dev/nvidiactl" in inside and "/dev/nvidia-uvm" in inside
    assert {"libcuda.so.1", "libnvidia-ml.so.1"} <= {name for _, name in p.libraries}
