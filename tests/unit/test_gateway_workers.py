"""[gateway] workers: worker processes on the gateway's port beside the head's own gateway
(head/gateway/workers.py, worker.py, relay.py), on real processes, sockets and SQLite.

Each test starts the head's side in this process (a real Gateway, its worker pool) and real
worker processes; the head's own listener is left unstarted where a test must be sure that
the worker answered."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from garage_node.core.settings import ConfigError
from garage_node.head.config import GatewaySection, load_head_config
from garage_node.head.connguard import GuardLimits
from garage_node.head.gateway.gateway import Gateway
from garage_node.head.gateway.serve import gateway_config
from garage_node.head.gateway.workers import GatewayWorkers
from garage_node.head.listener import BackgroundServer, ListenerError
from tests.unit.test_gateway import MODEL, Engine, free_port, report

LIMITS = GuardLimits(max_connections_per_client=256)


def wait_for(check, within_s: float = 10.0):
    deadline = time.monotonic() + within_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


class Head:
    """The head's side: its Gateway (what `head run` builds, audits off), engines for two
    PCs (reported or not), and a pool of `workers`-1 worker processes on `port`."""

    def __init__(self, tmp_path: Path, workers: int = 2, report_pcs: bool = True) -> None:
        self.port = free_port()
        self.cfg = GatewaySection(listen_host="127.0.0.1", port=self.port, workers=workers, connect_timeout_s=1.0,
                                  stream_idle_timeout_s=5.0)
        self.gw = Gateway(self.cfg, tmp_path, lambda: {"n1": "alice-pc", "n2": "bob-pc"})
        self.engines = {n: Engine(n, self.gw.engine_keys.for_node(n)) for n in ("n1", "n2")}
        self.pool = GatewayWorkers(self.gw, LIMITS)
        if report_pcs:
            for n in self.engines:
                self.report(n)
        _, self.secret = self.gw.keys.create("tester", now=time.time())
        self.gw.start()
        self.own: BackgroundServer | None = None

    def report(self, node_id: str) -> None:
        """As a heartbeat does: the head's table, then the workers (service.py subscribes both)."""
        r = report(endpoint=self.engines[node_id].url)
        self.gw.on_report(node_id, r)
        self.pool.on_report(node_id, r)

    def listen_too(self) -> None:
        """The head's own listener on the same port (as `head run` starts it)."""
        from garage_node.head.gateway.app import create_gateway_app

        app = create_gateway_app(self.gw)
        self.own = BackgroundServer("gateway", gateway_config(self.cfg, LIMITS, app, app.admission.protocol_hook()))
        self.own.start()

    def ask(self, stream: bool = False, key: str | None = None) -> httpx.Response:
        # A new connection each time: the kernel spreads connections, not requests.
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 3, "stream": stream}
        return httpx.post(f"http://127.0.0.1:{self.port}/v1/completions", json=body, timeout=10,
                          headers={"authorization": f"Bearer {key or self.secret}"})

    def requests_counted(self, status: str) -> float:
        for family in text_string_to_metric_families(generate_latest(self.gw.metrics.registry).decode()):
            for s in family.samples:
                if s.name == "garage_gateway_requests_total" and s.labels.get("status") == status:
                    return s.value
        return 0.0

    def worker_pids(self) -> list[int]:
        return [link.process.pid for link in self.pool._links]

    def stop(self) -> None:
        self.pool.stop()
        if self.own is not None:
            self.own.stop()
        for e in self.engines.values():
            e.stop()
        self.gw.stop()


@pytest.fixture
def head(tmp_path):
    h = Head(tmp_path)
    yield h
    h.stop()


def test_a_worker_serves_the_port_and_the_head_counts_its_requests(head):
    head.pool.start()  # the head's own listener is not started: only the worker listens
    answers = [head.ask() for _ in range(5)] + [head.ask(stream=True)]
    assert [r.status_code for r in answers] == [200] * 6
    assert {r.headers["x-garage-node"] for r in answers} <= {"alice-pc", "bob-pc"}
    assert "data: [DONE]" in answers[-1].text
    # Its metrics and demand reach the head's (relay.py); its usage is in the one ledger.
    assert wait_for(lambda: head.requests_counted("200") == 6), head.requests_counted("200")
    demand = head.gw.demand.snapshot()[MODEL]
    assert demand.requests_per_s * head.gw.demand.window_s == 6
    assert wait_for(lambda: head.gw.ledger.key_tokens("tester") == 60), head.gw.ledger.key_tokens("tester")


def test_a_pc_reported_after_the_start_reaches_the_worker(tmp_path):
    h = Head(tmp_path, report_pcs=False)
    try:
        h.pool.start()
        first = h.ask()
        assert first.status_code == 404 and "no PC in this region serves" in first.text
        h.report("n2")
        assert wait_for(lambda: h.ask().status_code == 200)
        assert h.ask().headers["x-garage-node"] == "bob-pc"
    finally:
        h.stop()


def test_the_head_and_its_worker_share_the_port(head):
    head.listen_too()
    head.pool.start()
    answers = [head.ask() for _ in range(40)]
    assert [r.status_code for r in answers] == [200] * 40
    assert wait_for(lambda: head.requests_counted("200") == 40)


