"""HeadService's decisions, in-process: the real registry, config and Ray token files in a
temporary state directory; fakes for what needs root or starts processes (the firewall, the
WireGuard interface, the Ray head and Redis children). The testbed (tests/integration) proves
the same on the real parts."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from garage_node.core.wireguard import Peer, generate_private_key, public_key_of
from garage_node.head import service as service_mod
from garage_node.head import setup
from garage_node.head.config import ApiSection, GatewaySection, HeadConfig, HeadOptions, HeadRaySection, HeadSection
from garage_node.head.service import HeadService
from garage_node.head.setup import SetupError


class Journal(list):
    """What the fakes were asked to do, in order."""


class FakeFirewall:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.tables: set[str] = set()

    def apply(self, rules) -> None:
        self.journal.append(("firewall", rules.table))
        self.tables.add(rules.table)

    def remove(self, table: str) -> None:
        self.journal.append(("firewall removed", table))
        self.tables.discard(table)

    def present(self, table: str) -> bool:
        return table in self.tables


class FakeInterface:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.peers: list[Peer] = []

    def up(self, private_key: str, address: str, listen_port: int | None = None) -> None:
        self.journal.append(("interface up", address, listen_port))

    def down(self) -> None:
        self.journal.append(("interface down",))

    def sync_peers(self, wanted: list[Peer]) -> tuple[int, int]:
        added = [p for p in wanted if p not in self.peers]
        removed = [p for p in self.peers if p not in wanted]
        self.peers = list(wanted)
        return len(added), len(removed)


class FakeChild:
    """A Supervised child: `starts` says whether ensure() gets it running (a backoff may not)."""

    def __init__(self, name: str, journal: Journal, starts: bool = True) -> None:
        self.name, self.journal, self.starts = name, journal, starts
        self.running = False
        self.argvs: list[list[str]] = []
        self.log_path = Path("/nonexistent") / f"{name}.log"

    def ensure(self, argv: list[str]) -> bool:
        if not self.running and self.starts:
            self.running = True
            self.argvs.append(argv)
            self.journal.append((f"{self.name} started",))
        return self.running

    def stop(self) -> None:
        if self.running:
            self.journal.append((f"{self.name} stopped",))
        self.running = False

    def die(self) -> None:
        self.running = False


class FakeGcs:
    password = "redis-secret"
    address = "127.0.0.1:6390"

    def __init__(self) -> None:
        self.answers = False
        self.configs_written = 0

    def write_config(self) -> None:
        self.configs_written += 1

    def argv(self) -> list[str]:
        return ["redis-server", "redis.conf"]

    def ready(self) -> bool:
        return self.answers

    def ray_env(self) -> dict[str, str]:
        return {"RAY_REDIS_ADDRESS": self.address}


def head_config(tmp_path: Path, **options) -> HeadConfig:
    return HeadConfig(head=HeadSection(region="test", state_dir=tmp_path / "state"),
                      api=ApiSection(advertise_host="127.0.0.1"),
                      ray=HeadRaySection(temp_dir=tmp_path / "ray", gcs_fault_tolerance=False),
                      options=replace(HeadOptions(), **options))


@pytest.fixture
def journal() -> Journal:
    return Journal()


@pytest.fixture
def svc(tmp_path, journal, monkeypatch):
    cfg = head_config(tmp_path)
    setup.init(cfg)
    s = make_service(cfg, journal, monkeypatch)
    yield s
    s.registry.close()


def make_service(cfg: HeadConfig, journal: Journal, monkeypatch) -> HeadService:
    # Writing /proc/sys needs root; the order of what start() does is what is tested.
    monkeypatch.setattr(service_mod, "_enable_forwarding", lambda: journal.append(("forwarding",)))
    s = HeadService(cfg, firewall=FakeFirewall(journal))
    s.iface = FakeInterface(journal)
    s.ray = FakeChild("ray", journal)
    # The prober would start a Ray watch process; its parsing has tests of its own (test_gcs.py).
    s._prober = threading.Thread(target=lambda: None)
    return s


def enroll(registry, name: str) -> str:
    token_id, secret = f"tok-{name}", "secret-secret-secret"
    registry.add_token(token_id, secret, 3600, 1)
    key = public_key_of(generate_private_key())
    return registry.enroll(token_id, secret, name, "test", key).node.id


def test_no_head_without_head_init(tmp_path):
    with pytest.raises(SetupError, match="head init"):
        HeadService(head_config(tmp_path), firewall=FakeFirewall(Journal()))


def test_the_firewall_is_shut_before_the_interface_and_ray_come_up(svc, journal):
    svc.registry.record_ray_membership({"n-old"}, "c0ffee")  # what a previous head's Ray said
    svc.start()
    deadline = time.monotonic() + 10
    while ("ray started",) not in journal and time.monotonic() < deadline:  # the reconcile loop's first pass
        time.sleep(0.01)
    assert journal[0] == ("firewall", "garage-head-garage-hub")
    assert journal[1] == ("interface up", f"{svc.cfg.hub_ip}/16", 51820)
    assert journal.index(("forwarding",)) < journal.index(("ray started",))
    assert svc.registry.ray_cluster_id == ""  # stale before anyone can ask
    svc.stop()
    assert journal[-3:] == [("ray stopped",), ("interface down",), ("firewall removed", "garage-head-garage-hub")]


def test_stop_writes_the_heartbeats_held_in_memory(tmp_path, svc):
    node_id = enroll(svc.registry, "pc1")
    svc.start()
    svc.registry.record_heartbeat(node_id, {}, confirm=True)  # held for the next batch
    svc.stop()
    again = setup.open_registry(svc.cfg)
    assert again.node(node_id).last_seen is not None and again.node(node_id).confirmed_at is not None


def test_hub_peers_follow_the_registry_and_unconfirmed_enrollments_are_reclaimed(tmp_path, journal, monkeypatch):
    cfg = head_config(tmp_path, reclaim_unconfirmed_after_s=0.05)
    setup.init(cfg)
    svc = make_service(cfg, journal, monkeypatch)
    kept = enroll(svc.registry, "kept")
    enroll(svc.registry, "lost")
    svc.registry.record_heartbeat(kept, {}, confirm=True)  # came back with its credential
    svc.sync_peers()
    assert len(svc.iface.peers) == 2  # too young to reclaim
    time.sleep(0.1)
    svc.sync_peers()
    ip = svc.registry.node(kept).overlay_ip
    assert [p.allowed_ips for p in svc.iface.peers] == [(f"{ip}/32",)]
    assert [n.id for n in svc.registry.nodes()] == [kept]  # `lost` is gone, its address free again
    svc.registry.revoke(kept)
    svc.sync_peers()
    assert svc.iface.peers == []
    svc.registry.close()


def test_a_rotated_ray_token_restarts_the_ray_head(svc, journal):
    svc._ensure_ray()
    svc._ensure_ray()
    assert journal.count(("ray started",)) == 1
    argv = svc.ray.argvs[0]
    assert "--head" in argv and svc.cfg.hub_ip in " ".join(argv)
    setup.rotate_ray_token(svc.cfg)
    st = svc.paths.ray_token.stat()
    os.utime(svc.paths.ray_token, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a coarse clock
    svc._ensure_ray()
    assert journal[-2:] == [("ray stopped",), ("ray started",)]
    svc._ensure_ray()
    assert journal.count(("ray started",)) == 2


def test_while_the_ray_head_is_down_membership_is_cleared_once_per_outage(svc, journal, monkeypatch):
    cleared = []
    record = svc.registry.record_ray_membership
    monkeypatch.setattr(svc.registry, "record_ray_membership",
                        lambda alive, cluster_id="": (cleared.append(alive), record(alive, cluster_id)))
    stale = svc.cfg.ray.temp_dir / "ray_current_cluster"
    stale.parent.mkdir(parents=True)
    stale.write_text("/tmp/ray/session_old")
    svc.ray.starts = False  # its backoff holds it down
    for _ in range(3):
        svc._ensure_ray()
    assert cleared == [set()] and not stale.exists()
    svc.ray.starts = True
    svc._ensure_ray()
    assert svc.ray.running and cleared == [set()]
    svc.ray.die()
    svc._ensure_ray()  # a new outage, cleared again (and the head started again)
    assert cleared == [set(), set()]


def test_the_ray_head_waits_for_its_gcs_store_to_answer(svc, journal):
    svc.gcs, svc.redis = FakeGcs(), FakeChild("redis", journal)
    svc._ensure_ray()
    svc._ensure_ray()
    assert svc.redis.running and not svc.ray.running  # a GCS on a store not there would start a new cluster
    svc.gcs.answers = True
    svc._ensure_ray()
    assert svc.ray.running and "redis-secret" in " ".join(svc.ray.argvs[0])
    assert svc.gcs.configs_written == 1  # written before redis started, not on every pass
    svc.gcs.answers = False  # once the Ray head runs, redis is kept running, not waited for
    svc.redis.die()
    svc._ensure_ray()
    assert svc.redis.running and svc.ray.running and svc.gcs.configs_written == 2


def test_the_firewall_opens_the_api_and_the_gateway_and_the_metrics_only_off_loopback(tmp_path, journal, monkeypatch):
    cfg = head_config(tmp_path)
    setup.init(cfg)
    svc = make_service(cfg, journal, monkeypatch)
    rules = svc.firewall_rules()
    assert rules.open_tcp == (22, 8080, 8443) and rules.hub
    assert any(first <= 6379 <= last for first, last in rules.ray_ports)
    svc.cfg = replace(cfg, gateway=GatewaySection(metrics_host="0.0.0.0"),
                      ray=replace(cfg.ray, port=6400))
    svc.ray_ports = replace(svc.ray_ports, gcs=6400)
    assert svc.firewall_rules().open_tcp == (22, 8080, 8443, 9464)
    assert any(first <= 6400 <= last for first, last in svc.firewall_rules().ray_ports)
    svc.cfg = replace(cfg, gateway=GatewaySection(enabled=False))
    assert svc.firewall_rules().open_tcp == (22, 8443)
    svc.registry.close()
