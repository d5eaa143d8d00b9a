"""`garage-node head audit status|calibrate` against a real head state directory, with the
audits a running head would have written (head/audit/book.py)."""

from __future__ import annotations

import json
import time

from garage_node.head.audit import sprt
from garage_node.head.audit.book import CALIBRATE_MIN_AUDITS, Book, upper_rate
from garage_node.head.audit.score import Score
from garage_node.head.audit.trust import Trust
from tests.unit.test_headtrust import cli, head  # noqa: F401 (a fixture)


def score(n: int, bad: int) -> Score:
    return Score(greedy=True, n=n, bad=bad, z=0.0, mean_gap=0.1, eos_checked=False, early_stop=False,
                 tokens_counted=n, tokens_reported=n, usage_inflated=False)


def audit(book: Book, node: str, n: int, bad: int, rec: sprt.Record) -> sprt.Record:
    step = sprt.weigh(rec, score(n, bad), sprt.Hypotheses.of(None), sprt.Thresholds.of(1e-4))
    book.record(time.time(), time.time(), node, "tiny", "cpu", "customer", score(n, bad), step.llr, "nv", "0.1.0",
                step.record)
    return step.record


def test_status_before_any_audit_and_with_audits(head, capsys) -> None:  # noqa: F811
    config, nodes, store = head
    rc, out, _ = cli(capsys, config, "audit", "status")
    assert rc == 0 and "the head has not run with audits yet" in out and "no PC audited yet" in out
    alice, bob = nodes["alice-pc"], nodes["bob-pc"]
    book = Book(store)
    rec = sprt.Record()
    for _ in range(3):
        rec = audit(book, alice, 100, 0, rec)
    audit(book, bob, 100, 90, sprt.Record())
    book.add_requests({alice: 40, bob: 7}, time.time())
    Trust(store).quarantine(bob, "audits: its answers' tokens are not what the model gives")
    book.set_state({"verifier": "tiny: no verifier: no PC marked trusted serves it", "pending": 2, "scored": 4},
                   time.time())
    rc, out, _ = cli(capsys, config, "audit", "status")
    assert rc == 0
    assert "verifier (0 s ago): tiny: no verifier" in out and "2 waiting, 4 scored" in out
    line = next(ln for ln in out.splitlines() if ln.startswith(f"alice-pc ({alice})"))
    assert " ok " in line and " 3 " in line and " 40 " in line and "default: not calibrated" in line
    assert "0.020" in line
    bob_line = next(ln for ln in out.splitlines() if ln.startswith(f"bob-pc ({bob})"))
    assert "quarantined" in bob_line
    assert "why: audits: its answers' tokens" in out
    doc = json.loads(cli(capsys, config, "audit", "status", "--json")[1])
    pcs = {p["node"]: p for p in doc["pcs"]}
    assert pcs[alice]["audits"] == 3 and pcs[alice]["evidence"]["tokens"] < 0 and doc["loop_running"]


def test_calibrate_needs_trusted_pcs_and_enough_audits(head, capsys) -> None:  # noqa: F811
    config, nodes, store = head
    alice = nodes["alice-pc"]
    rc, _, err = cli(capsys, config, "audit", "calibrate")
    assert rc == 2 and "name the model" in err
    rc, _, err = cli(capsys, config, "audit", "calibrate", "tiny")
    assert rc == 2 and "no PC is marked trusted" in err and "head node trust" in err
    Trust(store).set_trusted(alice, True)
    book = Book(store)
    rec = audit(book, alice, 30, 0, sprt.Record())
    rc, _, err = cli(capsys, config, "audit", "calibrate", "tiny")
    assert rc == 2 and "only 1 greedy audits" in err
    for i in range(CALIBRATE_MIN_AUDITS):
        rec = audit(book, alice, 30, 2 if i == 0 else 0, rec)  # one answer with 2 bad tokens
    rc, out, _ = cli(capsys, config, "audit", "calibrate", "tiny")
    assert rc == 0 and "tiny on cpu: honest rate" in out
    rate = book.rates()[("tiny", "cpu")]
    # Per answer: 1 bad greedy answer of 151 audits (not 2 bad of 4,530 tokens).
    assert (rate.audits, rate.bad, rate.tokens) == (CALIBRATE_MIN_AUDITS + 1, 1, 30 * (CALIBRATE_MIN_AUDITS + 1))
    assert rate.eps0 == upper_rate(1, CALIBRATE_MIN_AUDITS + 1) and 1 / rate.audits < rate.eps0 < 0.05
    rc, out, _ = cli(capsys, config, "audit", "status")
    assert "calibrated)" in next(ln for ln in out.splitlines() if ln.startswith("alice-pc"))


def test_upper_rate() -> None:
    assert upper_rate(0, 0) == 1.0
    assert 0 < upper_rate(0, 10_000) < 0.001
    assert 0.01 < upper_rate(100, 10_000) < 0.0130
