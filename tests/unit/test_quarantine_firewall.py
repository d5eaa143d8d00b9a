"""The hub's firewall for PCs the audits quarantined (issue #20, core/firewall.py `refused`):
the script, the head service applying it again when the quarantined set changes, and, where
this runs as root with nft and ip, real packets between two network namespaces."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from garage_node.core.firewall import Rules, ruleset
from garage_node.core.raycmd import RAY_PORTS
from tests.unit.test_head_service import enroll, journal, svc  # noqa: F401 (fixtures)

RAY = tuple(RAY_PORTS.ranges())
HUB = "garage-hub"


def head_rules(refused: tuple[str, ...] = (), interface: str = HUB) -> Rules:
    return Rules(table=f"garage-head-{interface}", overlay_interface=interface, overlay_cidr="100.96.0.0/16",
                 ray_ports=RAY, open_tcp=(22, 8443), hub=True, refused=refused)


def test_a_quarantined_address_is_cut_off_before_anything_is_accepted():
    text = ruleset(head_rules(("100.96.0.9", "100.96.0.3")))
    refuse_in = ('iifname "garage-hub" ip saddr { 100.96.0.3, 100.96.0.9 } ct direction original '
                 'tcp dport != { 22, 8443 } drop')
    assert refuse_in in text
    assert text.index(refuse_in) < text.index('iifname { "lo", "garage-hub" } accept')  # before the tunnel's accept
    hub = 'iifname "garage-hub" oifname "garage-hub"'
    for line in (f"{hub} ip saddr {{ 100.96.0.3, 100.96.0.9 }} drop", f"{hub} ip daddr {{ 100.96.0.3, 100.96.0.9 }} drop"):
        assert text.index(line) < text.index(f"{hub} ct state established,related accept")  # open connections cut too
    assert ('oifname "garage-hub" ip daddr { 100.96.0.3, 100.96.0.9 } tcp dport { 6379-6385, 10001, 10002-10999 } '
            'drop') in text
    # Nobody quarantined: the rules are those of before (no output chain at all).
    plain = ruleset(head_rules())
    assert "saddr" not in plain and "chain output" not in plain
    # A PC's own rules never refuse anyone (only the hub does).
    assert "saddr" not in ruleset(Rules(table="t", overlay_interface="garage0", overlay_cidr="100.96.0.0/16",
                                        ray_ports=RAY, refused=("100.96.0.3",)))


@pytest.mark.skipif(shutil.which("nft") is None and not os.path.exists("/usr/sbin/nft"),
                    reason="nft not installed (scripts/install-deps installs nftables)")
def test_nft_accepts_the_script_with_quarantined_pcs():
    nft = shutil.which("nft") or "/usr/sbin/nft"
    for rules in (head_rules(("100.96.0.3",)), head_rules(("100.96.0.3", "100.96.0.4")),
                  Rules(table="t", overlay_interface=HUB, overlay_cidr="100.96.0.0/16", ray_ports=RAY, hub=True,
                        refused=("100.96.0.3",))):  # no port open to anyone
        res = subprocess.run([nft, "-c", "-f", "-"], input=ruleset(rules), capture_output=True, text=True)
        assert res.returncode == 0, res.stderr


class RecordingFirewall:
    def __init__(self) -> None:
        self.applied: list[Rules] = []

    def apply(self, rules: Rules) -> None:
        self.applied.append(rules)

    def remove(self, table: str) -> None:
        pass

    def present(self, table: str) -> bool:
        return bool(self.applied)


def test_the_head_refuses_a_quarantined_pcs_address_and_applies_again_when_the_set_changes(svc):  # noqa: F811
    fw = RecordingFirewall()
    svc.firewall = fw
    a, b = enroll(svc.registry, "alice-pc"), enroll(svc.registry, "bob-pc")
    ip = {n.id: n.overlay_ip for n in svc.registry.active_peers()}
    quarantined: set[str] = set()
    svc.quarantined = lambda: frozenset(quarantined)
    assert svc.refuse_quarantined() is False and fw.applied == []  # nobody: nothing to do
    quarantined.add(a)
    assert svc.refuse_quarantined() is True
    assert fw.applied[-1].refused == (ip[a],) and svc.firewall_rules().refused == (ip[a],)
    assert svc.refuse_quarantined() is False and len(fw.applied) == 1  # unchanged: not applied again
    quarantined.add(b)
    assert svc.refuse_quarantined() is True and fw.applied[-1].refused == tuple(sorted((ip[a], ip[b])))
    quarantined.clear()  # both released
    assert svc.refuse_quarantined() is True and fw.applied[-1].refused == ()


def test_a_failed_apply_is_tried_again_on_the_next_pass(svc):  # noqa: F811
    class Refusing(RecordingFirewall):
        fail = True

        def apply(self, rules: Rules) -> None:
            if self.fail:
                raise RuntimeError("nft refused")
            super().apply(rules)

    fw = Refusing()
    svc.firewall = fw
    a = enroll(svc.registry, "alice-pc")
    svc.quarantined = lambda: frozenset({a})
    with pytest.raises(RuntimeError):
        svc.refuse_quarantined()
    fw.fail = False
    assert svc.refuse_quarantined() is True and len(fw.applied[-1].refused) == 1


# ---------------------------------------------------------------- real packets (root, nft, ip)

LISTENER = """
import socket, sys, selectors
sel = selectors.DefaultSelector()
for port in map(int, sys.argv[1:]):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(16); sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        c, _ = key.fileobj.accept(); c.sendall(b"ok"); c.close()
"""

CONNECT = """
import socket, sys
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(); s.settimeout(0.7); s.bind((src, 0))
try:
    s.connect((dst, port)); print(s.recv(2).decode() or "closed")
