"""The server's registry holds heartbeats and Ray membership in memory and writes them in
batches (#10): what it reads itself is always the newest value, the file catches up at the
next flush, and a clean stop loses nothing."""

import ipaddress
import threading
import time

import pytest

from garage_node.core.wireguard import generate_private_key, public_key_of
from garage_node.head.registry import EnrollError, Registry

NET = ipaddress.IPv4Network("100.96.0.0/24")
SECRET = "secret-secret-secret"
NEVER = 3600.0  # a flusher that never fires during a test: only flush()/close() write


def key():
    return public_key_of(generate_private_key())


def enrolled(reg, n=1):
    reg.add_token(f"t{n}", SECRET, 60, uses=None)
    return [reg.enroll(f"t{n}", SECRET, f"pc{i}", "eu", key()) for i in range(n)]


@pytest.fixture
def paths(tmp_path):
    return tmp_path / "r.sqlite"


def test_heartbeat_is_held_in_memory_read_back_fresh_and_written_by_flush(paths):
    reg = Registry(paths, NET, batch_s=NEVER)
    file = Registry(paths, NET)  # another connection, as the CLI reads the file
    (e,) = enrolled(reg)
    reg.record_heartbeat(e.node.id, {"state": "joined"})
    # The head's own reads see it at once ...
    assert reg.node(e.node.id).report == {"state": "joined"}
    assert reg.nodes()[0].last_seen is not None and reg.nodes()[0].confirmed_at is not None
    assert reg.authenticate(e.node.id, e.credential).node.report == {"state": "joined"}
    assert reg.find_node("pc0").last_seen is not None
    # ... the file only after the flush.
    assert file.node(e.node.id).last_seen is None and file.node(e.node.id).report == {}
    assert reg.flush() == 1
    on_disk = file.node(e.node.id)
    assert on_disk.report == {"state": "joined"} and on_disk.last_seen == reg.node(e.node.id).last_seen
    assert on_disk.confirmed_at is not None
    assert reg.flush() == 0  # nothing left


def test_only_the_latest_heartbeat_of_a_batch_is_written_and_confirmation_keeps_the_first(paths):
    reg = Registry(paths, NET, batch_s=NEVER)
    (e,) = enrolled(reg)
    reg.record_heartbeat(e.node.id, {"n": 0}, confirm=False)  # the enrollment's report
    assert reg.node(e.node.id).confirmed_at is None
    reg.record_heartbeat(e.node.id, {"n": 1})
    first = reg.node(e.node.id).confirmed_at
    reg.record_heartbeat(e.node.id, {"n": 2})
    assert reg.node(e.node.id).confirmed_at == first
    assert reg.flush() == 1
    row = Registry(paths, NET).node(e.node.id)
    assert row.report == {"n": 2} and row.confirmed_at == first


def test_close_writes_what_is_left_and_the_registry_then_writes_at_once(paths):
    reg = Registry(paths, NET, batch_s=NEVER)
    a, b = enrolled(reg, 2)
    reg.record_heartbeat(a.node.id, {"who": "a"})
    reg.record_heartbeat(b.node.id, {"who": "b"})
    reg.record_ray_membership({a.node.id})
    reg.close()
    file = Registry(paths, NET)
    assert [(n.report, n.ray_alive) for n in file.nodes()] == [({"who": "a"}, True), ({"who": "b"}, False)]
    reg.record_heartbeat(a.node.id, {"who": "a again"})  # after close: straight to the file
    assert file.node(a.node.id).report == {"who": "a again"}


def test_ray_membership_is_held_laid_over_every_row_and_written(paths):
    reg = Registry(paths, NET, batch_s=NEVER)
    file = Registry(paths, NET)
    a, b = enrolled(reg, 2)
    reg.record_ray_membership({b.node.id})
    fresh = {n.id: (n.ray_alive, n.ray_checked_at is not None) for n in reg.nodes()}
    assert fresh == {a.node.id: (False, True), b.node.id: (True, True)}
    assert reg.authenticate(b.node.id, b.credential).node.ray_alive  # what a heartbeat answer says
    assert not file.node(b.node.id).ray_alive
    reg.flush()
    assert file.node(b.node.id).ray_alive and not file.node(a.node.id).ray_alive
    reg.record_ray_membership(set())  # the Ray head restarted: nobody, at once, in memory too
    assert not reg.node(b.node.id).ray_alive


def test_write_through_without_batching(paths):
    reg = Registry(paths, NET)  # the CLI's registry: no flusher thread, nothing held
    (e,) = enrolled(reg)
    reg.record_heartbeat(e.node.id, {"x": 1})
    reg.record_ray_membership({e.node.id})
    row = Registry(paths, NET).node(e.node.id)
    assert row.report == {"x": 1} and row.ray_alive
    assert reg._heartbeats.thread is None  # no flusher thread without batching


def test_the_flusher_writes_by_itself(paths):
    reg = Registry(paths, NET, batch_s=0.05)
    file = Registry(paths, NET)
    (e,) = enrolled(reg)
    reg.record_heartbeat(e.node.id, {"x": 1})
    deadline = time.monotonic() + 20
    while file.node(e.node.id).report != {"x": 1}:
        assert time.monotonic() < deadline, "the flusher never wrote the heartbeat"
        time.sleep(0.02)
    reg.close()


def test_a_confirmation_still_in_memory_counts_for_reclaim_and_enrollment(paths):
    reg = Registry(paths, NET, batch_s=NEVER)
    reg.add_token("t", SECRET, 60, uses=1)
    k = key()
    e = reg.enroll("t", SECRET, "pc", "eu", k)
    reg.record_heartbeat(e.node.id, {})  # confirmed, in memory only
    time.sleep(0.02)
    assert reg.reclaim_unconfirmed(0.01) == []  # would have removed the row without the flush
    with pytest.raises(EnrollError) as err:  # not an unconfirmed enrollment any more
        reg.enroll("t", SECRET, "pc", "eu", k)
    assert err.value.code in ("key_in_use", "token_used")
    assert len(reg.nodes()) == 1


def test_many_threads_beating_while_the_flusher_runs(paths):
    reg = Registry(paths, NET, batch_s=0.005)
    nodes = enrolled(reg, 20)
    errors = []

    def beat(t):
        try:
            for i in range(100):
                for e in nodes[t::4]:
                    reg.record_heartbeat(e.node.id, {"i": i})
                    assert reg.authenticate(e.node.id, e.credential).node.report == {"i": i}
                reg.nodes()
        except Exception as ex:  # pragma: no cover - reported below
            errors.append(ex)

    threads = [threading.Thread(target=beat, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reg.close()
    assert errors == []
    assert {n.report["i"] for n in Registry(paths, NET).nodes()} == {99}
