"""The head's typed configuration: /etc/garage-node/head.toml."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from garage_node.core.overlay import IFNAME, WG_IMPLEMENTATIONS
from garage_node.head.federation.config import FederationSection
from garage_node.core.settings import ConfigError, nonnegative, one_of, parse, positive, read_toml, setting, tcp_port

DEFAULT_HEAD_CONFIG = Path("/etc/garage-node/head.toml")



def _cidr(text: str) -> ipaddress.IPv4Network:
    if not isinstance(text, str):
        raise ValueError(text)
    return ipaddress.IPv4Network(text)


@dataclass(frozen=True)
class HeadSection:
    region: str = "home"
    state_dir: Path = Path("/var/lib/garage-head")


@dataclass(frozen=True)
class ApiSection:
    listen_host: str = "0.0.0.0"
    port: int = setting(8443, check=tcp_port())
    # The address nodes use, written into join tokens and the server certificate.
    advertise_host: str = ""
    # TCP ports open to everyone besides the control API (the firewall closes all others, Ray's
    # included, except through WireGuard). 22: so an operator keeps SSH.
    open_tcp: tuple[int, ...] = (22,)
    # Hostile input: the API is open to the internet. A request body over this is refused
    # (413); a request whose headers and body are not all in within request_timeout_s of its
    # first byte, or a TLS handshake not done within tls_handshake_timeout_s, is cut off; one
    # address may hold at most max_connections_per_client connections (head/connguard.py).
    max_body_bytes: int = setting(32768, check=positive())
    request_timeout_s: float = setting(10.0, check=positive())
    tls_handshake_timeout_s: float = setting(10.0, check=positive())
    max_connections_per_client: int = setting(32, check=positive())


@dataclass(frozen=True)
class HubSection:
    interface: str = setting("garage-hub", check=IFNAME)
    implementation: str = setting("auto", check=one_of(*WG_IMPLEMENTATIONS))
    cidr: str = setting("100.96.0.0/16", check=(lambda v: _valid_cidr(v), "an IPv4 network like 100.96.0.0/16"))
    listen_port: int = setting(51820, check=tcp_port())
    # host:port nodes send WireGuard to; empty: advertise_host and listen_port.
    endpoint: str = ""

    def problems(self):
        if ipaddress.IPv4Network(self.cidr).prefixlen > 29:
            yield "cidr", "is too small for a region; use /24 or larger."


def _valid_cidr(text: str) -> bool:
    try:
        _cidr(text)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class HeadRaySection:
    command: str = ""
    port: int = setting(6379, check=tcp_port())
    temp_dir: Path = Path("/tmp/garage-ray-head")
    num_cpus: int = setting(0, check=nonnegative())  # 0: let Ray count them
    memory_mib: int = setting(0, check=nonnegative())  # 0: let Ray decide
    object_store_mib: int = setting(0, check=nonnegative())
    # Ray's GCS fault tolerance (head/gcs.py): the GCS keeps its state in a Redis of the head's
    # own (Debian's redis-server, on 127.0.0.1:redis_port), so a restarted head keeps its Ray
    # cluster and the PCs' raylets reconnect instead of dying. false: no Redis, and a head
    # restart makes every PC restart its Ray worker.
    gcs_fault_tolerance: bool = True
    redis_port: int = setting(6390, check=tcp_port())
    redis_command: str = ""  # empty: redis-server from PATH


@dataclass(frozen=True)
class HeadOptions:
    default_token_ttl_s: int = setting(24 * 3600, check=positive())
    # 5 s: a thousand PCs make 200 heartbeats/s, which one core holds (docs/benchmarks.md).
    heartbeat_s: float = setting(5.0, check=positive())
    # A node unheard for this long is shown as offline: three heartbeats, so a PC lost is seen
    # within 15 s (as Ray sees it, head/ray.py), and one late heartbeat is not an outage.
    offline_after_s: float = setting(15.0, check=positive())
    # The server acknowledges heartbeats from memory and writes them to the registry this often
    # (head/registry.py): a crash loses at most this much of "last seen"; the `head nodes`
    # command, which reads the file, is at most this far behind.
    heartbeat_batch_s: float = setting(0.25, check=positive())
    peer_sync_s: float = setting(2.0, check=positive())
    # An enrollment whose node never came back with its credential (no authenticated
    # heartbeat) is removed after this long: its address and hub peer go, the token's use returns.
    reclaim_unconfirmed_after_s: float = setting(3600.0, check=positive())
    # Node credentials: how long one is valid (nodes renew it when a third is left), and how
    # long the one a renewal replaced still works (an answer lost on the way is not fatal).
    credential_lifetime_s: float = setting(30 * 86400.0, check=positive())
    credential_overlap_s: float = setting(3600.0, check=positive())


@dataclass(frozen=True)
class GatewaySection:
    """The region's OpenAI-compatible front door (head/gateway/)."""

    enabled: bool = True
    listen_host: str = "0.0.0.0"
    port: int = setting(8080, check=tcp_port())
    # A certificate and key (PEM files) to serve HTTPS; empty: plain HTTP, for a reverse proxy
    # (Caddy, nginx) in front that holds the public certificate (see docs/operating.md).
    tls_cert: str = ""
    tls_key: str = ""
    # Prometheus metrics for the whole region, on their own listener (loopback by default:
    # they name keys and PCs).
    metrics_host: str = "127.0.0.1"
    metrics_port: int = setting(9464, check=tcp_port())
    max_body_bytes: int = setting(4 * 1024 * 1024, check=positive())
    # How long to wait for a PC to accept the connection, and for its first byte; past either
    # the request goes to another PC serving the model (at most max_attempts PCs in all).
    connect_timeout_s: float = setting(3.0, check=positive())
    first_byte_timeout_s: float = setting(120.0, check=positive())
    # A request still without its first byte once the PC, heartbeating, reports its engine
    # holding no request (none running, none waiting) in a report sent this long after the
    # request: lost on that PC, and sent to another. Above the engine's metrics interval plus
    # a heartbeat (~11 s); a long prompt is safe, the engine reports it running.
    silent_first_byte_s: float = setting(20.0, check=positive())
    # Once a stream has begun: this long without a byte from the PC ends it with an error event.
    stream_idle_timeout_s: float = setting(60.0, check=positive())
    max_attempts: int = setting(3, check=positive())
    # A PC not heard from for this long takes no new requests.
    stale_after_s: float = setting(15.0, check=positive())
    # Routing (head/gateway/router.py): prefix affinity when at least this share of the prompt
    # matches what a PC served, unless load is skewed by more than balance_abs requests and
    # balance_rel times (2, not vllm-router's 64: see router.py).
    affinity_threshold: float = setting(0.3, check=(lambda v: 0.0 <= v <= 1.0, "a share between 0 and 1"))
    balance_abs: int = setting(2, check=positive())
    balance_rel: float = setting(1.5, check=positive())
    # "least-load-affinity" (the above), or "round-robin" (each PC in turn; for comparison).
    policy: str = setting("least-load-affinity", check=one_of("least-load-affinity", "round-robin"))
    # A request for a model in the region's catalog that no PC serves yet waits here while the
    # head places the model (head/placement.py): at most hold_queue such requests at once, each
    # at most hold_s (a 7B model's first start on a PC takes a minute or two); past either, 503
    # with Retry-After and "the model is loading". A model outside the catalog: 404 at once.
    hold_queue: int = setting(64, check=nonnegative())
    hold_s: float = setting(120.0, check=positive())
    # Admission (head/gateway/admission.py): past either bound a request gets 503 "overloaded"
    # with Retry-After at once, instead of queueing behind the others until all are slow. At
    # most max_in_flight requests handled at once (streams until their end); once the gateway's
    # event loop runs more than max_queue_age_s behind twice in a row (its CPU is spent), new
    # requests only at a rate that follows the lag (never under 50/s).
    max_in_flight: int = setting(1024, check=positive())
    max_queue_age_s: float = setting(0.05, check=positive())
    # Connections to the PCs' engines kept open between requests (0: none), and for how long:
    # below uvicorn's and vLLM's 5 s keep-alive, so the gateway never sends on a connection the
    # engine is closing. Not a count: aiohttp's pool (since issue #22) keeps every idle
    # connection for engine_keepalive_s and has no bound on how many; the open ones are bounded
    # by max_in_flight x max_attempts. (Under httpx the count bounded a pool it walked per request.)
    engine_keepalive_connections: int = setting(64, check=nonnegative())
    engine_keepalive_s: float = setting(4.0, check=positive())
    # Processes serving the gateway's port (SO_REUSEPORT: the kernel spreads connections over
    # them), the head's own included: one per core the gateway may use. Each has its own
    # admission limit (max_in_flight, the hold queue) and routes on its own count of open
    # requests; keys' limits are shared, audits sample the head's own share (workers.py).
    workers: int = setting(1, check=(lambda v: 1 <= v <= 64, "a number of processes from 1 to 64"))

    def problems(self):
        if bool(self.tls_cert) != bool(self.tls_key):
            yield "tls_cert", "and tls_key go together: set both (HTTPS) or neither (plain HTTP behind a proxy)."


