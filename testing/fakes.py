"""Fakes for the edges of the agent and the engine manager: the clock, the head, the WireGuard
interface, the Ray child process, Docker and the engine's HTTP endpoints.

They stand where the real thing would (the agent's constructor takes them), so a unit test
drives the agent's and the engine manager's real decisions in-process, with time moved by hand.
The namespace, Docker and QEMU suites prove the same behaviour on the real parts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Callable

from garage_node.core.firewall import FirewallError, Rules
from garage_node.core.supervise import ChildState, RunAs
from garage_node.core.token import JoinToken
from garage_node.core.wire import (AgentVersions, CredentialReply, EngineReport, EngineState, EnrollReply, HeartbeatReply, HubInfo,
                                   TokensServed,
                                   NodeReport, NodeState, RayState, RayStatus, RegionFacts, Versions)
from garage_node.core.wireguard import Peer, PeerStatus, WireGuardError, generate_private_key, public_key_of
from garage_node.node.engine.docker import Container, DockerError, ImageConfig
from garage_node.node.engine.metrics import Metrics
from garage_node.node.headclient import HeadUnreachable, Refused, Revoked
from garage_node.node.identity import Identity


class FakeClock:
    """Time that moves only when a test says so (and when someone waits)."""

    def __init__(self, start: float = 1000.0, wall: float = 1_800_000_000.0) -> None:
        self.mono, self.wall = start, wall

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds

    def wait(self, event: threading.Event, timeout: float) -> bool:
        if event.is_set():
            return True
        self.advance(timeout)
        return False


# The versions the fake head states and the rigs' agents run (handed in, so the agent's tests
# do not depend on the Ray and Python of the machine that runs them).
VERSIONS = Versions("2.60.0", "3.11")


def region_facts(**kw) -> RegionFacts:
    base = dict(prefix_len=16, hub=HubInfo("100.96.0.1", public_key_of(generate_private_key()), "10.9.0.1:51820"),
                ray_address="100.96.0.1:6379", region="testland", heartbeat_s=10.0,
                versions=VERSIONS)
    return RegionFacts(**{**base, **kw})


def sample_report(state: NodeState = NodeState.JOINED) -> NodeReport:
    return NodeReport(
        state=state, message=f"{state.value} (sample)", gpus=[], gpu_note="no NVIDIA GPU found", driver_version=None,
        cuda_version=None, versions=AgentVersions("0.1.0", "2.60.0", "3.11"), ray=RayStatus(state=RayState.STARTING),
        engine=EngineReport(state=EngineState.DISABLED),
    )


@dataclass
class FakeHead:
    """The head as HeadApi presents it: enrollment and heartbeats, with switches for failures."""

    clock: FakeClock
    facts: RegionFacts = field(default_factory=region_facts)
    up: bool = True
    refuse: str | None = None  # an error code: the next enrollments are refused for good
    revoked: bool = False
    ray_alive: bool = False
    ray_token: str = "ray-cluster-secret"
    ray_cluster_id: str = ""  # the Ray cluster the head's Ray runs ("": not known)
    ray_dead: bool = False  # the head's Ray declared this node's Ray node dead
    engine_api_key: str = "gne-engine-key"
    tokens_served: TokensServed | None = None
    update_target: str | None = None  # the head's rollout's target for the PC (issue #19)
    enrollments: int = 0
    heartbeats: list[NodeReport] = field(default_factory=list)
    # Credentials: lifetime told with heartbeats (None: a head that does not expire them),
    # what each node holds now, and the public keys the hub has.
    credential_lifetime_s: float | None = None
    credentials: dict[str, str] = field(default_factory=dict)
    issued_at: dict[str, float] = field(default_factory=dict)  # when each node's credential was made
    renewals: list[str] = field(default_factory=list)  # the WireGuard public key of each renewal
    keys: dict[str, str] = field(default_factory=dict)  # public key -> node id
    lose_answers: int = 0  # the next enrollments commit, then their answer is lost (a crash)
    issued: int = 0

    def expires_in(self, node_id: str) -> float | None:
        if self.credential_lifetime_s is None:
            return None
        return self.credential_lifetime_s - (self.clock.time() - self.issued_at.get(node_id, self.clock.time()))

    def new_credential(self) -> str:
        self.issued += 1
        return "cred-secret" if self.issued == 1 else f"cred-secret-{self.issued}"

    def enroll(self, tok: JoinToken, name: str, report: NodeReport, wg_private_key: str,
               expected_region: str = "") -> tuple[Identity, bytes]:
        if not self.up:
            raise HeadUnreachable(f"head unreachable at {tok.api_url}: connection refused")
        if self.refuse:
            raise Refused(f"the head refused to enroll this node: {self.refuse}", code=self.refuse)
        public = public_key_of(wg_private_key)
        node_id = self.keys.get(public)  # the same key again: the same identity (registry.enroll)
        if node_id is None:
            self.enrollments += 1
            node_id = f"n{self.enrollments:04d}"
            self.keys[public] = node_id
        self.credentials[node_id] = self.new_credential()
        self.issued_at[node_id] = self.clock.time()
        if self.lose_answers:
            self.lose_answers -= 1
            raise HeadUnreachable(f"head unreachable at {tok.api_url}: connection reset")
        number = int(node_id[1:])
        reply = EnrollReply(node_id=node_id, credential=self.credentials[node_id], overlay_ip=f"100.96.0.{1 + number}",
                            ray_token=self.ray_token, engine_api_key=self.engine_api_key,
                            **{f: getattr(self.facts, f) for f in ("prefix_len", "hub", "ray_address", "region", "heartbeat_s", "versions")})
        return Identity.from_enrollment(name, tok.api_url, wg_private_key, reply, self.clock.time()), b"CA PEM"

    def connect(self, ident: Identity, ca_pem: bytes) -> "FakeHeadClient":
        return FakeHeadClient(self, ident)


@dataclass
class FakeHeadClient:
    head: FakeHead
    ident: Identity
    closed: bool = False

    def heartbeat(self, report: NodeReport) -> HeartbeatReply:
        h = self.head
        if not h.up:
            raise HeadUnreachable(f"head unreachable at {self.ident.api_url}: connection refused")
        if h.revoked:
            raise Revoked("the operator revoked this node: it needs a new join token to rejoin")
        if h.credentials.get(self.ident.node_id, self.ident.credential) != self.ident.credential:
            raise HeadUnreachable("the head answered 401: the head does not recognise this node's credential")
        h.heartbeats.append(report)
        return HeartbeatReply(node_id=self.ident.node_id, ray_alive=h.ray_alive, ray_token=h.ray_token,
                              ray_cluster_id=h.ray_cluster_id, ray_dead=h.ray_dead,
                              engine_api_key=h.engine_api_key, tokens_served=h.tokens_served,
                              update_target=h.update_target,
                              credential_expires_in_s=h.expires_in(self.ident.node_id), credential_lifetime_s=h.credential_lifetime_s,
                              **{f: getattr(h.facts, f) for f in ("prefix_len", "hub", "ray_address", "region", "heartbeat_s", "versions")})

    def renew_credential(self, wg_public_key: str | None) -> CredentialReply:
        h = self.head
        if not h.up:
            raise HeadUnreachable(f"head unreachable at {self.ident.api_url}: connection refused")
        if h.revoked:
            raise Revoked("the operator revoked this node: it needs a new join token to rejoin")
        node_id = self.ident.node_id
        h.renewals.append(wg_public_key or "")
        h.credentials[node_id] = h.new_credential()
        h.issued_at[node_id] = h.clock.time()
        if wg_public_key:
            h.keys = {k: v for k, v in h.keys.items() if v != node_id} | {wg_public_key: node_id}
        lifetime = h.credential_lifetime_s or 3600.0
        return CredentialReply(node_id=node_id, credential=h.credentials[node_id], credential_expires_in_s=lifetime,
                               credential_lifetime_s=lifetime, wg_public_key=wg_public_key or "")

    def close(self) -> None:
        self.closed = True


class FakeInterface:
    def __init__(self, name: str = "garage0") -> None:
        self.name = name
        self.is_up = False
        self.tunnel_carries = True  # False: WireGuard's UDP is blocked (pings to the hub go unanswered)
        self.fail: str | None = None  # the next up() raises this
        self.peer: Peer | None = None
        self.addr: str | None = None

    def exists(self) -> bool:
        return self.is_up

    def address(self) -> str | None:
        return self.addr.split("/")[0] if self.addr else None

    def up(self, private_key: str, address: str, listen_port: int | None = None) -> None:
        if self.fail:
            raise WireGuardError(self.fail)
        self.is_up, self.addr = True, address

    def set_peer(self, peer: Peer) -> None:
        self.peer = peer

    def peers(self) -> list[PeerStatus]:
        return []

    def down(self) -> None:
        self.is_up, self.peer = False, None


class FakeChild:
    """A supervised process (core.supervise.Supervised) without the process."""

    def __init__(self, clock: FakeClock, restart_delay_s: float = 2.0) -> None:
        self.clock = clock
        self.state = ChildState()
        self.run_as: RunAs | None = None
        self.restart_delay_s = restart_delay_s
        self.starts: list[list[str]] = []

    @property
    def running(self) -> bool:
        return self.state.running

    def ensure(self, argv: list[str]) -> bool:
        if self.state.running:
            return True
        if self.clock.monotonic() < self.state.next_start_at:
            return False
        self.starts.append(argv)
        self.state = replace(self.state, running=True, pid=4000 + len(self.starts), started_at=self.clock.monotonic())
        return True

    def exit(self, code: int) -> None:
        """The child dies by itself (Ray worker crash)."""
        self.state = replace(self.state, running=False, pid=None, restarts=self.state.restarts + 1, last_exit_code=code,
                             next_start_at=self.clock.monotonic() + self.restart_delay_s)

    def stop(self, timeout_s: float = 15.0) -> None:
        self.state = replace(self.state, running=False, pid=None)

    def retry_now(self) -> None:
        self.state = replace(self.state, next_start_at=0.0)


class FakeDocker:
    """The Docker Engine API as EngineManager uses it, holding containers in a dict."""

    def __init__(self, images: tuple[str, ...] = ()) -> None:
        self.images = set(images)
        # What GET /images/{name}/json says (Env, Labels); an image not listed has neither.
        self.image_configs: dict[str, ImageConfig] = {}
        self.pullable: set[str] = set()
        self.containers: dict[str, Container] = {}
        self.bodies: dict[str, dict] = {}
        self.down = False
        self.stops: list[str] = []
        self._ids = 0

    def _check(self) -> None:
        if self.down:
            raise DockerError("Docker is not reachable at /var/run/docker.sock. Start it: systemctl start docker",
                              unavailable=True)

    def ping(self) -> None:
        self._check()

    def image_exists(self, ref: str) -> bool:
        self._check()
        return ref in self.images

    def image_config(self, ref: str) -> ImageConfig:
        self._check()
        if ref not in self.images:
            raise DockerError(f"No such image: {ref}", status=404)
        return self.image_configs.get(ref, ImageConfig())

    def pull(self, ref: str, progress: Callable[[str], None]) -> None:
        self._check()
        if ref not in self.pullable:
            raise DockerError(f"pull access denied for {ref}", status=404)
        progress("Downloading 50%")
        self.images.add(ref)

    def container(self, name: str) -> Container | None:
        self._check()
        return self.containers.get(name)

    def create(self, name: str, body: dict) -> str:
        self._check()
        self._ids += 1
        cid = f"{self._ids:064x}"
        self.bodies[name] = body
        self.containers[name] = Container(cid, name, False, "created", None, dict(body["Labels"]), "", 0)
        return cid

    def start(self, name: str) -> None:
        self._check()
        self.containers[name] = replace(self.containers[name], running=True, status="running", exit_code=None)

    def crash(self, name: str, code: int = 1) -> None:
        self.containers[name] = replace(self.containers[name], running=False, status="exited", exit_code=code)

    def stop(self, name: str, timeout_s: int) -> None:
        self._check()
        self.stops.append(name)
        if name in self.containers:
            self.containers[name] = replace(self.containers[name], running=False, status="exited", exit_code=0)

    def remove(self, name: str) -> None:
        self._check()
        self.containers.pop(name, None)

    def logs(self, name: str, tail: int = 20, since: int = 0) -> list[str]:
        return ["RuntimeError: CUDA out of memory"]

    def close(self) -> None:
        pass


class FakeProbe:
    """The engine's /health, /v1/models and /metrics."""

    def __init__(self) -> None:
        self.is_ready = False
        self.current: Metrics | None = Metrics(running=0, waiting=0, generation_tokens_total=0.0)

    def ready(self, spec) -> bool:
        return self.is_ready

    def metrics(self, spec) -> Metrics | None:
        return self.current

    def close(self) -> None:
        pass


