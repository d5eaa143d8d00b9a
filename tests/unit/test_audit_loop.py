"""The audit loop end to end on unit scale: a gateway served by uvicorn (as `head run`
serves it) in front of vLLM stand-ins with a real tiny model (test_audit_engine.py), one PC
marked trusted as the verifier, the loop on its own thread. A PC serving other weights is
quarantined, an honest one is not; canaries go through the gateway billed to 'audit-canary';
a release re-check keeps a cheater out and lets an honest PC back; without a verifier the
loop says so."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
import time
from typing import Any, Callable

import httpx
import uvicorn

from garage_node.head.audit.book import Book
from garage_node.head.config import AuditSection, GatewaySection
from garage_node.head.gateway.app import create_gateway_app
from garage_node.head.gateway.gateway import Gateway
from tests.unit.test_audit_capture import report
from tests.unit.test_audit_engine import MODEL, ToyEngine, ToyModel, engines, free_port  # noqa: F401


class Region:
    def __init__(self, tmp_path: Any, pcs: dict[str, ToyEngine], trusted: tuple[str, ...], **audit: Any) -> None:
        cfg = AuditSection(**{"rate": 1.0, "new_rate": 1.0, "suspect_rate": 1.0, "canary_rate": 0.0, **audit})
        self.gw = Gateway(GatewaySection(), tmp_path, lambda: {n: f"{n}-pc" for n in pcs}, audit=cfg)
        self.pcs = pcs
        for n, e in pcs.items():
            self.gw.on_report(n, report(e.url))
        for n in trusted:
            self.gw.trust.set_trusted(n, True)
        _, self.secret = self.gw.keys.create("tester", now=time.time())
        port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_gateway_app(self.gw), host="127.0.0.1", port=port,
                                                    log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{port}"
        self.gw.start()
        assert self.gw.auditor is not None
        self.auditor = self.gw.auditor

    def ask(self, n: int, temperature: float = 0.0) -> None:
        for i in range(n):
            r = httpx.post(self.url + "/v1/completions", headers={"authorization": f"Bearer {self.secret}"},
                           json={"model": MODEL, "prompt": f"request {i} about {'abcdefgh'[i % 8]}", "max_tokens": 30,
                                 "temperature": temperature}, timeout=20)
            assert r.status_code in (200, 503), r.text

    def stop(self) -> None:
        self.gw.stop()
        self.server.should_exit = True
        self.thread.join(5)


def wait(what: Callable[[], Any], timeout_s: float = 60.0, why: Callable[[], str] = lambda: "") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out {why()}")


def test_a_pc_serving_other_weights_is_quarantined_an_honest_one_is_not(tmp_path, engines) -> None:  # noqa: F811
    region = Region(tmp_path, {"nv": engines(seed=1), "good": engines(seed=1), "bad": engines(seed=2)}, ("nv",))
    try:
        region.ask(24)  # spread at random over the three: the cheater gets 2 or more but 0.1 % of the time

        def quarantined() -> bool:
            if region.gw.trust.get("bad").state == "quarantined":
                return True
            if len(region.pcs["bad"].bodies) < 4:
                region.ask(3)  # that 0.1 %: more, until the cheater has had enough to be judged on
            return False

        wait(quarantined, why=lambda: f"(the cheater served {len(region.pcs['bad'].bodies)} requests; "
                                      f"audit {region.auditor.status()}, last error {region.auditor.last_error!r})")
        t = region.gw.trust.get("bad")
        assert "not what the model gives" in t.why and t.frozen_at is not None
        region.ask(12)  # the rest go to the others
        # All scored but the verifier's own answers, which wait for another verifier.
        wait(lambda: all(x.node_id == "nv" for x in region.auditor.pending))
        book = Book(region.gw.store)
        records = book.records()
        assert records["good"].audits >= 3 and records["good"].sums["tokens"] < 0
        assert records["bad"].audits >= 2
        assert region.gw.trust.get("good").state == "ok"
        rows = book.recent("bad")
        assert rows and all(r["verifier"] == "nv" and r["greedy"] == 1 and r["bad"] > 0 for r in rows)
        assert region.pcs["nv"].scored >= records["good"].audits + records["bad"].audits
        assert "nv" not in records or records["nv"].audits == 0  # never scored by itself
    finally:
        region.stop()


def test_canaries_go_through_the_gateway_billed_to_their_key(tmp_path, engines) -> None:  # noqa: F811
    # Both trusted: each verifies the other, wherever the router sends a canary.
    region = Region(tmp_path, {"nv": engines(seed=1), "good": engines(seed=1)}, ("nv", "good"), canary_rate=0.5,
                    rate=0.0, new_rate=0.0, suspect_rate=0.0)
    try:
        region.ask(8)
        wait(lambda: any(r["kind"] == "canary" for r in Book(region.gw.store).recent(limit=50)))
        wait(lambda: region.gw.ledger.key_tokens("audit-canary") > 0, 15)
        kinds = {r["kind"] for r in Book(region.gw.store).recent(limit=50)}
        assert kinds == {"canary"}  # customers' requests were not drawn (rate 0)
    finally:
        region.stop()


def test_a_release_recheck_keeps_a_cheater_out_and_lets_an_honest_pc_back(tmp_path, engines) -> None:  # noqa: F811
    bad = engines(seed=2)
    region = Region(tmp_path, {"nv": engines(seed=1), "bad": bad}, ("nv",))
    try:
        region.gw.trust.quarantine("bad", "by hand")
        region.gw.trust.start_recheck("bad")
        wait(lambda: region.gw.trust.get("bad").state == "quarantined", 60)
        assert "re-check failed" in region.gw.trust.get("bad").why
        assert len(bad.bodies) >= 8  # its canaries reached it, pinned, while it got no customers
        bad.model = ToyModel(1)  # the owner serves the right weights again
        region.gw.trust.start_recheck("bad")
        wait(lambda: region.gw.trust.get("bad").state == "ok", 60)
        assert Book(region.gw.store).records()["bad"].audits == 0  # a fresh record
    finally:
        region.stop()


def test_without_a_verifier_samples_wait_and_status_says_so(tmp_path, engines) -> None:  # noqa: F811
    region = Region(tmp_path, {"good": engines(seed=1)}, ())
    try:
        region.ask(3)
        wait(lambda: "no verifier" in region.auditor.verifier_state)
        assert len(region.auditor.pending) == 3 and region.auditor.counters.scored == 0
        state = wait(lambda: "no verifier" in Book(region.gw.store).state()["verifier"][0]
                     and Book(region.gw.store).state()["verifier"][0], 15)
        assert "head node trust" in state
    finally:
        region.stop()


def test_metrics(tmp_path, engines) -> None:  # noqa: F811
    from prometheus_client import generate_latest

    # Both trusted: each verifies the other, wherever the router sends a request.
    region = Region(tmp_path, {"nv": engines(seed=1), "good": engines(seed=1)}, ("nv", "good"))
    try:
        region.ask(6)
        wait(lambda: region.auditor.counters.scored >= 2, 60)
        text = generate_latest(region.gw.metrics.registry).decode()
        assert 'garage_audit_scored_total{kind="customer"}' in text
        node = next(iter(region.auditor.records))
        assert f'garage_audit_evidence{{name="{node}-pc",node="{node}",test="partial"}}' in text
        assert "garage_audit_verifier_up 1.0" in text and "garage_audit_threshold 10.5" in text
    finally:
        region.stop()


def test_a_busy_trusted_pc_verifies_only_when_it_can_spare_it(tmp_path, engines) -> None:  # noqa: F811
    import asyncio

    nv = engines(seed=1)
    gw = Gateway(GatewaySection(), tmp_path, lambda: {}, audit=AuditSection())
    gw.on_report("nv", report(nv.url))
    gw.trust.set_trusted("nv", True)
    auditor = gw.auditor
    assert auditor is not None
    ep = gw.table.get("nv")
    assert ep is not None

    def pick(patient: bool) -> Any:
        async def go() -> Any:
            async with httpx.AsyncClient() as http:
                return await auditor._verifier_for(http, MODEL, "n1", patient)
        return asyncio.run(go())

    assert pick(False)[0].name == "nv"
    ep.inflight = 5  # serving customers
    assert pick(False) is None and "busy with customers" in auditor.verifier_state
    assert pick(True)[0].name == "nv"  # a sample that waited long enough
    gw.on_report("nv", replace(report(nv.url), engine=replace(report(nv.url).engine, requests_waiting=3)))
    assert pick(True) is None  # customers queue there: never


def test_a_streamed_canary_is_relayed_to_its_end_and_kept(tmp_path, engines) -> None:  # noqa: F811
    import asyncio

    from garage_node.head.audit import auditor as auditor_module
    from garage_node.head.audit.canaries import Canary

    pc = engines(seed=1)
    region = Region(tmp_path, {"good": pc}, ())  # no verifier: what is kept stays in the queue
    try:
        loop = wait(lambda: region.auditor.gateway_loop)
        for stream in (True, False):
            body = {"model": MODEL, "prompt": "a canary", "max_tokens": 20, "temperature": 0, "stream": stream}
            call = auditor_module._canary_call(Canary("/v1/completions", body), region.gw.router, "canary", None,
                                               time.monotonic())
            resp = asyncio.run_coroutine_threadsafe(auditor_module._answered(region.gw.proxy, call), loop).result(20)
            assert resp.status_code == 200
        kept = list(region.auditor.pending)
        assert [s.kind for s in kept] == ["canary", "canary"]
        assert kept[0].text == kept[1].text != "" and kept[0].finish_reason == kept[1].finish_reason
        # The streamed one went out as a customer's stream does (the gateway asks for usage).
        sent = [json.loads(b) for b in pc.bodies]
        assert sent[0]["stream"] and sent[0]["stream_options"] == {"include_usage": True}
        assert kept[0].completion_tokens == len(kept[0].text)
        wait(lambda: region.gw.ledger.key_tokens("audit-canary") >= 2 * len(kept[0].text), 15)
    finally:
        region.stop()


def test_a_recheck_of_a_pc_that_answers_nothing_ends_in_quarantine_not_at_once(tmp_path, engines,  # noqa: F811
                                                                              monkeypatch) -> None:
    from garage_node.head.audit import auditor as auditor_module

    monkeypatch.setattr(auditor_module, "RECHECK_GIVE_UP_S", 2.0)
    monkeypatch.setattr(auditor_module, "RECHECK_RETRY_S", 0.3)
    gone = engines(seed=1)
    region = Region(tmp_path, {"nv": engines(seed=1), "gone": gone}, ("nv",))
    try:
        gone.stop()  # its engine is down; its last report still says healthy
        region.gw.trust.quarantine("gone", "by hand")
        region.gw.trust.start_recheck("gone")
        time.sleep(1.0)
        assert region.gw.trust.get("gone").state == "rechecking"  # unanswered canaries are retried, not a verdict
        wait(lambda: region.gw.trust.get("gone").state == "quarantined", 15)
        assert "answered none of the test requests" in region.gw.trust.get("gone").why
    finally:
        region.stop()
