"""The node's typed configuration: /etc/garage-node/node.toml, with the USB stick's garage.toml
laid over it section by section (keys in the override replace those of the base).

Only the standard library, core.settings and core.overlay are imported here: build-image.sh
validates a garage.toml with this module before the image is built (`python -m garage_node.node.config`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from garage_node.core.overlay import IFNAME, WG_IMPLEMENTATIONS
from garage_node.core.settings import ConfigError, nonnegative, one_of, parse, positive, read_toml, setting, tcp_port
from garage_node.node.schedule import WINDOW_HELP, check_timezone, check_windows

DEFAULT_NODE_CONFIG = Path("/etc/garage-node/node.toml")
DEFAULT_NODE_OVERRIDE = Path("/boot/garage/garage.toml")


@dataclass(frozen=True)
class NodeSection:
    join_token: str = setting("", secret=True)  # never logged, never shown
    name: str = ""  # empty: the hostname
    # Empty: whatever region the head serves. Set: the agent refuses a head of another region
    # before spending the token (a stick flashed for one region cannot join another by mistake).
    region: str = ""
    state_dir: Path = Path("/var/lib/garage-node")
    runtime_dir: Path = Path("/run/garage-node")


@dataclass(frozen=True)
class OverlaySection:
    interface: str = setting("garage0", check=IFNAME)
    # "auto": kernel WireGuard when the module loads, else wireguard-go.
    implementation: str = setting("auto", check=one_of(*WG_IMPLEMENTATIONS))
    keepalive_s: int = setting(25, check=nonnegative())  # 0: none (a PC behind NAT then cannot be reached)
    # TCP ports anyone on the PC's own network may still reach; everything else (Ray, the
    # engine) only through WireGuard. 22: SSH, when garage.toml gives keys.
    open_tcp: tuple[int, ...] = (22,)
    # "all-tcp": every other TCP port is closed to all but WireGuard (a PC booted from the
    # stick). "ray-and-engine": only Ray's ports and the engine's are, for a machine set up by
    # hand that also serves other things on its network (open_tcp does not apply then).
    firewall: str = setting("all-tcp", check=one_of("all-tcp", "ray-and-engine"))


@dataclass(frozen=True)
class NodeRaySection:
    # Empty: the Ray next to the Python running the agent (same venv, same version), run
    # through garage_node.node.raystart; set, the command is run as it is (`CMD start ...`).
    command: str = ""
    # The unprivileged account Ray and its tasks run as: code from the region never runs as
    # root on someone's PC. The image creates it; by hand: scripts/install-deps (docs/operating.md).
    user: str = setting("garage-ray", check=((lambda v: v not in ("", "root")), "an account other than root"))
    temp_dir: Path = Path("/tmp/garage-ray")
    num_cpus: int = setting(0, check=nonnegative())  # 0: let Ray count them
    memory_mib: int = setting(0, check=nonnegative())  # 0: let Ray decide
    object_store_mib: int = setting(0, check=nonnegative())


@dataclass(frozen=True)
class AgentSection:
    reconcile_s: float = setting(2.0, check=positive())
    # Retry delays for the head and for children (Ray): exponential with jitter, capped.
    backoff_initial_s: float = setting(1.0, check=positive())
    backoff_max_s: float = setting(60.0, check=positive())


@dataclass(frozen=True)
class EngineSection:
    """The vLLM engine the agent runs in Docker (see garage_node/node/engine/)."""

    enabled: bool = True
    # Pinned: every node of a region runs the same vLLM. Override for a local or newer build.
    image: str = "vllm/vllm-openai:v0.32.0"
    # "gpu": GPUs passed through; "cpu": no GPU (a vLLM CPU build; tests and CPU-only nodes).
    device: str = setting("gpu", check=one_of("gpu", "cpu"))
    # How the container gets the GPUs: "devices" through the Docker Engine API alone (device
    # nodes and the driver's libraries, read-only; what the stick does, it has no NVIDIA
    # container toolkit); "nvidia-toolkit" asks Docker for them (DeviceRequests), which needs
    # the toolkit installed on the host.
    gpu_access: str = setting("devices", check=one_of("devices", "nvidia-toolkit"))
    # Where the NVIDIA driver's /proc/driver/nvidia, /dev/nvidia* and libraries are found: /
    # on a node (another root only for tests, or an agent that sees the host under a prefix).
    driver_root: Path = Path("/")
    # Empty: the planner picks the largest catalog model that fits. Else a catalog name or id.
    model: str = ""
    quantization: str = ""
    max_model_len: int = setting(0, check=nonnegative())  # 0: the planner decides
    gpu_memory_utilization: float = setting(0.90, check=(lambda v: 0.1 <= v <= 0.99, "between 0.1 and 0.99"))
    # A local model directory, mounted read-only and served instead of downloading from a hub.
    model_dir: str = ""
    catalog: str = ""  # empty: /etc/garage-node/models.toml, else the catalog shipped with garage-node
    port: int = setting(8000, check=tcp_port())
    shm_size_mib: int = setting(2048, check=nonnegative())
    cache_dir: Path = Path("/var/lib/garage-node/models")
    # Model weights fetched from the head's model store (node/weights.py), on the data partition;
    # at most weights_max_mib of them (0: as much as the partition has, less a reserve).
    weights_dir: Path = Path("/var/lib/garage-node/weights")
    weights_max_mib: int = setting(0, check=nonnegative())
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    hub_token: str = setting("", secret=True)  # passed to the container, never shown
    # The Docker Engine API's unix socket (the testbed points each engine PC at a dockerd of its own).
    docker_socket: str = "/var/run/docker.sock"
    container_name: str = "garage-engine"
    # Restarts within crash_window_s that turn "restarting" into "degraded".
    crash_loop_restarts: int = setting(3, check=nonnegative())
    crash_window_s: float = setting(600.0, check=positive())
    startup_timeout_s: float = setting(900.0, check=positive())  # a first start may download many GB
    drain_grace_s: float = setting(120.0, check=positive())
    stop_timeout_s: int = setting(30, check=nonnegative())


@dataclass(frozen=True)
class ScheduleSection:
    """Serving hours: outside them the PC drains its engine and stays joined (node/schedule.py)."""

    # Empty: always serving. E.g. ["mon-fri 23:00-08:00", "sat-sun"].
    windows: tuple[str, ...] = setting((), check=(check_windows, "a list of " + WINDOW_HELP))
    # An IANA zone ("Europe/Berlin"); empty: the PC's own (TZ, else /etc/localtime).
    timezone: str = setting("", check=(check_timezone, "an IANA time zone such as Europe/Berlin, or empty for the PC's own"))


@dataclass(frozen=True)
class UpdateSection:
    """When this PC may update its OS (an A/B stick; issue #19, node/update.py decides).

    when = "window": in the hours of `windows` (below; the serving hours' syntax), after
    draining; "idle": whenever the PC is not serving (outside its serving hours, or drained);
    "ask": only a version the owner approved on the PC (`garage-node update approve VERSION`);
    "never": no update at all (the head's rollouts leave the PC out)."""

    when: str = setting("window", check=one_of("window", "idle", "ask", "never"))
    windows: tuple[str, ...] = setting(("daily 03:00-06:00",), check=(check_windows, "a list of " + WINDOW_HELP))
    # Empty: the serving hours' zone ([schedule] timezone), else the PC's own.
    timezone: str = setting("", check=(check_timezone, "an IANA time zone such as Europe/Berlin, or empty"))


def _temp_ok(v: int) -> bool:
    return v == 0 or 40 <= v <= 110


@dataclass(frozen=True)
class GpuSection:
    """Power and heat of this PC's GPUs, and how often NVML is read."""

    # Watts per GPU, set through NVML and clamped to what each card allows; 0: leave the
    # card's own limit. Restored to the card's default when the agent stops.
    power_limit_w: int = setting(0, check=(lambda v: 0 <= v <= 2000, "0 (the card's own limit) or watts up to 2000"))
    # Above this a GPU's engine is drained until the GPU cools to resume_temp_c; 0: no limit.
    max_temp_c: int = setting(0, check=(_temp_ok, "0 (no limit) or between 40 and 110 °C"))
    # 0: 10 °C below max_temp_c. Must be below max_temp_c, or the engine would flap.
    resume_temp_c: int = setting(0, check=(lambda v: v == 0 or 20 <= v <= 105, "0 (10 °C below max_temp_c) or between 20 and 105 °C"))
    # Seconds between NVML readings (temperatures, health, Xid events).
    refresh_s: float = setting(10.0, check=(lambda v: 1.0 <= v <= 300.0, "between 1 and 300 seconds"))

    @property
    def resume_below_c(self) -> int:
        return self.resume_temp_c or self.max_temp_c - 10


@dataclass(frozen=True)
class WifiSection:
    # Read by the image's boot scripts, not by the agent; declared so typos are caught.
    ssid: str = ""
    psk: str = setting("", secret=True)
    country: str = ""


@dataclass(frozen=True)
class SshSection:
    authorized_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeConfig:
    node: NodeSection = field(default_factory=NodeSection)
    overlay: OverlaySection = field(default_factory=OverlaySection)
    ray: NodeRaySection = field(default_factory=NodeRaySection)
    agent: AgentSection = field(default_factory=AgentSection)
    engine: EngineSection = field(default_factory=EngineSection)
    wifi: WifiSection = field(default_factory=WifiSection)
    ssh: SshSection = field(default_factory=SshSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    gpu: GpuSection = field(default_factory=GpuSection)
    update: UpdateSection = field(default_factory=UpdateSection)

    @property
    def socket_path(self) -> Path:
        return self.node.runtime_dir / "agent.sock"


def load_node_config(path: Path | None = None, override: Path | None = None) -> NodeConfig:
    """Base file, then override file; either may be missing (defaults apply)."""
    path = path or Path(os.environ.get("GARAGE_NODE_CONFIG", DEFAULT_NODE_CONFIG))
    override = override or Path(os.environ.get("GARAGE_NODE_OVERRIDE", DEFAULT_NODE_OVERRIDE))
    cfg = NodeConfig()
    for source in (path, override):
        if source.exists():
            cfg = parse(cfg, read_toml(source, ConfigError), source, error=ConfigError)
    check_across(cfg, f"{path} with {override}")
    return cfg


def check_across(cfg: NodeConfig, source: str) -> None:
    """Rules between keys (each key's own rule is its setting's check)."""
    g = cfg.gpu
    if cfg.update.when == "window" and not cfg.update.windows:
        raise ConfigError(f"{source}: [update] windows is empty while when = \"window\": give the hours updates may "
                          "happen in (e.g. [\"daily 03:00-06:00\"]), or set when = \"idle\", \"ask\" or \"never\".")
    # A resume point at or above the limit would drain and resume the engine on every reading.
    if g.max_temp_c and g.resume_temp_c and g.resume_temp_c >= g.max_temp_c:
        raise ConfigError(f"{source}: [gpu] resume_temp_c must be below max_temp_c (or 0 for 10 °C below it); "
                          "lower resume_temp_c or raise max_temp_c.")


def main(argv: list[str]) -> int:
    """`python -m garage_node.node.config FILE...`: check files as the agent reads them (the
    image build checks garage.toml this way); prints nothing but errors."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m garage_node.node.config FILE...  (checks node.toml / garage.toml files)")
        return 0 if argv else 2
    try:
        for name in argv:
            if not Path(name).is_file():
                raise ConfigError(f"{name}: no such file")
            check_across(parse(NodeConfig(), read_toml(Path(name), ConfigError), name, error=ConfigError), name)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 78
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
