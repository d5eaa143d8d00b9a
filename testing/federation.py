"""Several regions of a federation on this machine, each a `testing/fedregion.py` process
(the real gateway, federation and nats-server, engine stand-ins), for the tests and
bench/federation.py. On loopback by default; `netns` runs each region in a network namespace
of its own (testing/fednet.py) with delays between them.

Everything started is ended by its PID (the region process, then its nats-server by the PID
file its supervisor keeps), also when a test fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx

from garage_node.head.federation.fedstore import FedStore
from garage_node.head.federation.natsd import make_secret
from garage_node.head.gateway.keys import ApiKey, KeyStore
from garage_node.head.gateway.store import Store

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RegionProc:
    name: str
    state: Path
    host: str
    gateway_port: int
    nats_port: int
    prefix: list[str] = field(default_factory=list)  # e.g. ip netns exec NAME
    listen: str = ""  # the address its gateway and NATS listen on; empty: host
    public: str = ""  # the gateway's URL for its clients; empty: http://host:gateway_port
    proc: subprocess.Popen | None = None
    log: Path | None = None
    log_from: int = 0  # where this start's lines begin in the log (appended to across starts)

    @property
    def url(self) -> str:
        return self.public or f"http://{self.host}:{self.gateway_port}"

    @property
    def nats_url(self) -> str:
        return f"nats://{self.host}:{self.nats_port}"

    def keys(self) -> KeyStore:
        return KeyStore(Store(self.state / "gateway.db"))

    def set_pcs(self, states: dict[str, str]) -> None:
        (self.state / "pcs.json").write_text(json.dumps(states))

    def all_pcs(self, state: str, pcs: int = 2) -> None:
        self.set_pcs({f"{self.name}-n{i}": state for i in range(1, pcs + 1)})

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.state / "federation" / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def nats_pid(self) -> int | None:
        try:
            return int((self.state / "federation" / "nats-server.pid").read_text())
        except (OSError, ValueError):
            return None


class Regions:
    def __init__(self, root: Path, names: list[str], hosts: dict[str, str] | None = None,
                 peer_addr: Callable[[str, str, str], str] | None = None, prefixes: dict[str, list[str]] | None = None,
                 ttft_ms: dict[str, float] | None = None, budget_ms: float = 500.0, pcs: int = 2,
                 base_port: int = 0, listen: str = "", lease_tokens: int = 10000) -> None:
        """`peer_addr(a, b, "nats" | "gateway")`: host:port where region a reaches region b's
        service (default: b's host and port)."""
        self.root, self.budget_ms, self.pcs, self.lease_tokens = root, budget_ms, pcs, lease_tokens
        self.secret_file = root / "federation-secret"
        make_secret(self.secret_file)
        hosts = hosts or {n: "127.0.0.1" for n in names}
        self.peer_addr = peer_addr or (lambda a, b, svc: f"{hosts[b]}:{self.ports(b)[svc]}")
        self.ttft_ms = ttft_ms or {}
        base = base_port or _free_base()
        self.regions: dict[str, RegionProc] = {n: RegionProc(n, root / n, hosts[n], base + 2 * i, base + 2 * i + 1,
                                      prefix=(prefixes or {}).get(n, []), listen=listen) for i, n in enumerate(names)}

    def _pki(self, r: RegionProc) -> None:
        """The head's PKI as `head init` makes it: NATS between heads speaks TLS with it."""
        from garage_node.head.pki import PkiPaths, create_ca, issue_server_cert

        paths = PkiPaths(r.state / "pki")
        if not paths.ca_cert.exists():
            r.state.mkdir(parents=True, exist_ok=True)
            create_ca(paths, r.name)
            issue_server_cert(paths, r.host)

    def ports(self, name: str) -> dict[str, int]:
        r = self.regions[name]
        return {"gateway": r.gateway_port, "nats": r.nats_port}

    def __getitem__(self, name: str) -> RegionProc:
        return self.regions[name]

    def start(self, name: str) -> None:
        r = self.regions[name]
        for o in self.regions.values():
            self._pki(o)
        peers = {o.name: {"nats": f"nats://{self.peer_addr(name, o.name, 'nats')}",
                          "gateway": f"http://{self.peer_addr(name, o.name, 'gateway')}",
                          "ca_file": str(o.state / "pki" / "ca.pem")}
                 for o in self.regions.values() if o.name != name}
        r.state.mkdir(parents=True, exist_ok=True)
        r.log = self.root / f"{name}.log"
        r.log_from = r.log.stat().st_size if r.log.exists() else 0
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        r.proc = subprocess.Popen(
            [*r.prefix, sys.executable, "-m", "testing.fedregion", "--region", name, "--state", str(r.state),
             "--host", r.listen or r.host, "--gateway-port", str(r.gateway_port), "--nats-port", str(r.nats_port),
             "--peers", json.dumps(peers), "--pcs", str(self.pcs), "--ttft-ms", str(self.ttft_ms.get(name, 0.0)),
             "--budget-ms", str(self.budget_ms), "--secret-file", str(self.secret_file),
             "--lease-tokens", str(self.lease_tokens)],
            cwd=ROOT, env=env, stdout=r.log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)

    def start_all(self, within_s: float = 60.0) -> None:
        for n in self.regions:
            self.start(n)
        for n in self.regions:
            self.wait_ready(n, within_s)

    def wait_ready(self, name: str, within_s: float) -> None:
        """Its gateway answers, its NATS is up and every other running region is reachable from it."""
        r = self.regions[name]
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            s = r.status()
            if s.get("nats", {}).get("up") and all(p.get("up") and p.get("summary_age_s") is not None
                                                   for p in s.get("peers", {}).values()) and self._listening(r):
                return
            if r.proc is not None and r.proc.poll() is not None:
                raise RuntimeError(f"region {name} exited: {self.tail(name)}")
            time.sleep(0.2)
        raise TimeoutError(f"region {name} not ready within {within_s} s: {self.tail(name)}")

    @staticmethod
    def _listening(r: RegionProc) -> bool:
        """testing/fedregion.py printed "ready": its gateway listens (the federation's status
        can say ready before that)."""
        if r.log is None or not r.log.exists():
            return False
        with r.log.open("rb") as f:
            f.seek(r.log_from)
            return b"ready" in f.read().splitlines()

    def tail(self, name: str, n: int = 30) -> str:
        log = self.regions[name].log
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log and log.exists() else ""

    def kill(self, name: str) -> None:
        """The region's head dies (SIGKILL), its nats-server with it."""
        r = self.regions[name]
        if r.proc is not None and r.proc.poll() is None:
            os.killpg(r.proc.pid, signal.SIGKILL)
            r.proc.wait()
        pid = r.nats_pid()
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self, name: str) -> None:
        r = self.regions[name]
        if r.proc is not None and r.proc.poll() is None:
            r.proc.send_signal(signal.SIGTERM)
            try:
                r.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        self.kill(name)

    def stop_all(self) -> None:
        for n in self.regions:
            self.stop(n)

    def create_key(self, region: str, name: str, **terms: Any) -> tuple[ApiKey, str]:
        return self.regions[region].keys().create(name, time.time(), **terms)

    def revoke_key(self, region: str, name: str) -> None:
        self.regions[region].keys().revoke(name, time.time())

    def usage_counts(self) -> dict[str, dict[str, int]]:
        """Each region's usage records per serving region, read from its federation.db."""
        out = {}
        for name, r in self.regions.items():
            store = FedStore(r.state / "federation" / "federation.db")
            try:
                out[name] = store.counts()
            finally:
                store.close()
        return out


def wait_for(check: Callable[[], Any], within_s: float, every_s: float = 0.2) -> Any:
    """Poll `check` until it returns something true or `within_s` passes; its last result."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if got := check():
            return got
        time.sleep(every_s)
    return check()


def _free_base() -> int:
    """A run of free ports: a random start in a range the kernel does not hand out."""
    import random
    import socket

    for _ in range(50):
        base = random.randrange(20000, 30000, 20)
        ok = True
        for p in range(base, base + 12):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free ports")


def post(url: str, secret: str, model: str = "tiny", stream: bool = False, timeout_s: float = 10.0) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": model, "prompt": "hi", "stream": stream},
                      headers={"authorization": f"Bearer {secret}"}, timeout=timeout_s)
