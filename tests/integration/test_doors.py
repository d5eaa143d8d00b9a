"""Closed doors (issue #9), proven as an attacker would try them: a namespace on the same bridge
as the head and the PCs, with no WireGuard and no token ("eve", someone on a PC's home network).

Real parts: the head, two agents, wireguard-go, Ray, and the nftables rules the agent and the
head install. Every TCP port that anything listens on in the head's and the nodes' namespaces
is tried, not a list we hope is complete.
"""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest

from testing.nvml_double import RTX_3060_12GB, RTX_4090
from testing.region import PYTHON, Host, Testbed, missing_prerequisite, sh

pytestmark = [pytest.mark.testbed, pytest.mark.skipif(bool(missing_prerequisite()), reason=str(missing_prerequisite()))]

ENGINE_PORT = 8000
# Tries TCP connections from inside a namespace; prints {"ip:port": true|false}.
PROBE = textwrap.dedent("""
    import json, socket, sys
    out = {}
    for target in json.loads(sys.argv[1]):
        ip, port = target.rsplit(":", 1)
        try:
            socket.create_connection((ip, int(port)), timeout=1.5).close()
            out[target] = True
        except OSError:
            out[target] = False
    print(json.dumps(out))
""")
# A stand-in for the engine on a node's overlay address (the real one runs in Docker, which
# these namespaces do not have): what matters is who can connect to that address and port.
LISTENER = "import socket, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); " \
           "s.bind(('{ip}', {port})); s.listen(); time.sleep(3600)"


@pytest.fixture(scope="module")
def region(testbed: Testbed) -> Testbed:
    tb = testbed
    head = tb.start_head()
    n1 = tb.add_node("n1", [RTX_4090])
    n2 = tb.add_node("n2", [RTX_3060_12GB])
    for n in (n1, n2):
        n.configure(head.token("--uses", "1"))
        n.start()
    for n in (n1, n2):
        n.wait_state("joined", 180)
    eve = Host(tb, "eve", tb._ip(99))
    tb._add_host(eve)
    tb.eve = eve
    n2_overlay = n2.status()["overlay"]["address"]
    tb.engine_stand_in = n2.spawn([PYTHON, "-c", LISTENER.format(ip=n2_overlay, port=ENGINE_PORT)], "stand-in.log")
    return tb


