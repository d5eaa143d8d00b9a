"""The typed contracts between the parts of garage-node, defined once: the node's and the
engine's states, what a node reports to the head (enrollment, heartbeat) and what the head
answers, and the status document `garage-node status --json` prints.

Plain dataclasses, so the agent can use them without pydantic (its memory budget); the head's
API validates the same classes through FastAPI/pydantic, and the node decodes the head's
answers with msgspec (`decode`). JSON keys are the field names; every key is always present
(null when unknown), so a script reading `status --json` never meets a missing key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Annotated, Any, TypeVar, overload

import annotated_types as at
import msgspec

T = TypeVar("T")


# ---------------------------------------------------------------- bounds
# What a node reports is bounded, so a misbehaving or hostile node cannot make the head store
# (and re-read every few seconds) megabytes. Each bound is stated once and read by both
# validators: msgspec.Meta by msgspec (the node, `head nodes`), annotated_types by pydantic (the
# head's API, which answers 422 to a report out of bounds). A real report is far inside them.
# The aliases are `Annotated[base, ...]` written out, so mypy and editors see `str`, `int` and
# `float` (the metadata after the base type is invisible to them).


def _at_most(max_length: int) -> tuple[msgspec.Meta, at.MaxLen]:
    return msgspec.Meta(max_length=max_length), at.MaxLen(max_length)


def _between(lo: float, hi: float) -> tuple[msgspec.Meta, at.Interval]:
    # Closed bounds also refuse NaN and infinities (no comparison with them holds).
    return msgspec.Meta(ge=lo, le=hi), at.Interval(ge=lo, le=hi)


MAX_GPUS = 16            # per node; gaming PCs have one to four
SHORT_TEXT_MAX = 96
MESSAGE_MAX = 512
MODEL_NAME_MAX = 256
INT32_MAX = 2**31 - 1

ShortText = Annotated[str, *_at_most(SHORT_TEXT_MAX)]   # names, ids, versions, addresses
Message = Annotated[str, *_at_most(MESSAGE_MAX)]        # a sentence for a person
ModelName = Annotated[str, *_at_most(MODEL_NAME_MAX)]              # a Hugging Face id, e.g. "Qwen/Qwen2.5-7B-Instruct-AWQ"
ComputeCapability = Annotated[str, *_at_most(16)]       # e.g. "8.9"
Count = Annotated[int, *_between(0, INT32_MAX)]
MiB = Annotated[int, *_between(0, INT32_MAX)]
GpuIndex = Annotated[int, *_between(0, 255)]
GpuCount = Annotated[int, *_between(0, MAX_GPUS)]
Celsius = Annotated[int, *_between(-100, 1000)]         # what a sensor may say, however wrong
TempLimit = Annotated[int, *_between(0, 200)]           # what an owner may ask for
Watts = Annotated[float, *_between(0.0, 1e6)]
WattLimit = Annotated[float, *_between(0.0, 1e5)]
WattSetting = Annotated[int, *_between(0, 100000)]
PercentInt = Annotated[int, *_between(0, 100)]
Percent = Annotated[float, *_between(0.0, 100.0)]
TokensPerSecond = Annotated[float, *_between(0.0, 1e7)]
ExitCode = Annotated[int, *_between(-1024, 1024)]
WallTime = Annotated[float, *_between(0.0, 1e11)]       # seconds since the epoch
ParamCount = Annotated[int, *_between(1, 10**15)]        # a model's parameters (beyond int32)
BytesPerParam = Annotated[float, *_between(0.01, 64.0)]  # a precision's weight size


@overload
def clip(text: str, max_length: int) -> str: ...
@overload
def clip(text: str | None, max_length: int) -> str | None: ...
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


def check_strictly(data: Any, cls: type) -> None:
    """Raise WireError unless `data` (parsed JSON) is a `cls` exactly as its JSON Schema says:
    no `true` for a number, no `"1"` for an integer, no `0` for a boolean, no `1.5` for an
    integer (the coercions pydantic's lax mode makes). `2.0` is an integer to JSON Schema, and
    so here too. The head's API runs it before pydantic, so what it accepts is what its
    published schema describes (schemathesis' negative_data_rejection)."""
    try:
        msgspec.convert(_whole_floats_as_ints(data), cls, strict=True)
    except msgspec.ValidationError as e:
        raise WireError(str(e)) from None


# No message of ours nests deeper than a few levels; a body nested hundreds deep (a 1.6 KB
# report does it) must be a 422, not Python's recursion limit as a 500.
MAX_DEPTH = 32


def _whole_floats_as_ints(data: Any, depth: int = 0) -> Any:
    if isinstance(data, float) and data.is_integer():
        return int(data)
    if isinstance(data, (dict, list)) and depth >= MAX_DEPTH:
        raise WireError(f"nested deeper than {MAX_DEPTH} levels: no message of this API is")
    if isinstance(data, dict):
        return {k: _whole_floats_as_ints(v, depth + 1) for k, v in data.items()}
    if isinstance(data, list):
        return [_whole_floats_as_ints(v, depth + 1) for v in data]
    return data


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
    # The region's audits found its answers wrong (Status.quarantine says why): no requests, no
    # Ray work, earnings frozen, until the operator releases it after a re-check.
    QUARANTINED = "quarantined"


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

    def mismatch(self, head: Versions) -> str | None:
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
    index: GpuIndex
    name: ShortText
    uuid: ShortText
    memory_total_mib: MiB
    memory_free_mib: MiB
    compute_capability: ComputeCapability | None  # e.g. "8.9"
    temperature_c: Celsius | None
    power_w: Watts | None
    utilization_pct: PercentInt | None
    healthy: bool = True
    error: Message | None = None  # why this GPU is unhealthy, for a person to read
    power_limit_w: WattLimit | None = None  # the limit NVML enforces now
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
    GPU: GpuCount
    vram_mib: MiB


@dataclass(frozen=True)
class RayStatus:
    state: RayState
    address: ShortText | None = None
    alive_at_head: bool | None = None
    pid: Count | None = None
    restarts: Count | None = None
    last_exit_code: ExitCode | None = None
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
    # Of `total`, by what may be paid (issue #20; head/gateway/ledger.py Earnings): earned
    # (credited more than [audit] hold_days ago), held (since), frozen (by a quarantine).
    # None from a head without audits.
    earned: Count | None = None
    held: Count | None = None
    frozen: Count | None = None


@dataclass(frozen=True)
class QuarantineStatus:
    """The region's audits found this PC's answers wrong (issue #20; head/audit/trust.py): it
    gets no customers' requests and no Ray work, and what it earned and has not yet been paid
    for is frozen, until the operator releases it after a re-check on test requests. Not a GPU
    the agent set aside itself (that is GPU.quarantined)."""

    state: ShortText  # "quarantined", or "rechecking" (the operator asked for a release)
    why: Message  # what the audits found
    since: WallTime | None = None  # when (wall clock)
    # What the owner can do, in a sentence (from the head: the operator's contact may be in it).
    hint: Message = ""


@dataclass(frozen=True)
class ServingStatus:
    """Whether the PC serves now and, if not, why (serving hours, heat): the owner's settings
    at work. The owner's own `garage-node drain` is engine.draining, not this."""

    serving: bool | None = True  # None: not known (the agent is down)
    paused: Message | None = None  # why not, for a person
    until: WallTime | None = None  # when the serving hours next change (wall clock)
    schedule: Message | None = None  # the windows and zone, e.g. "mon-fri 23:00-08:00, sat-sun (Europe/Berlin)"
    max_temp_c: TempLimit | None = None
    resume_temp_c: TempLimit | None = None
    power_limit_w: WattSetting | None = None  # what [gpu] power_limit_w asks for
    power_note: Message | None = None  # what NVML made of it (clamped, refused, not supported)


@dataclass(frozen=True)
class ProblemStatus:
    message: str
    hint: str = ""
    age_s: float | None = None
    retry_in_s: float | None = None
    source: str | None = None  # which part of the agent has it (node/health.py's Source)


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
    # Every current problem, worst first (`last_error` is the first of them).
    problems: list[ProblemStatus] = field(default_factory=list)
    # What the head's placement knows of this PC, and what it assigned (None: nothing yet).
    placement: PlacementFacts | None = None
    assignment: Assignment | None = None
    update: UpdateStatus | None = None  # the OS and its updates (None: not an A/B stick, or unknown)
    # The head's audits quarantined this PC (from the head's last answer); None: not quarantined.
    quarantine: QuarantineStatus | None = None


# ---------------------------------------------------------------- node -> head


@dataclass(frozen=True)
class EngineReport:
    """What the head learns of a node's engine (the gateway routes by it)."""

    state: EngineState
    model: ModelName | None = None
    endpoint: ShortText | None = None
    draining: bool | None = None
    healthy_since: WallTime | None = None
    requests_running: Count | None = None
    requests_waiting: Count | None = None
    # The share of the engine's KV cache in use, 0-100 (vLLM's kv_cache_usage_perc): the
    # gateway's router weighs it with the request counts.
    kv_cache_usage_pct: Percent | None = None
    generation_tokens_per_s: TokensPerSecond | None = None  # for the fleet page's tokens/s

    @classmethod
    def of(cls, engine: EngineStatus) -> EngineReport:
        """The report of an engine's status. Each field is carried from EngineStatus's field
        of the same name, so a new metric needs only its two declarations (a test fails if
        EngineStatus lacks one of these fields); the exceptions are written out here."""
        carried = {f.name: getattr(engine, f.name) for f in fields(cls)}
        carried.update(
            model=clip(engine.model, MODEL_NAME_MAX), endpoint=clip(engine.endpoint, SHORT_TEXT_MAX),
            # Paused for the owner's hours or heat: no new work, as with the owner's drain.
            draining=engine.draining or bool(engine.paused),
        )
        return cls(**carried)


@dataclass(frozen=True)
class PlacementFacts:
    """What the head's placement must know of a PC beyond its GPUs (issue #18). None in a
    report from an older agent: the head then never assigns that PC anything."""

    device: ShortText = "gpu"  # [engine] device: "gpu", or "cpu" (a vLLM CPU build; tests)
    # The owner's pin in garage.toml: "only this model or nothing". None: any model.
    pinned_model: ModelName | None = None
    pinned_quantization: ShortText | None = None
    # Paused for the owner's serving hours or heat (or drained by the owner): nothing new.
    paused: bool = False
    # Catalog names of the models whose weights this PC holds, checked against their manifest.
    weights_held: Annotated[list[ModelName], *_at_most(64)] = field(default_factory=list)
    free_disk_mib: MiB | None = None  # room left for weights on the data partition
    # The generation of the head's assignment the agent is carrying out (0: none yet).
    assignment_generation: Count = 0
    # Set from the moment a switch begins until the new engine is healthy: the gateway sends
    # this PC no new requests meanwhile (the old engine drains).
    switching_to: ModelName | None = None
    fetch_pct: Percent | None = None  # weights of `switching_to` fetched so far
    # The newest assignment this PC refused (0: none) and why (the owner's pin differs, it does
    # not fit, its weights failed their check, its engine never became healthy): the head then
    # counts the PC as not running that model and, for a while, assigns it something else.
    refused_generation: Count = 0
    refused_why: Message | None = None


class UpdateOutcome(StrEnum):
    """How the PC's last update of its OS went (issue #19)."""

    INSTALLING = "installing"  # written to the other slot; rebooting into it
    OK = "ok"  # booted into it, and the boot was blessed (its health gate passed)
    FAILED = "failed"  # not installed (the signature, a sum, the write): still on the old version
    ROLLED_BACK = "rolled-back"  # booted into it, its tries ran out, back on the old version


@dataclass(frozen=True)
class UpdateStatus:
    """The PC's OS and its updates (issue #19): the A/B stick's two versions, the boot counter,
    the owner's [update] policy and the last update's outcome. None from an older agent, which
    the head's rollouts then leave out."""

    os_version: ShortText | None = None  # the booted version (os-release IMAGE_VERSION)
    variant: ShortText | None = None  # the stick's variant: "base" or "nvidia" (a release is for one)
    other_version: ShortText | None = None  # the other slot's version; None: empty
    blessed: bool | None = None  # the current boot was marked good; None: not known
    tries_left: Count | None = None  # boots left before systemd-boot falls back (unblessed only)
    policy: ShortText | None = None  # [update] when: "window", "idle", "never" or "ask"
    target: ShortText | None = None  # the version the head wants here; None: none
    pending_why: Message | None = None  # why the target is not being installed now
    last_version: ShortText | None = None
    last_outcome: UpdateOutcome | None = None
    last_why: Message | None = None
    last_at: WallTime | None = None


@dataclass(frozen=True)
class CatalogPrecision:
    """One precision of a CatalogModel: [models.NAME.quantizations.KEY] of configs/models.toml."""

    name: ShortText  # the catalog key: "bf16", "awq", ...
    bytes_per_param: BytesPerParam
    dtype: ShortText  # vLLM --dtype
    model_id: ModelName  # the repo with these weights
    vllm_quantization: ShortText | None = None  # vLLM --quantization; None: as stored
    min_compute_capability: ComputeCapability = "0.0"


@dataclass(frozen=True)
class CatalogModel:
    """A model's catalog entry as the head planned with it (configs/models.toml's [models.NAME],
    or one the operator imported with `head model import`), carried in the assignment so a PC
    whose own catalog lacks the model (or has other facts for it) plans and runs the same."""

    name: ModelName  # the catalog key, as Assignment.model names it
    id: ModelName  # the repo id, the name the engine serves it under
    parameters: ParamCount
    num_layers: Count
    num_attention_heads: Count
    num_kv_heads: Count
    head_dim: Count
    default_context_length: Count
    min_compute_capability: ComputeCapability
    quantizations: Annotated[list[CatalogPrecision], *_at_most(16)]
    cpu: bool = False
    test_only: bool = False


@dataclass(frozen=True)
class Assignment:
    """What the head wants a PC to serve, in the heartbeat's answer (issue #18). The agent
    carries it out; with none (an older head, or placement off) the PC plans for itself."""

    # Grows with every change the head makes to this PC's assignment, so an agent never
    # carries out an older one than it has seen.
    generation: Count
    # The catalog name to serve; None: the head wants this PC to serve nothing now.
    model: ModelName | None = None
    quantization: ShortText | None = None  # None: the highest precision that fits
    max_model_len: Count | None = None
    gpu_indices: Annotated[list[GpuIndex], *_at_most(MAX_GPUS)] = field(default_factory=list)
    tensor_parallel_size: GpuCount = 1
    pipeline_parallel_size: GpuCount = 1
    # vLLM's VLLM_PP_LAYER_PARTITION for unequal GPUs: layers per pipeline stage (empty: even).
    layer_partition: Annotated[list[Count], *_at_most(MAX_GPUS)] = field(default_factory=list)
    # Where the head's model store holds this model's weights (a path on the head's control
    # API, e.g. "/v1/store/tiny-a/"); None: fetch from the model hub as before.
    weights_path: ShortText | None = None
    reason: Message = ""  # why the head chose this, in words and numbers
    # The model's catalog entry the head planned with; None: an older head (the PC's own
    # catalog must know the model). The PC checks it with its settings validator, and its own
    # entry of the same name wins when the facts are the same.
    catalog_entry: CatalogModel | None = None


@dataclass(frozen=True)
class NodeReport:
    """Sent with every enrollment and heartbeat; never a secret. Bounded (see "bounds" above)."""

    state: NodeState
    message: Message
    gpus: Annotated[list[GPU], *_at_most(MAX_GPUS)]
    gpu_note: Message | None
    driver_version: ShortText | None
    cuda_version: ShortText | None
    versions: AgentVersions
    ray: RayStatus
    engine: EngineReport
    serving: ServingStatus | None = None  # None: an older agent
    placement: PlacementFacts | None = None  # None: an older agent (never assigned anything)
    update: UpdateStatus | None = None  # None: an older agent, or no A/B stick (never in a rollout)

    @classmethod
    def of(cls, status: Status) -> NodeReport:
        """What the head learns of a node whose status is `status` (the agent's snapshot): each
        field carried from Status's of the same name, cut to the bounds the head checks, since
        a long message must not cost the heartbeat. Raises ValueError for a status without
        versions (only `status` of a stopped agent has none)."""
        if status.versions is None:
            raise ValueError("a node report needs the agent's versions, and this status has none")
        carried = {f.name: getattr(status, f.name) for f in fields(cls)}
        carried.update(
            message=clip(status.message, MESSAGE_MAX), gpu_note=clip(status.gpu_note, MESSAGE_MAX),
            gpus=[replace(g, error=clip(g.error, MESSAGE_MAX)) for g in status.gpus[:MAX_GPUS]],
            engine=EngineReport.of(status.engine),
        )
        return cls(**carried)


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
class HeartbeatExtras:
    """The gateway's and the placement's part of a heartbeat's answer (see HeartbeatReply): the
    head's control API asks for it by node id and adds it; a head without them gives the defaults."""

    engine_api_key: str = field(default="", repr=False)
    tokens_served: TokensServed | None = None
    # The head's placement's part (head/placement.py): the PC's assignment, or None.
    assignment: Assignment | None = None
    # The head's rollout's part (head/rollout.py): the OS version this PC should update to.
    update_target: ShortText | None = None
    # The audits' part (head/audit/trust.py): why this PC is quarantined, or None.
    quarantine: QuarantineStatus | None = None


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
    # The Ray head has declared this node's Ray node dead (Ray never takes a dead node back: a
    # raylet cut off longer than Ray's health checks allow is refused when it reconnects), so a
    # worker that was listed alive restarts at once instead of waiting to be missed. False from
    # an older head, and while the Ray head is down or starting (nothing is known then).
    ray_dead: bool = False
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
    # What the head wants this PC to serve (issue #18); None: plan for yourself.
    assignment: Assignment | None = None
    # The OS release this PC should update to (issue #19; served under /v1/releases/<version>/);
    # None: stay on what it runs.
    update_target: ShortText | None = None
    # The region's audits quarantined this PC (issue #20): no customers, no Ray work, earnings
    # frozen; the agent stops offering its GPUs to Ray and tells its owner. None: it is not.
    quarantine: QuarantineStatus | None = None


@dataclass(frozen=True, kw_only=True)
class CredentialReply:
    """POST /v1/nodes/{id}/credential: a new credential (and the node's WireGuard key as the
    hub now knows it). The one it replaces stays valid for a short overlap."""

    node_id: str
    credential: str = field(repr=False)  # returned once; the head keeps only a hash
    credential_expires_in_s: float
    credential_lifetime_s: float
    wg_public_key: str