@dataclass(frozen=True)
class PlacementSection:
    """The head decides what each PC serves (head/placement.py, issue #18). With an empty region
    catalog (`garage-node head model add` never run) the head assigns nothing and every PC plans
    for itself, as before; so it is on by default."""

    enabled: bool = True
    # How often the head decides (a pass over a thousand PCs takes milliseconds, see
    # bench/placement.py); a new model or a burst of demand is acted on within this.
    interval_s: float = setting(5.0, check=positive())
    # At most this many PCs start a switch per minute, region-wide: a switch empties a PC for
    # the minute or two its new engine takes to start. 0: no PC serving a model is moved (PCs
    # without one still get one).
    moves_per_minute: int = setting(6, check=nonnegative())
    # The model catalog the region's models come from (plus `head model import`); empty:
    # /etc/garage-node/models.toml, else the catalog shipped with garage-node.
    catalog: str = ""


@dataclass(frozen=True)
class AuditSection:
    """Audits of what PCs answer (head/audit/, issue #20): the gateway keeps a sample of
    completed requests, a trusted engine re-scores the PC's own tokens, a sequential test per
    PC decides, and a PC that fails is quarantined. Nothing a PC receives differs for an
    audited request. Without a verifier (no PC marked trusted with `head node trust`, no
    verifier_url) samples are kept but not scored, and `head audit status` says so."""

    enabled: bool = True
    # Share of each PC's completed requests kept for re-scoring: `rate` for an established PC,
    # `new_rate` for its first `new_requests` requests, `suspect_rate` while its record leans
    # towards cheating (the sequential test's sum above 0).
    rate: float = setting(0.02, check=(lambda v: 0.0 <= v <= 1.0, "a share between 0 and 1"))
    new_rate: float = setting(0.15, check=(lambda v: 0.0 <= v <= 1.0, "a share between 0 and 1"))
    new_requests: int = setting(500, check=nonnegative())
    suspect_rate: float = setting(0.25, check=(lambda v: 0.0 <= v <= 1.0, "a share between 0 and 1"))
    # Canary requests the head sends itself through the normal path, as a share of traffic.
    canary_rate: float = setting(0.005, check=(lambda v: 0.0 <= v <= 1.0, "a share between 0 and 1"))
    # A file of canary prompts (JSON lines: {"messages": [...]} or {"prompt": "..."}); empty:
    # the prompts shipped with garage-node.
    canary_prompts: str = ""
    # An engine on the head's own machine (OpenAI-compatible vLLM of the same image and model)
    # used as the verifier, besides any PC marked trusted; its API key in a 0600 file.
    verifier_url: str = ""
    verifier_key_file: str = ""
    # The chance that an honest PC is ever quarantined by the sequential test, given thresholds
    # calibrated on honest runs (the README says how).
    false_quarantine: float = setting(1e-4, check=(lambda v: 0.0 < v < 0.5, "a probability between 0 and 0.5"))
    # Credited tokens count as earned only after this many days; a quarantine freezes them.
    hold_days: float = setting(7.0, check=nonnegative())
    # Samples waiting for the verifier beyond this are dropped, oldest first (counted).
    max_pending: int = setting(1000, check=positive())
    # How long scored audits are kept.
    keep_days: float = setting(30.0, check=positive())