except OSError as e:
    print(type(e).__name__)
"""


def _can_make_namespaces() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and \
        (shutil.which("nft") is not None or os.path.exists("/usr/sbin/nft"))


@pytest.mark.skipif(not _can_make_namespaces(), reason="needs root, ip and nft (network namespaces)")
def test_real_packets_a_quarantined_pc_reaches_only_the_api_and_the_head_reaches_only_its_engine():
    tag = f"{os.getpid() % 100000}"
    head_ns, pc_ns, hub_if, pc_if = f"gq-head-{tag}", f"gq-pc-{tag}", f"gqh{tag}", f"gqp{tag}"
    nft = shutil.which("nft") or "/usr/sbin/nft"
    procs: list[subprocess.Popen] = []

    def sh(*args: str, ns: str | None = None, **kw) -> subprocess.CompletedProcess:
        cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)

    def connect(ns: str, src: str, dst: str, port: int) -> str:
        return sh(sys.executable, "-c", CONNECT, src, dst, str(port), ns=ns).stdout.strip()

    try:
        sh("ip", "netns", "add", head_ns)
        sh("ip", "netns", "add", pc_ns)
        sh("ip", "link", "add", hub_if, "netns", head_ns, "type", "veth", "peer", "name", pc_if, "netns", pc_ns)
        sh("ip", "addr", "add", "100.96.0.1/16", "dev", hub_if, ns=head_ns)
        for address in ("100.96.0.7/16", "100.96.0.8/16"):  # .7 quarantined, .8 not
            sh("ip", "addr", "add", address, "dev", pc_if, ns=pc_ns)
        for ns, ifname in ((head_ns, hub_if), (pc_ns, pc_if)):
            sh("ip", "link", "set", ifname, "up", ns=ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
        sh(nft, "-f", "-", ns=head_ns, input=ruleset(head_rules(("100.96.0.7",), interface=hub_if)))
        # The head listens on a Ray port and its API; the PC on a Ray worker port and its engine.
        for ns, ports in ((head_ns, ("6380", "8443")), (pc_ns, ("10005", "8000"))):
            p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", LISTENER, *ports],
                                 stdout=subprocess.PIPE, text=True)
            procs.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        started = time.monotonic()
        seen = {
            "quarantined -> head Ray": connect(pc_ns, "100.96.0.7", "100.96.0.1", 6380),
            "quarantined -> head API": connect(pc_ns, "100.96.0.7", "100.96.0.1", 8443),
            "other -> head Ray": connect(pc_ns, "100.96.0.8", "100.96.0.1", 6380),
            "head -> quarantined Ray worker": connect(head_ns, "100.96.0.1", "100.96.0.7", 10005),
            "head -> quarantined engine": connect(head_ns, "100.96.0.1", "100.96.0.7", 8000),
            "head -> other Ray worker": connect(head_ns, "100.96.0.1", "100.96.0.8", 10005),
        }
        print(f"six connections in {time.monotonic() - started:.1f} s")
        reached = {k: v == "ok" for k, v in seen.items()}
        assert reached == {
            "quarantined -> head Ray": False,
            "quarantined -> head API": True,  # it still hears why, and is re-checked and released
            "other -> head Ray": True,
            "head -> quarantined Ray worker": False,
            "head -> quarantined engine": True,  # the re-check's canaries reach its engine
            "head -> other Ray worker": True,
        }, seen
        assert seen["quarantined -> head Ray"] == "TimeoutError"  # dropped: not even a refusal to learn from
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for ns in (head_ns, pc_ns):  # the veth pair goes with its namespaces
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