def listening(host: Host) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket in the host's namespace; "0.0.0.0" for a
    socket on all addresses (gRPC listens on [::], which takes IPv4 too)."""
    found = set()
    for table in ("tcp", "tcp6"):
        lines = sh(["ip", "netns", "exec", host.ns, "cat", f"/proc/net/{table}"]).stdout.splitlines()[1:]
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            found.add((_address(hex_ip), int(hex_port, 16)))
    return found


def _address(hex_ip: str) -> str:
    if set(hex_ip) == {"0"}:
        return "0.0.0.0"
    v4 = hex_ip[-8:]  # IPv4, or the tail of an IPv4-mapped IPv6 address
    if len(hex_ip) == 32 and not hex_ip.startswith("0000000000000000FFFF0000"):
        return "ipv6"
    return ".".join(str(int(v4[i:i + 2], 16)) for i in (6, 4, 2, 0))


def try_from(host: Host, targets: list[str]) -> dict[str, bool]:
    res = host.run([PYTHON, "-c", PROBE, json.dumps(targets)], timeout=120)
    return json.loads(res.stdout)


def targets_of(host: Host, address: str) -> list[str]:
    """Every port listening on `address` or on all addresses, but not loopback-only ones."""
    return sorted(f"{address}:{port}" for ip, port in listening(host) if ip in ("0.0.0.0", address))


def test_ray_listens_on_every_address_so_the_firewall_matters(region):
    # The reason for the firewall, checked rather than assumed: Ray binds its ports on 0.0.0.0.
    head = region.head
    assert any(ip == "0.0.0.0" and port == 6379 for ip, port in listening(head))


def test_nothing_but_the_control_api_and_the_gateway_answers_on_the_underlay(region):
    eve, head = region.eve, region.head
    n1, n2 = region.hosts[1], region.hosts[2]
    targets = targets_of(head, head.ip) + targets_of(n1, n1.ip) + targets_of(n2, n2.ip)
    assert len(targets) >= 7, targets  # Ray's GCS, raylets, object managers, workers...
    reached = try_from(eve, targets)
    # The two doors meant to be open, both guarded by their own credentials: the control API
    # (join tokens, node credentials) and the gateway (API keys).
    assert reached.pop(f"{head.ip}:8443") is True
    assert reached.pop(f"{head.ip}:8080") is True
    # The gateway's metrics listen on the head's loopback only: not a target at all.
    assert not [t for t in targets if t.endswith(":9464")]
    print("tried from the attacker's namespace:", sorted(reached))
    assert not [t for t, ok in reached.items() if ok], reached


def test_a_forged_route_to_an_overlay_address_gets_nowhere(region):
    eve, head = region.eve, region.head
    n1, n2 = region.hosts[1], region.hosts[2]
    o1, o2 = n1.status()["overlay"]["address"], n2.status()["overlay"]["address"]
    # Linux accepts packets for any local address on any interface: route the overlay via each host.
    eve.run(["ip", "route", "add", f"{o1}/32", "via", n1.ip])
    eve.run(["ip", "route", "add", f"{o2}/32", "via", n2.ip])
    eve.run(["ip", "route", "add", "100.96.0.1/32", "via", head.ip])
    targets = targets_of(head, "100.96.0.1") + targets_of(n1, o1) + targets_of(n2, o2)
    assert f"{o2}:{ENGINE_PORT}" in targets and "100.96.0.1:6379" in targets
    reached = try_from(eve, targets)
    assert not [t for t, ok in reached.items() if ok], reached
    ping = eve.run(["ping", "-c", "1", "-W", "2", o1], check=False)
    assert ping.returncode != 0


def test_only_the_head_reaches_an_engine_port(region):
    head, n1, n2 = region.head, region.hosts[1], region.hosts[2]
    o2 = n2.status()["overlay"]["address"]
    assert try_from(head, [f"{o2}:{ENGINE_PORT}"]) == {f"{o2}:{ENGINE_PORT}": True}
    # Another PC cannot skip the head (keys, accounting) to call this PC's engine ...
    assert try_from(n1, [f"{o2}:{ENGINE_PORT}"]) == {f"{o2}:{ENGINE_PORT}": False}
    # ... while Ray's own node-to-node traffic still flows through the hub.
    ray_port = f"{o2}:6381"  # n2's object manager
    assert try_from(n1, [ray_port]) == {ray_port: True}


def test_ray_refuses_a_client_without_the_cluster_token_even_inside_the_overlay(region):
    n1 = region.hosts[1]
    probe = [PYTHON, "-m", "garage_node.head.rayprobe", "100.96.0.1:6379"]
    res = subprocess.run(n1.wrap(["env", "-u", "RAY_AUTH_MODE", "-u", "RAY_AUTH_TOKEN_PATH", *probe]),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "Authentication" in (res.stderr + res.stdout)
    # The same probe with the cluster's token (as the head runs it) is answered.
    assert region.head.ray_nodes()


def test_a_ray_task_runs_as_the_unprivileged_account(region):
    head = region.head
    driver = textwrap.dedent("""
        import json, os, pwd, ray
        ray.init(address="100.96.0.1:6379", _node_ip_address="100.96.0.1", log_to_driver=False)
        @ray.remote(num_cpus=0, resources={"vram_mib": 1})
        def who():
            return os.getuid(), pwd.getpwuid(os.getuid()).pw_name
        print(json.dumps(ray.get(who.remote(), timeout=120)))
    """)
    out = head.run([PYTHON, "-c", driver], timeout=180).stdout.strip().splitlines()[-1]
    uid, name = json.loads(out)
    assert uid != 0 and name == "garage-ray"


def test_the_firewall_leaves_with_the_agent(region):
    n1 = region.hosts[1]
    table = "garage-node-garage0"
    assert n1.run(["nft", "list", "table", "inet", table], check=False).returncode == 0
    n1.stop()
    assert n1.run(["nft", "list", "table", "inet", table], check=False).returncode != 0
    n1.start()
    n1.wait_state("joined", 180)
