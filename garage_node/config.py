"""Typed configuration for the node agent and the regional head.

Configs are TOML files mapped onto frozen dataclasses. The node reads a base file
(/etc/garage-node/node.toml) and an override file (garage.toml from the USB stick);
keys in the override replace those of the base, section by section.

Validation is written here rather than with pydantic: the agent has an RSS budget of
60 MB and pydantic alone costs a good part of it, while the checks we need (types,
unknown keys, and errors that name the file and key) are a page of code.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

DEFAULT_NODE_CONFIG = Path("/etc/garage-node/node.toml")
DEFAULT_NODE_OVERRIDE = Path("/boot/garage/garage.toml")
DEFAULT_HEAD_CONFIG = Path("/etc/garage-node/head.toml")


class ConfigError(Exception):
    """A config file is unreadable or wrong; the message says where and what to do."""


# ---------------------------------------------------------------- node


@dataclass(frozen=True)
class NodeSection:
    join_token: str = field(default="", repr=False)  # secret: never logged, never shown
    name: str = ""  # empty: the hostname
    region: str = ""  # empty: the head's region
    state_dir: Path = Path("/var/lib/garage-node")
    runtime_dir: Path = Path("/run/garage-node")


@dataclass(frozen=True)
class OverlaySection:
    interface: str = "garage0"
    # "auto": kernel WireGuard when the module loads, else wireguard-go.
    implementation: str = "auto"
    keepalive_s: int = 25


@dataclass(frozen=True)
class NodeRaySection:
    # Empty: the Ray next to the Python running the agent (same venv, same version), run
    # through garage_node.raystart; set, the command is run as it is (`CMD start ...`).
    command: str = ""
    temp_dir: Path = Path("/tmp/garage-ray")
    num_cpus: int = 0  # 0: let Ray count them
    memory_mib: int = 0  # 0: let Ray decide
    object_store_mib: int = 0


@dataclass(frozen=True)
class AgentSection:
    heartbeat_s: float = 10.0
    reconcile_s: float = 2.0
    # Retry delays for the head and for children (Ray): exponential with jitter, capped.
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0


@dataclass(frozen=True)
class EngineSection:
    """The vLLM engine the agent runs in Docker (see garage_node/engine.py)."""

    enabled: bool = True
    # Pinned: every node of a region runs the same vLLM. Override for a local or newer build.
    image: str = "vllm/vllm-openai:v0.32.0"
    # "gpu": GPUs passed through; "cpu": no GPU (a vLLM CPU build; tests and CPU-only nodes).
    device: str = "gpu"
    # Empty: the planner picks the largest catalog model that fits. Else a catalog name or id.
    model: str = ""
    quantization: str = ""
    max_model_len: int = 0  # 0: the planner decides
    gpu_memory_utilization: float = 0.90
    # A local model directory, mounted read-only and served instead of downloading from a hub.
    model_dir: str = ""
    catalog: str = ""  # empty: /etc/garage-node/models.toml, else the catalog shipped with garage-node
    port: int = 8000
    shm_size_mib: int = 2048
    cache_dir: Path = Path("/var/lib/garage-node/models")
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    hub_token: str = field(default="", repr=False)  # secret: passed to the container, never shown
    docker_socket: str = "/var/run/docker.sock"
    container_name: str = "garage-engine"
    # Restarts within crash_window_s that turn "restarting" into "degraded".
    crash_loop_restarts: int = 3
    crash_window_s: float = 600.0
    startup_timeout_s: float = 900.0  # a first start may download many GB
    drain_grace_s: float = 120.0
    stop_timeout_s: int = 30


@dataclass(frozen=True)
class WifiSection:
    # Read by the image's boot scripts, not by the agent; declared so typos are caught.
    ssid: str = ""
    psk: str = field(default="", repr=False)  # secret
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

    @property
    def socket_path(self) -> Path:
        return self.node.runtime_dir / "agent.sock"


# ---------------------------------------------------------------- head


@dataclass(frozen=True)
class HeadSection:
    region: str = "home"
    state_dir: Path = Path("/var/lib/garage-head")


@dataclass(frozen=True)
class ApiSection:
    listen_host: str = "0.0.0.0"
    port: int = 8443
    # The address nodes use, written into join tokens and the server certificate.
    advertise_host: str = ""


@dataclass(frozen=True)
class HubSection:
    interface: str = "garage-hub"
    implementation: str = "auto"
    cidr: str = "100.96.0.0/16"
    listen_port: int = 51820
    # host:port nodes send WireGuard to; empty: advertise_host and listen_port.
    endpoint: str = ""


@dataclass(frozen=True)
class HeadRaySection:
    command: str = ""
    port: int = 6379
    temp_dir: Path = Path("/tmp/garage-ray-head")
    num_cpus: int = 0
    memory_mib: int = 0
    object_store_mib: int = 0


@dataclass(frozen=True)
class HeadOptions:
    default_token_ttl_s: int = 24 * 3600
    heartbeat_s: float = 10.0
    # A node unheard for this long is shown as offline.
    offline_after_s: float = 45.0
    peer_sync_s: float = 2.0


@dataclass(frozen=True)
class HeadConfig:
    head: HeadSection = field(default_factory=HeadSection)
    api: ApiSection = field(default_factory=ApiSection)
    overlay: HubSection = field(default_factory=HubSection)
    ray: HeadRaySection = field(default_factory=HeadRaySection)
    options: HeadOptions = field(default_factory=HeadOptions)

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.overlay.cidr)

    @property
    def hub_ip(self) -> str:
        return str(self.network.network_address + 1)

    @property
    def wg_endpoint(self) -> str:
        return self.overlay.endpoint or f"{self.api.advertise_host}:{self.overlay.listen_port}"

    @property
    def api_url(self) -> str:
        return f"https://{self.api.advertise_host}:{self.api.port}"


# ---------------------------------------------------------------- loading


def load_node_config(path: Path | None = None, override: Path | None = None) -> NodeConfig:
    """Base file, then override file; either may be missing (defaults apply)."""
    path = path or Path(os.environ.get("GARAGE_NODE_CONFIG", DEFAULT_NODE_CONFIG))
    override = override or Path(os.environ.get("GARAGE_NODE_OVERRIDE", DEFAULT_NODE_OVERRIDE))
    cfg = NodeConfig()
    for source in (path, override):
        if source.exists():
            cfg = _apply(cfg, _read_toml(source), source)
    _check_node(cfg)
    return cfg


def load_head_config(path: Path | None = None) -> HeadConfig:
    path = path or Path(os.environ.get("GARAGE_HEAD_CONFIG", DEFAULT_HEAD_CONFIG))
    if not path.exists():
        raise ConfigError(
            f"{path}: head config not found. Copy configs/head.example.toml there and set "
            "[api] advertise_host to the address nodes reach this head at."
        )
    cfg = _apply(HeadConfig(), _read_toml(path), path)
    _check_head(cfg, path)
    return cfg


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        # Notepad may save garage.toml with a byte-order mark; TOML itself does not allow one.
        return tomllib.loads(path.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text. Save it as UTF-8 and start again.") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e}). Fix the syntax and start again.") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror}).") from None


def _apply(obj: Any, data: dict[str, Any], source: Path, prefix: str = "") -> Any:
    """Return a copy of dataclass `obj` with `data` laid over it, checking every key."""
    known = {f.name: f for f in fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(
                f"{source}: unknown key '{where}'. Known keys here: {', '.join(sorted(known))}."
            )
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{where}' must be a table ([{where}]).")
            changes[key] = _apply(current, value, source, prefix=f"{where}.")
        else:
            changes[key] = _coerce(value, _field_type(type(obj), key), source, where)
    return replace(obj, **changes)


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, expected: Any, source: Path, where: str) -> Any:
    def fail(what: str) -> ConfigError:
        # Never echo the value: the key may hold a secret (join_token, psk).
        return ConfigError(f"{source}: '{where}' must be {what}, got a {type(value).__name__}.")

    if expected is Path:
        if not isinstance(value, str) or not value:
            raise fail("a non-empty path string")
        return Path(value)
    if expected is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise fail("a whole number ≥ 0")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise fail("a number > 0")
        return float(value)
    if expected is str:
        if not isinstance(value, str):
            raise fail("a string in quotes")
        return value
    if typing.get_origin(expected) is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise fail("a table of strings (KEY = \"value\")")
        return dict(value)
    if typing.get_origin(expected) is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise fail("a list of strings")
        return tuple(value)
    raise TypeError(f"config field {where} has an unsupported type {expected}")  # our bug


def _check_node(cfg: NodeConfig) -> None:
    _check_choice(cfg.overlay.implementation, ("auto", "kernel", "wireguard-go"), "overlay.implementation")
    _check_choice(cfg.engine.device, ("gpu", "cpu"), "engine.device")
    if not 0.1 <= cfg.engine.gpu_memory_utilization <= 0.99:
        raise ConfigError("'engine.gpu_memory_utilization' must be between 0.1 and 0.99.")
    _check_ifname(cfg.overlay.interface, "overlay.interface")


def _check_head(cfg: HeadConfig, path: Path) -> None:
    if not cfg.api.advertise_host:
        raise ConfigError(
            f"{path}: 'api.advertise_host' is empty. Set it to the IP or DNS name nodes reach "
            "this head at; it goes into join tokens and the head's certificate."
        )
    try:
        net = ipaddress.IPv4Network(cfg.overlay.cidr)
    except ValueError:
        raise ConfigError(f"{path}: 'overlay.cidr' must be an IPv4 network like 100.96.0.0/16.") from None
    if net.prefixlen > 29:
        raise ConfigError(f"{path}: 'overlay.cidr' {net} is too small for a region; use /24 or larger.")
    _check_choice(cfg.overlay.implementation, ("auto", "kernel", "wireguard-go"), "overlay.implementation")
    _check_ifname(cfg.overlay.interface, "overlay.interface")


def _check_choice(value: str, choices: tuple[str, ...], where: str) -> None:
    if value not in choices:
        raise ConfigError(f"'{where}' must be one of {', '.join(choices)}; got '{value}'.")


def _check_ifname(name: str, where: str) -> None:
    # Linux limits interface names to 15 bytes; wireguard-go would take "--help" as a name.
    if not (0 < len(name) <= 15) or name.startswith("-") or "/" in name or " " in name:
        raise ConfigError(f"'{where}' must be a Linux interface name (1-15 characters, no '/', ' ' or leading '-').")
