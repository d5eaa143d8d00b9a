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
from typing import Annotated, Any, TypeVar

import annotated_types as at
import msgspec

T = TypeVar("T")


# ---------------------------------------------------------------- bounds
# What a node reports is bounded, so a misbehaving or hostile node cannot make the head store
# (and re-read every few seconds) megabytes. Each bound is stated once and read by both
# validators: msgspec.Meta by msgspec (the node, `head nodes`), annotated_types by pydantic (the
# head's API, which answers 422 to a report out of bounds). A real report is far inside them.

def _text(max_length: int) -> Any:
    return Annotated[str, msgspec.Meta(max_length=max_length), at.MaxLen(max_length)]


def _int(lo: int, hi: int) -> Any:
    return Annotated[int, msgspec.Meta(ge=lo, le=hi), at.Ge(lo), at.Le(hi)]


def _float(lo: float, hi: float) -> Any:
    # The bounds also refuse NaN and infinities (no comparison with them holds).
    return Annotated[float, msgspec.Meta(ge=lo, le=hi), at.Ge(lo), at.Le(hi)]


MAX_GPUS = 16            # per node; gaming PCs have one to four
ShortText = _text(96)    # names, ids, versions, addresses
Message = _text(512)     # a sentence for a person
Count = _int(0, 2**31 - 1)
MiB = _int(0, 2**31 - 1)
WallTime = _float(0.0, 1e11)


def clip(text: str | None, max_length: int) -> str | None:
    """`text` cut to a bound (the agent's reports stay inside what the head accepts)."""
    return text if text is None or len(text) <= max_length else text[: max_length - 1] + "…"


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
    # Joined, Ray worker alive, engine drained for a reason of the owner's: outside serving
    # hours, or a GPU above [gpu] max_temp_c. Comes back by itself.
    PAUSED = "paused"


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
    index: _int(0, 255)
    name: ShortText
    uuid: ShortText
    memory_total_mib: MiB
    memory_free_mib: MiB
    compute_capability: _text(16) | None  # e.g. "8.9"
    temperature_c: _int(-100, 1000) | None
    power_w: _float(0.0, 1e6) | None
    utilization_pct: _int(0, 100) | None
    healthy: bool = True
    error: Message | None = None  # why this GPU is unhealthy, for a person to read
    power_limit_w: _float(0.0, 1e5) | None = None  # the limit NVML enforces now
    # Out of service until the agent restarts (a fault: NVML error, Xid, lost); `error` says why.
    quarantined: bool = False
    hot: bool = False  # above [gpu] max_temp_c and not yet cooled below the resume point


@dataclass(frozen=True)
class AgentVersions:
    agent: ShortText
    ray: ShortText
    python: ShortText


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
    GPU: _int(0, MAX_GPUS)
    vram_mib: MiB


@dataclass(frozen=True)
class RayStatus:
    state: RayState
    address: ShortText | None = None
    alive_at_head: bool | None = None
    pid: Count | None = None
    restarts: Count | None = None
    last_exit_code: _int(-1024, 1024) | None = None
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
    kv_cache_usage_pct: float | None = None
    paused: str | None = None  # drained for the owner's serving hours or heat: why


@dataclass(frozen=True)
class TokensServed:
    """Tokens (prompt + completion) a PC served through the gateway: since midnight UTC and
    ever. The PC owner's visible contribution."""

    today: Count = 0
    total: Count = 0


