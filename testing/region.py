"""A whole region on one machine: a head and nodes, each in its own network namespace with
a private mount of /run/wireguard, joined by a bridge that lives in a namespace of its own.

Every host runs the real programs (`garage-node head run`, `garage-node run`, wireguard-go,
Ray) exactly as a real machine would; only the GPUs are simulated (NVML test double).
Everything is named with one prefix, so `cleanup_stale(prefix)` removes what a crashed run
left behind, and processes are ended by the PIDs found in our own namespaces.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from testing.nvml_double import FakeGPU, build_fake_nvml, env_for, write_config
from testing.dockerd import TEST_IMAGE, NamespacedDockerd, reap_free_slots

PREFIX = "gnt"
SUBNET = "10.231.{n}.{host}/24"  # inside our own namespaces only
PYTHON = sys.executable


class TestbedError(RuntimeError):
    pass


REQUIRED_TOOLS = ("wireguard-go", "wg", "ip", "unshare", "nsenter", "curl", "ping", "gcc")


def missing_prerequisite() -> str | None:
    """Why a testbed cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in REQUIRED_TOOLS:
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (scripts/install-deps installs it)"
    return None


def sh(cmd: list[str], check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise TestbedError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def _pids_using(directory: Path) -> list[int]:
    """PIDs whose command line names `directory` (a testbed's own, unique temp directory)."""
    marker = str(directory).encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def namespaces() -> list[str]:
    out = sh(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def kill_namespace(ns: str) -> None:
    """End every process in a namespace we made (by PID), then delete the namespace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(p) for p in sh(["ip", "netns", "pids", ns], check=False).stdout.split()]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            pids = [int(p) for p in sh(["ip", "netns", "pids", ns], check=False).stdout.split()]
            time.sleep(0.1)
        if not pids:
            break
    sh(["ip", "netns", "delete", ns], check=False)


OWNERS = Path("/run/garage-testbeds")  # <testbed prefix> -> PID of the process that made it


def _owner_alive(testbed_prefix: str) -> bool:
    try:
        pid = int((OWNERS / testbed_prefix).read_text())
        os.kill(pid, 0)
        return True
    except (OSError, ValueError):
        return False


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Remove testbeds whose maker died without cleaning up; leave live ones (a demo, a
    benchmark or another test run on the same machine) alone."""
    gone = []
    for ns in namespaces():
        parts = ns.split("-")
        if len(parts) >= 3 and parts[0] == prefix:
            owner = f"{parts[0]}-{parts[1]}"
            if not _owner_alive(owner):
                kill_namespace(ns)
                (OWNERS / owner).unlink(missing_ok=True)
                gone.append(ns)
    reap_free_slots()  # engines whose testbed dockerd was killed with its namespace
    return gone


@dataclass
class Host:
    testbed: "Testbed"
    name: str
    ip: str
    env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def ns(self) -> str:
        return f"{self.testbed.prefix}-{self.name}"

    @property
    def dir(self) -> Path:
        return self.testbed.dir / self.name

    def wrap(self, argv: list[str]) -> list[str]:
        """Run argv in this host's network namespace, with its own tmpfs on /run/wireguard
        (wireguard-go's control sockets would otherwise collide between hosts)."""
        script = 'mount -t tmpfs -o mode=0700 garage-wg /run/wireguard && exec "$@"'
        return ["ip", "netns", "exec", self.ns, "unshare", "--mount", "--propagation", "private",
                "sh", "-c", script, "sh", *argv]

    def run(self, argv: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return sh(self.wrap(argv), check=check, env={**os.environ, **self.env}, timeout=timeout)

    def spawn(self, argv: list[str], log_name: str) -> subprocess.Popen:
        log = (self.dir / log_name).open("ab")
        proc = subprocess.Popen(self.wrap(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **self.env}, start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run([PYTHON, "-m", "garage_node.cli", *args], check=check, timeout=timeout)

    def log_tail(self, log_name: str, n: int = 40) -> str:
        try:
            return "\n".join((self.dir / log_name).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
    if proc is None or proc.poll() is not None:
        return proc.returncode if proc else None
    proc.send_signal(sig)  # the wrapper shell exec'd the program: this is its PID
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


@dataclass
class HeadHost(Host):
    proc: subprocess.Popen | None = None

    @property
    def config(self) -> Path:
        return self.dir / "head.toml"

    def configure(self, advertise_host: str = "", extra: str = "") -> None:
        """`advertise_host`: the address nodes use (default: the head's bridge address);
        `extra`: more sections (e.g. "[placement]\ninterval_s = 2\n"), appended."""
        d = self.dir
        self.config.write_text(f"""\
[head]
region = "testbed"
state_dir = "{d / 'state'}"

[api]
advertise_host = "{advertise_host or self.ip}"
port = 8443

[overlay]
interface = "gn-hub"
cidr = "100.96.0.0/16"
listen_port = 51820

[ray]
temp_dir = "{d / 'ray'}"
num_cpus = 1
memory_mib = 512
object_store_mib = 128

[options]
heartbeat_s = 2.0
offline_after_s = 15.0
peer_sync_s = 1.0
""" + extra)

    def init(self) -> None:
        self.cli("head", "init", "--config", str(self.config))
        # Ray clients in the head's namespace (probes, test drivers) need the cluster token.
        self.env.update(self.ray_auth_env())

    def ray_auth_env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.dir / "state" / "ray-token")}

    def start(self) -> None:
        self.proc = self.spawn([PYTHON, "-m", "garage_node.cli", "head", "run", "--config", str(self.config)], "head.log")
        self.wait_api()

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        code = stop_process(self.proc, sig)
        self.proc = None
        return code

    def wait_api(self, timeout: float = 60) -> None:
        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise TestbedError(f"head exited ({self.proc.returncode}):\n{self.log_tail('head.log')}")
            return self.run(["curl", "-sk", "--max-time", "2", f"https://{self.ip}:8443/v1/health"], check=False).returncode == 0
        wait_for(up, timeout, f"head API on {self.ip}:8443")

    def token(self, *args: str) -> str:
        return self.cli("head", "token", "create", "--config", str(self.config), *args).stdout.strip()

    def nodes(self) -> list[dict[str, Any]]:
        return json.loads(self.cli("head", "nodes", "--json", "--config", str(self.config)).stdout)

    def revoke(self, node: str) -> None:
        self.cli("head", "revoke", node, "--config", str(self.config))

    def hub_peers(self) -> list[str]:
        """Public keys of the hub's WireGuard peers, read inside the head's own mount namespace."""
        if self.proc is None:
            return []
        pid = str(self.proc.pid)
        out = sh(["nsenter", "-t", pid, "-m", "-n", "wg", "show", "gn-hub", "peers"]).stdout
        return out.split()

    def ray_nodes(self) -> list[dict[str, Any]]:
        out = self.run([PYTHON, "-m", "garage_node.head.rayprobe", "100.96.0.1:6379"], timeout=60).stdout
        return json.loads(out)


@dataclass
class NodeHost(Host):
    gpus: list[FakeGPU] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    @property
    def config(self) -> Path:
        return self.dir / "node.toml"

    @property
    def override(self) -> Path:
        return self.dir / "garage.toml"

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    def engine_key(self) -> str:
        """The key this PC's engine demands (the head's gateway gave it at enrollment)."""
        return json.loads((self.state_dir / "identity.json").read_text())["engine_api_key"]

    interface: str = "garage0"
    firewall_mode = "all-tcp"  # a PC of its own: every TCP port but SSH closed to all but WireGuard

    def configure(self, token: str = "", extra: str = "", engine: str = "enabled = false\n") -> None:
        """`engine` is the body of the [engine] section; the engine is off unless a test asks."""
        d = self.dir
        self.config.write_text(f"""\
[node]
state_dir = "{d / 'state'}"
runtime_dir = "{d / 'run'}"

[overlay]
interface = "{self.interface}"
firewall = "{self.firewall_mode}"

[ray]
temp_dir = "{d / 'ray'}"
num_cpus = 1
memory_mib = 1024
object_store_mib = 128

[agent]
reconcile_s = 0.5
backoff_initial_s = 0.5
backoff_max_s = 5.0

[engine]
{engine}""")
        # What the USB stick carries: token and name.
        self.override.write_text(f'[node]\nname = "{self.name}"\njoin_token = "{token}"\n{extra}')

    def set_gpus(self, gpus: list[FakeGPU]) -> None:
        self.gpus = gpus
        write_config(self.dir / "gpus.conf", gpus)

    def start(self) -> None:
        self.proc = self.spawn(self.cmd("run"), "agent.log")

    def cmd(self, *args: str) -> list[str]:
        return [PYTHON, "-m", "garage_node.cli", *args, "--config", str(self.config), "--override", str(self.override)]

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        code = stop_process(self.proc, sig)
        self.proc = None
        return code

    def status(self) -> dict[str, Any]:
        res = self.run(self.cmd("status", "--json"), check=False)
        if res.returncode not in (0, 3):
            raise TestbedError(f"status failed ({res.returncode}): {res.stderr}")
        return json.loads(res.stdout)

    def wait_state(self, state: str, timeout: float = 90, predicate: Callable[[dict], bool] | None = None) -> dict[str, Any]:
        last: dict[str, Any] = {}

        def reached() -> bool:
            nonlocal last
            if self.proc is not None and self.proc.poll() is not None:
                raise TestbedError(f"agent {self.name} exited ({self.proc.returncode}):\n{self.log_tail('agent.log')}")
            last = self.status()
            return last["state"] == state and (predicate is None or predicate(last))
        try:
            wait_for(reached, timeout, f"node {self.name} to reach state {state}")
        except TimeoutError as e:
            raise TimeoutError(f"{e}; last status: {json.dumps(last)[:1500]}\n{self.log_tail('agent.log')}") from None
        return last


@dataclass
class RootNodeHost(NodeHost):
    """A node in this machine's own network namespace, where dockerd runs: Docker publishes
    the engine's port on the node's overlay address, so the node must live where Docker does.
    Its links carry the testbed's prefix, so cleanup finds them by name."""

    # It shares this machine's network namespace: its firewall must close Ray's and the
    # engine's ports only, not every TCP port of the machine the tests run on.
    firewall_mode = "ray-and-engine"

    def wrap(self, argv: list[str]) -> list[str]:
        return argv

    @property
    def ns(self) -> str:  # not a namespace: the name of its link to the bridge
        return f"{self.testbed.prefix}-{self.name}"[:15]


@dataclass
class EngineNodeHost(NodeHost):
    """A PC that serves a real engine: an ordinary NodeHost in its own network namespace, with
    a dockerd of its own inside that namespace (testing/dockerd.py). Its agent talks to that
    dockerd (`[engine] docker_socket`), which publishes port 8000 on this PC's own overlay
    address, so several engine PCs run side by side. Made by `Testbed.add_engine_node`."""

    dockerd: NamespacedDockerd | None = None
    engine_section: str = ""  # the body of [engine] that configure() uses unless given another

    def configure(self, token: str = "", extra: str = "", engine: str | None = None) -> None:
        """As NodeHost.configure; `engine` defaults to the section given to add_engine_node,
        and gets this PC's docker_socket (and a cache_dir of its own) unless it names them."""
        body = self.engine_section if engine is None else engine
        if body and not body.endswith("\n"):
            body += "\n"
        assert self.dockerd is not None
        if "docker_socket" not in body:
            body += f'docker_socket = "{self.dockerd.socket}"\n'
        if "cache_dir" not in body:
            body += f'cache_dir = "{self.dir / "models"}"\n'
        super().configure(token, extra, engine=body)

    def docker(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """The docker CLI against this PC's own dockerd, e.g. node.docker("kill", "garage-engine")."""
        assert self.dockerd is not None
        return self.dockerd.docker(*args, check=check, timeout=timeout)

    def engine_memory(self, container: str = "garage-engine") -> dict[str, int]:
        """Bytes: rss (the container's anonymous memory), cache, rss_sum (its processes' VmRSS)."""
        assert self.dockerd is not None
        return self.dockerd.container_memory(container)

    def stop_dockerd(self) -> None:
        """Containers removed, dockerd stopped by its PID, leftovers killed by cgroup name."""
        if self.dockerd is not None:
            self.dockerd.stop()


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class Testbed:
    """Usage: `with Testbed() as tb: head = tb.add_head(); n1 = tb.add_node("n1", [RTX_4090])`."""

    __test__ = False  # not a pytest test class


    def __init__(self, prefix: str | None = None, subnet_id: int | None = None) -> None:
        self.prefix = prefix or f"{PREFIX}-{secrets.token_hex(2)}"
        self.subnet_id = subnet_id if subnet_id is not None else secrets.randbelow(200) + 20
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-", dir="/tmp"))
        # Ray workers run as their own unprivileged account: they must reach their node's files.
        self.dir.chmod(0o755)
        self.switch = f"{self.prefix}-sw"
        self.hosts: list[Host] = []
        self.head: HeadHost | None = None
        self._nvml_dir: Path | None = None

    def __enter__(self) -> "Testbed":
        self.setup()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()

    def setup(self) -> None:
        if why := missing_prerequisite():
            raise TestbedError(f"cannot build a testbed: {why}")
        Path("/run/wireguard").mkdir(parents=True, exist_ok=True)  # mount point for each host's tmpfs
        OWNERS.mkdir(parents=True, exist_ok=True)
        (OWNERS / self.prefix).write_text(str(os.getpid()))
        sh(["ip", "netns", "add", self.switch])
        sh(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
        sh(["ip", "-n", self.switch, "link", "set", "br0", "up"])

    def _add_host(self, host: Host) -> None:
        sh(["ip", "netns", "add", host.ns])
        host.dir.mkdir(parents=True, exist_ok=True)
        port = f"p-{host.name}"[:15]
        sh(["ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host.ns])
        sh(["ip", "-n", self.switch, "link", "set", port, "master", "br0", "up"])
        sh(["ip", "-n", host.ns, "address", "add", f"{host.ip}/24", "dev", "eth0"])
        sh(["ip", "-n", host.ns, "link", "set", "eth0", "up"])
        sh(["ip", "-n", host.ns, "link", "set", "lo", "up"])
        self.hosts.append(host)

    def _ip(self, host_number: int) -> str:
        return SUBNET.format(n=self.subnet_id, host=host_number).split("/")[0]

    def add_head(self) -> HeadHost:
        head = HeadHost(self, "head", self._ip(1))
        self._add_host(head)
        head.configure()
        self.head = head
        return head

    def start_head(self, advertise_host: str = "", extra: str = "") -> HeadHost:
        """A head, initialised and serving its API; `extra`: config sections added to its own."""
        head = self.add_head()
        if advertise_host or extra:
            head.configure(advertise_host=advertise_host, extra=extra)
        head.init()
        head.start()
        return head

    def add_node(self, name: str, gpus: list[FakeGPU] | None = None) -> NodeHost:
        node = NodeHost(self, name, self._ip(10 + len(self.hosts)))
        self._add_host(node)
        node.env = env_for(self.nvml_dir(), node.dir / "gpus.conf")
        node.set_gpus(gpus or [])
        return node

    def add_root_node(self, name: str, gpus: list[FakeGPU] | None = None) -> RootNodeHost:
        node = RootNodeHost(self, name, self._ip(10 + len(self.hosts)))
        node.interface = f"{self.prefix}-wg"[:15]
        node.dir.mkdir(parents=True, exist_ok=True)
        port = f"p-{name}"[:15]
        sh(["ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", node.ns, "netns", "1"])
        sh(["ip", "-n", self.switch, "link", "set", port, "master", "br0", "up"])
        sh(["ip", "address", "add", f"{node.ip}/24", "dev", node.ns])
        sh(["ip", "link", "set", node.ns, "up"])
        self.hosts.append(node)
        node.env = env_for(self.nvml_dir(), node.dir / "gpus.conf")
        node.set_gpus(gpus or [])
        return node

    def add_engine_node(self, name: str, engine: str, gpus: list[FakeGPU] | None = None,
                        cpu_tasks: int | None = None) -> EngineNodeHost:
        """A PC in its own namespace that runs a real engine through a dockerd of its own,
        started here (the engine's image loaded into it from the machine's dockerd the first
        time; see testing/dockerd.py). `engine` is the body of its [engine] section (e.g.
        testing.dockerd.engine_toml(model_dir)); then `node.configure(head.token())` and
        `node.start()` as for any node. Call it once per engine PC; cleanup stops each dockerd.
        `cpu_tasks`: the CPU weight of its containers (see testing.dockerd.weigh_slot)."""
        node = EngineNodeHost(self, name, self._ip(10 + len(self.hosts)), engine_section=engine)
        self._add_host(node)
        node.env = env_for(self.nvml_dir(), node.dir / "gpus.conf")
        node.set_gpus(gpus or [])
        node.dockerd = NamespacedDockerd(node.ns, node.dir / "docker", cpu_tasks=cpu_tasks)
        node.dockerd.start()
        node.dockerd.ensure_image(tomllib.loads(engine).get("image", TEST_IMAGE))
        return node

    def nvml_dir(self) -> Path:
        if self._nvml_dir is None:
            self._nvml_dir = build_fake_nvml(self.dir / "nvml")
        return self._nvml_dir

    def _cleanup_root_node(self, node: RootNodeHost) -> None:
        # Links by name (deleting the WireGuard link ends its wireguard-go), then any process
        # still using this testbed's directory (a Ray worker orphaned by a killed agent).
        sh(["ip", "link", "delete", node.interface], check=False)
        sh(["ip", "link", "delete", node.ns], check=False)
        # Its agent removes its firewall table when it stops; one killed leaves it in this
        # machine's own namespace.
        sh(["nft", "delete", "table", "inet", f"garage-node-{node.interface}"], check=False)
        for pid in _pids_using(self.dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def cleanup(self) -> None:
        for host in self.hosts:
            # An engine PC's agent would drain and stop its engine first (tens of seconds):
            # its dockerd removes the container at once below.
            sig = signal.SIGKILL if isinstance(host, EngineNodeHost) else signal.SIGTERM
            for proc in host.procs:
                stop_process(proc, sig, timeout=20)
        for host in self.hosts:
            if isinstance(host, RootNodeHost):
                self._cleanup_root_node(host)
            else:
                if isinstance(host, EngineNodeHost):
                    try:
                        host.stop_dockerd()
                    except Exception as e:  # the namespace and the rest must still go
                        print(f"testbed: stopping the dockerd of {host.name}: {e}", file=sys.stderr)
                kill_namespace(host.ns)
        kill_namespace(self.switch)
        (OWNERS / self.prefix).unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)
