"""Regions in network namespaces with delays between them, for the federation's proof
(tests/integration/test_federation_netns.py, bench/federation.py).

Each region's head (testing/fedregion.py: gateway, nats-server, engine stand-ins) runs in a
namespace of its own, `gnf-<id>-<region>`, linked by a veth pair to one WAN namespace,
`gnf-<id>-wan`. Every path between heads, and from clients (which run in the WAN namespace)
to heads, goes through a relay there (testing/delayproxy.py) that delays each direction by half
the path's round trip: this kernel has no netem. A partition cuts a region's relays to the other
regions (held, as lost packets would be); its clients still reach it.

Everything is named with the prefix `gnf` and an id owned by this process (testing/region.py's
OWNERS), so a crashed run is swept by `cleanup_stale("gnf")`; processes end by PID."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from testing.region import OWNERS, cleanup_stale, kill_namespace, sh

PREFIX = "gnf"
ROOT = Path(__file__).resolve().parents[1]
SERVICES = {"gateway": 0, "nats": 1}
CLIENT = 9  # the "from" index of clients' relays


class FedNet:
    def __init__(self, regions: list[str], intra_ms: dict[str, float], inter_ms: dict[tuple[str, str], float],
                 root: Path, ports: dict[str, dict[str, int]]) -> None:
        """`ports[region]`: its head's {"gateway": port, "nats": port}."""
        cleanup_stale(PREFIX)
        self.id = secrets.token_hex(2)
        self.owner = f"{PREFIX}-{self.id}"
        self.regions, self.intra_ms, self.root, self.ports = regions, intra_ms, root, ports
        self.inter_ms = {tuple(sorted(k)): v for k, v in inter_ms.items()}
        self.control = root / "wan-cuts"
        self.proxy: subprocess.Popen | None = None

    @property
    def wan(self) -> str:
        return f"{self.owner}-wan"

    def ns(self, region: str) -> str:
        return f"{self.owner}-{region}"

    def _i(self, region: str) -> int:
        return self.regions.index(region)

    def head_ip(self, region: str) -> str:
        return f"10.80.{self._i(region)}.2"

    def _relay_port(self, src: int, dst: int, service: str) -> int:
        return 30000 + 100 * src + 10 * dst + SERVICES[service]

    def peer_addr(self, a: str, b: str, service: str) -> str:
        """host:port where region a's head reaches region b's `service` (through the WAN relay)."""
        return f"10.80.{self._i(a)}.1:{self._relay_port(self._i(a), self._i(b), service)}"

    def client_url(self, region: str) -> str:
        """Where the region's clients send requests (through the relay with its intra-region delay)."""
        return f"http://10.80.{self._i(region)}.1:{self._relay_port(CLIENT, self._i(region), 'gateway')}"

    def routes(self) -> list[dict[str, Any]]:
        out = []
        for a in self.regions:
            ia = self._i(a)
            out.append({"listen": [f"10.80.{ia}.1", self._relay_port(CLIENT, ia, "gateway")],
                        "target": [self.head_ip(a), self.ports[a]["gateway"]], "delay_ms": self.intra_ms[a] / 2,
                        "group": f"client-{a}"})
            for b in self.regions:
                if a == b:
                    continue
                for svc in SERVICES:
                    out.append({"listen": [f"10.80.{ia}.1", self._relay_port(ia, self._i(b), svc)],
                                "target": [self.head_ip(b), self.ports[b][svc]],
                                "delay_ms": self.inter_ms[tuple(sorted((a, b)))] / 2, "group": self.group(a, b)})
        return out

    @staticmethod
    def group(a: str, b: str) -> str:
        return "-".join(sorted((a, b)))

    def up(self) -> None:
        OWNERS.mkdir(parents=True, exist_ok=True)
        (OWNERS / self.owner).write_text(str(os.getpid()))
        sh(["ip", "netns", "add", self.wan])
        sh(["ip", "-n", self.wan, "link", "set", "lo", "up"])
        for r in self.regions:
            i = self._i(r)
            sh(["ip", "netns", "add", self.ns(r)])
            sh(["ip", "-n", self.ns(r), "link", "set", "lo", "up"])
            w, h = f"gf{self.id}w{i}", f"gf{self.id}h{i}"
            sh(["ip", "link", "add", w, "netns", self.wan, "type", "veth", "peer", "name", h, "netns", self.ns(r)])
            sh(["ip", "-n", self.wan, "addr", "add", f"10.80.{i}.1/24", "dev", w])
            sh(["ip", "-n", self.ns(r), "addr", "add", f"10.80.{i}.2/24", "dev", h])
            sh(["ip", "-n", self.wan, "link", "set", w, "up"])
            sh(["ip", "-n", self.ns(r), "link", "set", h, "up"])
        routes = self.root / "wan-routes.json"
        routes.write_text(json.dumps(self.routes()))
        self.control.write_text("")
        self.proxy = subprocess.Popen(["ip", "netns", "exec", self.wan, sys.executable, "-m", "testing.delayproxy",
                                       str(routes), str(self.control)], cwd=ROOT,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                                      stderr=(self.root / "wan.log").open("ab"), text=True)
        assert self.proxy.stdout is not None
        if self.proxy.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the WAN relays did not start: {(self.root / 'wan.log').read_text()[-2000:]}")

    def partition(self, region: str, cut: bool = True) -> None:
        """Cut `region`'s head off from every other region's, or heal it; its clients still reach it."""
        groups = {g for g in self.control.read_text().split() if g}
        mine = {self.group(region, o) for o in self.regions if o != region}
        self.control.write_text("\n".join(sorted(groups | mine if cut else groups - mine)) + "\n")
        time.sleep(0.2)  # the relays read the file every 0.1 s

    def down(self) -> None:
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.send_signal(signal.SIGKILL)
            self.proxy.wait()
        for ns in (*(self.ns(r) for r in self.regions), self.wan):
            kill_namespace(ns)
        (OWNERS / self.owner).unlink(missing_ok=True)

    def _argv(self, args: dict[str, Any], ns: str = "") -> list[str]:
        return ["ip", "netns", "exec", ns or self.wan, sys.executable, "-m", "testing.fedclient", json.dumps(args)]

    def client_in(self, ns: str, args: dict[str, Any], timeout_s: float = 150) -> Any:
        """testing/fedclient.py in another namespace (a head's: no relay on the way)."""
        res = subprocess.run(self._argv(args, ns), cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             capture_output=True, text=True, timeout=timeout_s)
        if res.returncode != 0:
            raise RuntimeError(f"fedclient failed: {res.stderr[-2000:]}")
        return json.loads(res.stdout)

    def client(self, args: dict[str, Any], timeout_s: float = 150) -> Any:
        """testing/fedclient.py run where the clients are (the WAN namespace); its JSON answer."""
        return self.client_in(self.wan, args, timeout_s)

    def client_bg(self, args: dict[str, Any]) -> subprocess.Popen:
        return subprocess.Popen(self._argv(args), cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    @staticmethod
    def result(proc: subprocess.Popen, timeout_s: float = 150) -> Any:
        out, err = proc.communicate(timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"fedclient failed: {err[-2000:]}")
        return json.loads(out)


def in_namespaces(root: Path, regions: list[str], intra_ms: dict[str, float],
                  inter_ms: dict[tuple[str, str], float], **kw: Any) -> tuple[FedNet, Any]:
    """The WAN and the regions' namespaces made, each region's process not yet started:
    (the network, testing.federation.Regions). Call net.up() before regions.start_all()."""
    from testing.federation import Regions

    regs = Regions(root, regions, listen="0.0.0.0", **kw)
    net = FedNet(regions, intra_ms, inter_ms, root, {r: regs.ports(r) for r in regions})
    for r in regions:
        regs[r].host, regs[r].public = net.head_ip(r), net.client_url(r)
        regs[r].prefix = ["ip", "netns", "exec", net.ns(r)]
    regs.peer_addr = net.peer_addr
    return net, regs
