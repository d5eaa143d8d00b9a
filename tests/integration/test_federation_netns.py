"""Federation (issue #21) across delays: three regions, each in a network namespace of its
own, delayed inside (client to head 10/20/30 ms) and between them (80/150/250 ms) through
testing/fednet.py's relays (this kernel has no netem); each region the real gateway, federation
and nats-server with engine stand-ins (testing/fedregion.py). About a minute and a half.

The figures (how fast, how many) are bench/federation.py's; this proves the behaviour: keys and
revocations reach every region, a request spills to the nearest region that can serve it and
is refused fast when none can, a partition loses and doubles no usage record and the cut-off
region serves on, NATS down leaves the region serving and saying so, and a killed head's
clients are answered by another head."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from testing.federation import wait_for
from testing.fednet import in_namespaces

WHY_NOT = ("needs root (network namespaces)" if os.geteuid() != 0
           else "nats-server is not installed (scripts/install-deps)" if shutil.which("nats-server") is None else "")
pytestmark = [pytest.mark.testbed, pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT)]

REGIONS = ["us", "eu", "ap"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    net, regs = in_namespaces(tmp_path_factory.mktemp("fedns"), REGIONS, {"us": 10.0, "eu": 20.0, "ap": 30.0},
                              {("us", "eu"): 80.0, ("us", "ap"): 150.0, ("eu", "ap"): 250.0})
    try:
        net.up()
        regs.start_all(90)
        yield net, regs
    finally:
        try:
            regs.stop_all()
        finally:
            net.down()
    assert not [ns for ns in os.popen("ip netns list").read().split() if ns.startswith(net.owner)]


def one(net, regs, region: str, secret: str, **kw) -> list:
    return net.client({"op": "many", "url": regs[region].url, "key": secret, "n": 1, **kw})[0]


def test_keys_and_revocations_reach_every_region_across_the_delays(world):
    net, regs = world
    key, secret = regs.create_key("ap", "alice")
    got = net.client({"op": "until", "urls": [regs[r].url for r in REGIONS], "key": secret, "status": 200, "within_s": 10})
    assert all(got.values()), got
    regs.revoke_key("us", "alice")
    got = net.client({"op": "until", "urls": [regs[r].url for r in REGIONS], "key": secret, "status": 401, "within_s": 10})
    assert all(got.values()), got


def test_spill_goes_to_the_nearest_region_that_can_serve_and_none_is_a_fast_429(world):
    net, regs = world
    _, secret = regs.create_key("us", "bob")
    assert wait_for(lambda: one(net, regs, "eu", secret)[0] == 200, 10.0)
    try:
        regs["us"].all_pcs("busy")
        r = wait_for(lambda: (x := one(net, regs, "us", secret))[4] == "us" and x, 10.0)
        assert r and r[0] == 200 and r[2] == "eu" and r[3].startswith("eu-")  # eu: 80 ms away, ap: 150
        regs["eu"].all_pcs("down")
        r = wait_for(lambda: (x := one(net, regs, "us", secret))[2] == "ap" and x, 15.0)
        assert r and r[0] == 200  # the next nearest within the 500 ms budget
        regs["ap"].all_pcs("busy")
        r = wait_for(lambda: (x := one(net, regs, "us", secret))[0] == 429 and x, 15.0)
        assert r and r[1] < 1000  # refused at once, not after a wait
    finally:
        for region in REGIONS:
            regs[region].all_pcs("healthy")


def test_a_partition_loses_and_doubles_no_usage_and_the_cut_off_region_serves_on(world):
    net, regs = world
    _, secret = regs.create_key("eu", "carol")
    assert wait_for(lambda: all(one(net, regs, r, secret)[0] == 200 for r in REGIONS), 10.0)
    time.sleep(1.5)  # those checks' records written (every 0.2 s) and shipped before the tables are compared
    base = wait_for(lambda: (c := regs.usage_counts()) and all(c[r] == c["us"] for r in REGIONS) and c["us"], 30.0)
    assert base, regs.usage_counts()
    loads = {r: net.client_bg({"op": "load", "url": regs[r].url, "key": secret, "rate": 4.0, "seconds": 16})
             for r in REGIONS}
    time.sleep(3)
    net.partition("us")
    time.sleep(10)
    net.partition("us", cut=False)
    answered = {r: net.result(p) for r, p in loads.items()}
    assert all(set(a) == {"200"} for a in answered.values()), answered  # us served its own throughout
    want = {r: base.get(r, 0) + answered[r]["200"] for r in REGIONS}
    assert wait_for(lambda: all(c == want for c in regs.usage_counts().values()), 60.0, every_s=0.5), (regs.usage_counts(), want)


def test_nats_down_the_region_serves_and_says_it_is_degraded(world):
    net, regs = world
    _, secret = regs.create_key("us", "dave")
    assert wait_for(lambda: one(net, regs, "ap", secret)[0] == 200, 10.0)
    pid = regs["ap"].nats_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        r = wait_for(lambda: (x := one(net, regs, "ap", secret))[5] == "degraded" and x, 20.0, every_s=0.5)
        assert r and r[0] == 200
    finally:
        os.kill(pid, signal.SIGCONT)
    assert wait_for(lambda: one(net, regs, "ap", secret)[5] is None, 20.0, every_s=0.5)


def test_a_killed_heads_clients_are_answered_by_another_head(world):
    net, regs = world
    _, secret = regs.create_key("eu", "erin")
    assert wait_for(lambda: one(net, regs, "us", secret)[0] == 200, 10.0)
    client = net.client_bg({"op": "failover", "urls": [regs["us"].url, regs["eu"].url], "key": secret, "seconds": 5,
                            "every_s": 0.1, "timeout_s": 1.0})
    time.sleep(2)
    killed = time.time()
    regs.kill("us")
    got = net.result(client)
    after = [x for x in got if x[0] > killed + 0.05]
    assert after and all(x[1] == 200 and x[2] == regs["eu"].url for x in after), after