def test_a_keys_request_limit_holds_across_the_head_and_its_worker(head):
    name, secret = head.gw.keys.create("limited", rpm=4, now=time.time())
    head.pool.start()
    # Two requests through the head's own gateway (not listening: its app, in this process).
    from tests.unit.test_gateway import call

    for _ in range(2):
        assert call(head.gw, "POST", "/v1/completions", {"model": MODEL, "prompt": "x"}, key=secret).status_code == 200
    time.sleep(0.3)  # the head tells its workers what it spent at once (a few ms; margin for a busy CI)
    statuses = [head.ask(key=secret).status_code for _ in range(4)]
    assert statuses == [200, 200, 429, 429], statuses
    # And what the worker spent, the head counts: its own gateway refuses the key too.
    assert call(head.gw, "POST", "/v1/completions", {"model": MODEL, "prompt": "x"}, key=secret).status_code == 429


def test_a_worker_that_dies_is_started_again(head):
    head.pool.start()
    assert head.ask().status_code == 200
    (pid,) = head.worker_pids()
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: head.worker_pids() != [pid] and head.pool._links[0].ready.is_set(), within_s=30)
    assert wait_for(lambda: _status(head) == 200, within_s=10)


def _status(head: Head) -> int:
    try:
        return head.ask().status_code
    except httpx.TransportError:
        return 0


def test_stop_ends_the_workers_and_frees_the_port(head):
    head.pool.start()
    pids = head.worker_pids()
    assert head.ask().status_code == 200
    head.pool.stop()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    with pytest.raises(httpx.ConnectError):
        head.ask()


def test_a_worker_that_cannot_listen_stops_the_start_with_why(tmp_path):
    h = Head(tmp_path)
    import socket

    # The port taken by a socket without SO_REUSEPORT: the worker cannot bind it.
    taken = socket.socket()
    taken.bind(("127.0.0.1", h.port))
    taken.listen()
    try:
        with pytest.raises(ListenerError) as e:
            h.pool.start()
        assert "gateway worker 1 of 2" in str(e.value) and "could not listen" in str(e.value)
    finally:
        taken.close()
        h.stop()


def test_workers_are_refused_with_federation_and_out_of_range(tmp_path):
    example = (Path(__file__).parents[2] / "configs" / "head.example.toml").read_text()
    path = tmp_path / "head.toml"

    def load(workers: int, federation: bool):
        text = example.replace("\nworkers = 1\n", f"\nworkers = {workers}\n", 1)
        if federation:
            at = text.index("[federation]")
            text = text[:at] + text[at:].replace("enabled = false", "enabled = true", 1)
        path.write_text(text)
        return load_head_config(path)

    assert load(1, False).gateway.workers == 1  # the example as shipped
    assert load(4, False).gateway.workers == 4
    assert load(1, True).federation.enabled
    with pytest.raises(ConfigError, match=r"workers = 4 does not work with \[federation\] enabled"):
        load(4, True)
    with pytest.raises(ConfigError, match="from 1 to 64"):
        load(0, False)


def test_the_workers_admission_states_reach_the_heads_metrics(head):
    """Each process has its own governor: the head's gauges sum its own and what each worker
    last said (a worker past its CPU limits on its own)."""
    from garage_node.head.gateway.app import create_gateway_app
    from garage_node.head.gateway.metrics import AdmissionState

    governor = create_gateway_app(head.gw).admission.governor  # the head's own, as `head run` makes it
    head.pool.start()
    link = head.pool._links[0]
    assert wait_for(lambda: link.admission is not None), "the worker never said its governor's state"
    assert not link.admission.limiting

    def gauge(name: str) -> float | None:
        return head.gw.metrics.registry.get_sample_value(f"garage_gateway_admission_{name}")

    assert (gauge("limiting"), gauge("rate"), gauge("capacity")) == (0.0, 0.0, 0.0)
    link.admission = AdmissionState(True, 300.0, 900.0)  # as the worker says it once past its CPU
    governor.limiting, governor.rate, governor.capacity_rps = True, 200.0, 800.0
    assert (gauge("limiting"), gauge("rate"), gauge("capacity")) == (2.0, 500.0, 1700.0)
    governor.limiting, governor.rate, governor.capacity_rps = False, float("inf"), float("inf")
    assert (gauge("limiting"), gauge("rate"), gauge("capacity")) == (1.0, 300.0, 900.0)
    head.pool.stop()
    assert wait_for(lambda: link.admission is None), "a worker that ended still counts"


def test_a_worker_sends_its_governors_state_when_it_changes():
    from multiprocessing import Pipe

    from garage_node.head.gateway.admission import Governor
    from garage_node.head.gateway.metrics import AdmissionState
    from garage_node.head.gateway.relay import Events
    from garage_node.head.gateway.worker import Outbox

    ours, heads = Pipe()
    g = Governor(0.05, in_flight=lambda: 0)
    outbox = Outbox(ours, Events(), admission=lambda: AdmissionState.of(g))
    outbox.flush()
    assert heads.recv() == ("admission", AdmissionState(False, float("inf"), float("inf")))
    outbox.flush()
    assert not heads.poll(0.1)  # unchanged: nothing sent
    g.limiting, g.rate, g.capacity_rps = True, 123.0, 456.0
    outbox.flush()
    assert heads.recv() == ("admission", AdmissionState(True, 123.0, 456.0))
