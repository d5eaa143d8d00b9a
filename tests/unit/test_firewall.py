"""The nftables script the agent and the head install (core/firewall.py); `nft -c` checks it
where nft is installed (it parses without touching the kernel's ruleset)."""

import shutil
import subprocess

import pytest

from garage_node.core.firewall import Rules, ruleset
from garage_node.core.raycmd import RAY_PORTS

NODE = Rules(table="garage-node-garage0", overlay_interface="garage0", overlay_cidr="100.96.0.0/16",
             ray_ports=tuple(RAY_PORTS.ranges()), open_tcp=(22,))
SHARED = Rules(table="garage-node-garage0", overlay_interface="garage0", overlay_cidr="100.96.0.0/16",
               ray_ports=tuple(RAY_PORTS.ranges()), closed_tcp=tuple(RAY_PORTS.ranges()) + ((8000, 8000),))
HEAD = Rules(table="garage-head-garage-hub", overlay_interface="garage-hub", overlay_cidr="100.96.0.0/16",
             ray_ports=tuple(RAY_PORTS.ranges()), open_tcp=(22, 8443), hub=True)


def test_node_rules_shut_everything_but_the_tunnel():
    text = ruleset(NODE)
    # One transaction: the table is made (if missing), deleted and written anew.
    assert text.startswith("table inet garage-node-garage0 {}\ndelete table inet garage-node-garage0\n")
    assert ('iifname != { "lo", "garage0" } ip daddr 100.96.0.0/16 fib daddr type local '
            'ct state new,invalid,untracked drop') in text
    assert "priority mangle" in text  # after conntrack, before Docker's DNAT
    assert "tcp dport { 22 } accept" in text and "meta l4proto tcp drop" in text
    assert "forward" not in text


def test_a_machine_that_serves_others_closes_only_ray_and_the_engine():
    text = ruleset(SHARED)
    assert "tcp dport { 6379-6385, 10001, 10002-10999, 8000 } drop" in text and "meta l4proto tcp drop" not in text
    assert 'ip daddr 100.96.0.0/16 fib daddr type local ct state' in text  # the overlay address stays WireGuard-only


def test_head_forwards_only_ray_between_nodes():
    text = ruleset(HEAD)
    assert "tcp dport { 22, 8443 } accept" in text
    assert 'iifname "garage-hub" oifname "garage-hub" tcp dport { 6379-6385, 10001, 10002-10999 } accept' in text
    assert text.index("tcp dport { 6379-6385") < text.rindex('iifname "garage-hub" oifname "garage-hub" drop')
    assert text.rstrip().endswith('oifname "garage-hub" drop\n  }\n}'.rstrip())


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft not installed (scripts/install-deps installs nftables)")
@pytest.mark.parametrize("rules", [NODE, SHARED, HEAD], ids=["node", "shared", "head"])
def test_nft_accepts_the_script(rules):
    res = subprocess.run(["nft", "-c", "-f", "-"], input=ruleset(rules), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