@dataclass(frozen=True)
class ServingStatus:
    """Whether the PC serves now and, if not, why (serving hours, heat): the owner's settings
    at work. The owner's own `garage-node drain` is engine.draining, not this."""

    serving: bool | None = True  # None: not known (the agent is down)
    paused: Message | None = None  # why not, for a person
    until: WallTime | None = None  # when the serving hours next change (wall clock)
    schedule: Message | None = None  # the windows and zone, e.g. "mon-fri 23:00-08:00, sat-sun (Europe/Berlin)"
    max_temp_c: _int(0, 200) | None = None
    resume_temp_c: _int(0, 200) | None = None
    power_limit_w: _int(0, 100000) | None = None  # what [gpu] power_limit_w asks for
    power_note: Message | None = None  # what NVML made of it (clamped, refused, not supported)


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
    Its keys are documented in docs/node.md (`garage-node status`)."""

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
    # From the head's answer to the last heartbeat; None until the head has said.
    tokens_served: TokensServed | None = None
    serving: ServingStatus | None = None  # None: the agent is down


# ---------------------------------------------------------------- node -> head


@dataclass(frozen=True)
class EngineReport:
    """What the head learns of a node's engine (the gateway routes by it)."""

    state: EngineState
    model: _text(256) | None = None
    endpoint: ShortText | None = None
    draining: bool | None = None
    healthy_since: WallTime | None = None
    requests_running: Count | None = None
    requests_waiting: Count | None = None
    # The share of the engine's KV cache in use, 0-100 (vLLM's kv_cache_usage_perc): the
    # gateway's router weighs it with the request counts.
    kv_cache_usage_pct: _float(0.0, 100.0) | None = None
    generation_tokens_per_s: _float(0.0, 1e7) | None = None  # for the fleet page's tokens/s


@dataclass(frozen=True)
class NodeReport:
    """Sent with every enrollment and heartbeat; never a secret. Bounded (see "bounds" above)."""

    state: NodeState
    message: Message
    gpus: Annotated[list[GPU], msgspec.Meta(max_length=MAX_GPUS), at.MaxLen(MAX_GPUS)]
    gpu_note: Message | None
    driver_version: ShortText | None
    cuda_version: ShortText | None
    versions: AgentVersions
    ray: RayStatus
    engine: EngineReport
    serving: ServingStatus | None = None  # None: an older agent


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
    # The Ray cluster's authentication token (RAY_AUTH_MODE=token): only nodes the head
    # enrolled can join Ray, even from inside the overlay. Sent again with every heartbeat
    # answer, so a rotated token reaches every node.
    ray_token: str = field(default="", repr=False)
    # See HeartbeatReply.engine_api_key: given at enrollment too, so the first engine has it.
    engine_api_key: str = field(default="", repr=False)


@dataclass(frozen=True, kw_only=True)
class HeartbeatReply(RegionFacts):
    node_id: str
    state: str = "active"
    ray_alive: bool = False  # whether the Ray head lists this node alive
    ray_checked_at: float | None = None
    ray_token: str = field(default="", repr=False)
    # The id of the Ray cluster the head's Ray head runs (hex; "" while not known: Ray head
    # down or starting, or an older head). A Ray head that came back as a new cluster (no GCS
    # fault tolerance, or its store lost) changes it, and a node whose worker joined the old
    # one restarts its worker at once.
    ray_cluster_id: str = ""
    # How long the credential this heartbeat came with stays valid, and the lifetime a new one
    # gets: the node renews when a third of the lifetime is left. Seconds, not a date, so a
    # PC's wrong clock does not matter. None from a head that does not expire credentials.
    credential_expires_in_s: float | None = None
    credential_lifetime_s: float | None = None
    # The key this node's engine demands of every API call (vLLM's VLLM_API_KEY): only the
    # head's gateway knows it, so nobody reaches the engine around keys and accounting.
    engine_api_key: str = field(default="", repr=False)
    # What this PC served through the region's gateway (the head's usage ledger).
    tokens_served: TokensServed | None = None


@dataclass(frozen=True, kw_only=True)
class CredentialReply:
    """POST /v1/nodes/{id}/credential: a new credential (and the node's WireGuard key as the
    hub now knows it). The one it replaces stays valid for a short overlap."""

    node_id: str
    credential: str = field(repr=False)  # returned once; the head keeps only a hash
    credential_expires_in_s: float
    credential_lifetime_s: float
    wg_public_key: str
