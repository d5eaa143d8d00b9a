"""The typed contracts between the parts of garage-node, defined once: the node's and the
engine's states, what a node reports to the head (enrollment, heartbeat) and what the head
answers, and the status document `garage-node status --json` prints.

Plain dataclasses, so the agent can use them without pydantic (its memory budget); the head's
API validates the same classes through FastAPI/pydantic, and the node decodes the head's
answers with msgspec (`decode`). JSON keys are the field names; every key is always present
(null when unknown), so a script reading `status --json` never meets a missing key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")


class WireError(ValueError):
    """A message did not have the shape its type says; the text names the field."""


def decode(data: Any, cls: type[T]) -> T:
    """`data` (parsed JSON) as a `cls`; unknown keys are ignored (a newer peer may send more)."""
    try:
        return msgspec.convert(data, cls, strict=False)
    except msgspec.ValidationError as e:
        raise WireError(str(e)) from None


def encode(value: Any) -> Any:
    """A dataclass (or list of them) as JSON-ready builtins."""
    return msgspec.to_builtins(value)


# ---------------------------------------------------------------- states


class NodeState(StrEnum):
    STARTING = "starting"
    NEEDS_TOKEN = "needs-token"
    ENROLLING = "enrolling"
    JOINING = "joining"
    JOINED = "joined"
    DEGRADED = "degraded"
    REVOKED = "revoked"
    ERROR = "error"
    STOPPING = "stopping"
    AGENT_DOWN = "agent-down"  # only ever said by `status`, about an agent that is not running


class RayState(StrEnum):
    ALIVE = "alive"
    STARTING = "starting"
    BACKOFF = "backoff"
    STOPPED = "stopped"
    VERSION_MISMATCH = "version-mismatch"
    UNKNOWN = "unknown"


class EngineState(StrEnum):
    DISABLED = "disabled"
    STARTING = "starting"
    PULLING = "pulling"
    HEALTHY = "healthy"
    RESTARTING = "restarting"
    DEGRADED = "degraded"
    REFUSED = "refused"
    ERROR = "error"
    DRAINING = "draining"
    DRAINED = "drained"
    STOPPED = "stopped"
    UNKNOWN = "unknown"


# ---------------------------------------------------------------- pieces


@dataclass(frozen=True)
class Versions:
    ray: str
    python: str  # major.minor: Ray's wire protocol and pickles need the same on every node

    def mismatch(self, head: "Versions") -> str | None:
        problems = []
        if self.ray != head.ray:
            problems.append(f"Ray {self.ray} here but the head runs Ray {head.ray}")
        if self.python != head.python:
            problems.append(f"Python {self.python} here but the head runs Python {head.python}")
        if not problems:
            return None
        return "; ".join(problems) + f". Install ray=={head.ray} on Python {head.python} (the head's versions)."


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    uuid: str
    memory_total_mib: int
    memory_free_mib: int
    compute_capability: str | None  # e.g. "8.9"
    temperature_c: int | None
    power_w: float | None
    utilization_pct: int | None
    healthy: bool = True
    error: str | None = None  # why this GPU is unhealthy, for a person to read


@dataclass(frozen=True)
class AgentVersions:
    agent: str
    ray: str
    python: str


@dataclass(frozen=True)
class OverlayStatus:
    interface: str
    up: bool
    address: str | None = None
    hub_ip: str | None = None
    hub_endpoint: str | None = None
    handshake_age_s: float | None = None


@dataclass(frozen=True)
class HeadStatus:
    api_url: str | None = None
    reachable: bool | None = None  # None: not asked yet
    last_contact_age_s: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class RayResources:
    GPU: int
    vram_mib: int


@dataclass(frozen=True)
class RayStatus:
    state: RayState
    address: str | None = None
    alive_at_head: bool | None = None
    pid: int | None = None
    restarts: int | None = None
    last_exit_code: int | None = None
    resources: RayResources | None = None


@dataclass(frozen=True)
class EngineStatus:
    state: EngineState
    message: str = ""
    image: str | None = None
    model: str | None = None
    endpoint: str | None = None
    container_id: str | None = None
    healthy_since: float | None = None  # wall-clock time, for a person
    restarts: int | None = None
    requests_running: int | None = None
    requests_waiting: int | None = None
    generation_tokens_per_s: float | None = None
    last_log_lines: list[str] = field(default_factory=list)
    plan: str | None = None
    draining: bool | None = None


@dataclass(frozen=True)
class ProblemStatus:
    message: str
    hint: str = ""
    age_s: float | None = None
    retry_in_s: float | None = None


@dataclass(frozen=True)
class AgentInfo:
    pid: int
    uptime_s: float


@dataclass(frozen=True)
class Status:
    """The status document: the agent's local API serves it, `garage-node status` renders it.
    Its keys are documented in the README."""

    state: NodeState
    message: str
    node_id: str | None
    name: str | None
    region: str | None
    gpus: list[GPU]
    gpu_note: str | None
    driver_version: str | None
    cuda_version: str | None
    overlay: OverlayStatus
    head: HeadStatus
    ray: RayStatus
    engine: EngineStatus
    versions: AgentVersions | None
    last_error: ProblemStatus | None
    agent: AgentInfo | None


# ---------------------------------------------------------------- node -> head


@dataclass(frozen=True)
class EngineReport:
    """What the head learns of a node's engine (the gateway routes by it)."""

    state: EngineState
    model: str | None = None
    endpoint: str | None = None
    draining: bool | None = None
    healthy_since: float | None = None
    requests_running: int | None = None
    requests_waiting: int | None = None


@dataclass(frozen=True)
class NodeReport:
    """Sent with every enrollment and heartbeat; never a secret."""

    state: NodeState
    message: str
    gpus: list[GPU]
    gpu_note: str | None
    driver_version: str | None
    cuda_version: str | None
    versions: AgentVersions
    ray: RayStatus
    engine: EngineReport


@dataclass(frozen=True)
class HubInfo:
    ip: str
    public_key: str
    endpoint: str


@dataclass(frozen=True, kw_only=True)
class RegionFacts:
    """What a node needs to reach the hub and Ray; the head sends it with every answer, so a
    head that moved (new endpoint, new key) reaches its nodes on their next heartbeat."""

    prefix_len: int
    hub: HubInfo
    ray_address: str
    region: str
    heartbeat_s: float
    versions: Versions


@dataclass(frozen=True, kw_only=True)
class EnrollReply(RegionFacts):
    node_id: str
    credential: str = field(repr=False)  # returned once; the head keeps only a hash
    overlay_ip: str


@dataclass(frozen=True, kw_only=True)
class HeartbeatReply(RegionFacts):
    node_id: str
    state: str = "active"
    ray_alive: bool = False  # whether the Ray head lists this node alive
    ray_checked_at: float | None = None