class FakeFirewall:
    """nftables as the agent sees it: tables that exist, and a switch to make nft fail."""

    def __init__(self) -> None:
        self.tables: dict[str, Rules] = {}
        self.fail: str | None = None
        self.applied = 0

    def apply(self, rules: Rules) -> None:
        if self.fail:
            raise FirewallError(self.fail)
        self.tables[rules.table] = rules
        self.applied += 1

    def remove(self, table: str) -> None:
        self.tables.pop(table, None)

    def present(self, table: str) -> bool:
        return table in self.tables


def ray_account(user: str, groups: tuple[str, ...] = ()) -> RunAs:
    """An unprivileged account, as RunAs.lookup would find it on a stick."""
    return RunAs(user, 990, 990, (), f"/var/lib/{user}")


class FakeNvml:
    """NvmlSession as the agent uses it (power limits, Xid events): cards that allow
    `limits` = (min, max, default) watts, and Xids a test queues."""

    def __init__(self, limits: tuple[int, int, int] | None = (100, 450, 450)) -> None:
        self.limits = limits
        self.set_w: dict[int, float] = {}  # index -> the limit in force, where changed
        self.queued: list[tuple[int, int]] = []
        self.watched: list[int] = []
        self.closed = False

    def watch(self, indices: list[int]) -> None:
        self.watched = list(indices)

    def xids(self) -> list[tuple[int, int]]:
        found, self.queued = self.queued, []
        return found

    def set_power_limit(self, index: int, watts: int):
        from garage_node.node.gpu import PowerLimit

        if self.limits is None:
            return PowerLimit(index, None, f"power limit not applied on GPU {index}: this card does not allow "
                                           "its power limit to be set")
        low, high, _ = self.limits
        target = min(max(watts, low), high)
        self.set_w[index] = target
        return PowerLimit(index, float(target), "" if target == watts else f"{watts} W is outside this card's "
                                                                            f"{low}-{high} W: set {target} W")

    def restore(self) -> None:
        self.set_w.clear()

    def close(self) -> None:
        self.restore()
        self.closed = True