@dataclass(frozen=True)
class FleetSection:
    """The operator's fleet page (head/fleetpage/): read-only, on a listener of its own, never
    on the control API's or the gateway's."""

    enabled: bool = True
    # Loopback by default: open it through an SSH tunnel. Any other address needs the admin
    # key (`garage-node head fleet-key`) and is served over HTTPS with the head's certificate.
    listen_host: str = setting("127.0.0.1", check=(lambda v: _ip_address(v), "an IP address of this machine"))
    port: int = setting(8444, check=tcp_port())
    # Ask for the admin key on loopback too (anyone with a shell on the head reaches loopback).
    require_key: bool = False
    # How much of each PC's history (state changes, temperature, throughput) the page keeps,
    # in memory only.
    history_hours: float = setting(6.0, check=(lambda v: 0 < v <= 48, "between 0 and 48 hours"))

    @property
    def needs_key(self) -> bool:
        return self.require_key or not ipaddress.ip_address(self.listen_host).is_loopback


def _ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class HeadConfig:
    head: HeadSection = field(default_factory=HeadSection)
    api: ApiSection = field(default_factory=ApiSection)
    overlay: HubSection = field(default_factory=HubSection)
    ray: HeadRaySection = field(default_factory=HeadRaySection)
    options: HeadOptions = field(default_factory=HeadOptions)
    gateway: GatewaySection = field(default_factory=GatewaySection)
    fleet: FleetSection = field(default_factory=FleetSection)
    placement: PlacementSection = field(default_factory=PlacementSection)
    audit: AuditSection = field(default_factory=AuditSection)
    federation: FederationSection = field(default_factory=FederationSection)  # issue #21

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


def load_head_config(path: Path | None = None) -> HeadConfig:
    path = path or Path(os.environ.get("GARAGE_HEAD_CONFIG", DEFAULT_HEAD_CONFIG))
    if not path.exists():
        raise ConfigError(
            f"{path}: head config not found. Copy configs/head.example.toml there and set "
            "[api] advertise_host to the address nodes reach this head at."
        )
    cfg = parse(HeadConfig(), read_toml(path, ConfigError), path, error=ConfigError)
    if not cfg.api.advertise_host:
        raise ConfigError(
            f"{path}: 'api.advertise_host' is empty. Set it to the IP or DNS name nodes reach "
            "this head at; it goes into join tokens and the head's certificate."
        )
    if cfg.gateway.workers > 1 and cfg.federation.enabled:
        # The spill-over to other regions sits in front of the head's own gateway only
        # (federation/hooks.py); the extra workers would answer 503 where it spills.
        raise ConfigError(
            f"{path}: [gateway] workers = {cfg.gateway.workers} does not work with [federation] enabled yet: "
            "set workers = 1, or turn federation off (docs/not-done.md)."
        )
    return cfg
