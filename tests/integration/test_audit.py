"""Audits on real parts (issue #20): the head's gateway (its real proxy, audit loop, verifier
client, sequential test and trust store, served by uvicorn on loopback) in front of PCs whose
engines are the real vLLM CPU image serving trained tiny models (image/engine/
make_audit_models.py), some of them cheating through the shims of testing/cheats.py:

    pc-trusted  honest weights, marked trusted: the verifier (and a PC customers reach too)
    pc-honest   honest weights
    pc-other    other weights under the same model name
    pc-q3       the honest weights rounded to 3 bits per row (4 bits: see bench/audit.py, not caught)
    pc-cut      honest weights, answers cut at half of max_tokens and said to have stopped
    pc-tenth    honest, but a tenth of its requests answered by the other weights

The PCs' reports reach the gateway as the control API hands them over on each heartbeat
(Gateway.on_report); no agents or overlay here (tests/integration/test_gateway.py covers that
path), so the whole region fits 4 engines on 2 CPUs. Every request is audited (rates 1.0):
the test is short; bench/audit.py gives the figures at the real rates. The honest rate (eps0) is
calibrated first, as an operator does (`head audit calibrate`), from the trusted PC's audits.
"""

from __future__ import annotations

import concurrent.futures as cf
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import uvicorn

from garage_node.core.wire import EngineReport, EngineState
from garage_node.head.audit.book import Book, CalibrationError
from garage_node.head.config import AuditSection, GatewaySection
from garage_node.head.gateway.app import create_gateway_app
from garage_node.head.gateway.gateway import Gateway
from testing.cheats import Shim, Switcher, Truncator, Upstream, client_requests
from testing.dockerd import TEST_IMAGE, TINY_MODEL, EngineContainer, audit_model_dirs
from testing.fakes import sample_report

PCS = ("pc-trusted", "pc-honest", "pc-other", "pc-q3", "pc-cut", "pc-tenth")
ALWAYS = ("pc-other", "pc-q3", "pc-cut")
HONEST = ("pc-trusted", "pc-honest")
ROUND = 48  # requests per round
MAX_ROUNDS = 25


def _missing() -> str | None:
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "no running dockerd (image/engine/ensure-dockerd.sh starts one)"
    if subprocess.run(["docker", "image", "inspect", TEST_IMAGE], capture_output=True).returncode != 0:
        return f"image {TEST_IMAGE} not built (image/engine/build-vllm-cpu-image.sh)"
    return None


pytestmark = [pytest.mark.engine, pytest.mark.skipif(bool(_missing()), reason=str(_missing()))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Region:
    gw: Gateway
    url: str
    key: str
    shims: dict[str, Shim]
    engines: dict[str, EngineContainer]


def _report(url: str) -> Any:
    return replace(sample_report(), engine=EngineReport(state=EngineState.HEALTHY, model=TINY_MODEL, endpoint=url,
                                                        requests_running=0, requests_waiting=0))


@pytest.fixture(scope="module")
def region() -> Iterator[Region]:
    dirs = audit_model_dirs()
    state = Path(tempfile.mkdtemp(prefix="garage-audit-test-"))
    audit = AuditSection(rate=1.0, new_rate=1.0, suspect_rate=1.0, canary_rate=0.0)
    # The gateway shares 2 CPUs with 4 engines and the test here: its loop runs late at times,
    # which the admission bound (made for a head of its own) would answer with 503s.
    gw = Gateway(GatewaySection(max_queue_age_s=30.0), state, node_names=lambda: {p: p for p in PCS}, audit=audit)
    keys = {p: gw.engine_keys.for_node(p) for p in PCS}
    tag = f"garage-test-audit-{state.name[-8:]}"
    # Which PC's engine key each engine demands: the trusted PC's its own; the shared honest
    # and other engines their first PC's (the shims in front put the right key on).
    engines = {
        "trusted": EngineContainer(f"{tag}-trusted", dirs["honest"], _free_port(), cpus="1", api_key=keys["pc-trusted"]),
        "honest": EngineContainer(f"{tag}-honest", dirs["honest"], _free_port(), cpus="0", api_key=keys["pc-honest"]),
        "other": EngineContainer(f"{tag}-other", dirs["other"], _free_port(), cpus="0", api_key=keys["pc-other"]),
        "q3": EngineContainer(f"{tag}-q3", dirs["q3"], _free_port(), cpus="0", api_key=keys["pc-q3"]),
    }
    honest, other = Upstream(engines["honest"].url, keys["pc-honest"]), Upstream(engines["other"].url, keys["pc-other"])
    shims: dict[str, Shim] = {
        "pc-honest": Shim(honest),  # honest: only counts what reaches it
        "pc-other": Shim(other),
        "pc-q3": Shim(Upstream(engines["q3"].url, keys["pc-q3"])),
        "pc-cut": Truncator(honest),
        "pc-tenth": Switcher(honest, other, share=0.1, seed=3),
    }
    server: uvicorn.Server | None = None
    stop = threading.Event()
    try:
        for e in engines.values():
            e.start()
        for e in engines.values():
            e.wait_ready()
        for s in shims.values():
            s.start()
        urls = {"pc-trusted": engines["trusted"].url, **{p: s.url for p, s in shims.items()}}
        live = set(HONEST)  # the PCs reporting: the honest two first, for the calibration

        def beat() -> None:  # what each heartbeat hands the gateway
            while not stop.is_set():
                for p in sorted(live):
                    gw.on_report(p, _report(urls[p]))
                stop.wait(1)
        threading.Thread(target=beat, daemon=True).start()
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(create_gateway_app(gw), host="127.0.0.1", port=port,
                                               log_level="warning", loop="asyncio", http="h11"))
        threading.Thread(target=server.run, daemon=True).start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.05)
        gw.start()
        _, key = gw.keys.create("tester", time.time())
        reg = Region(gw, f"http://127.0.0.1:{port}", key, shims, engines)
        calibrate(reg)
        live.update(PCS)
        yield reg
    finally:
        stop.set()
        if server is not None:
            server.should_exit = True
        gw.stop()
        for s in shims.values():
            s.stop()
        for e in engines.values():
            e.stop()
        shutil.rmtree(state, ignore_errors=True)


def calibrate(r: Region) -> None:
    """What an operator does before audits decide anything: mark PCs whose answers are honest
    trusted, let them serve (greedy requests: each one's answers are scored by the other), and
    calibrate the model's honest bad-token rate from their audits (`head audit calibrate`),
    then keep one trusted PC as the verifier."""
    a = r.gw.auditor
    assert a is not None
    for p in HONEST:
        r.gw.trust.set_trusted(p, True)
    book = Book(r.gw.store)
    for i in range(10):
        assert drive(r, ROUND, seed=500 + i, greedy=True).count(200) == ROUND
        drained(r)
        try:
            rates = book.calibrate(TINY_MODEL, None, r.gw.trust.trusted(), time.time())
            break
        except CalibrationError:
            continue
    else:
        raise AssertionError(f"calibration found too few tokens: {book.rates()}")
    a.reload_rates()  # `head audit calibrate` in another process: the loop reads them within a minute
    r.gw.trust.set_trusted("pc-honest", False)
    print(f"calibrated: {rates}")
    assert all(x.bad <= 0.02 * x.audits for x in rates), rates  # one CPU type: the top-1 nearly always


def drive(r: Region, n: int, seed: int, concurrency: int = 8, greedy: bool = False) -> list[int]:
    """`n` customer requests through the gateway; their HTTP statuses."""
    bodies = client_requests(n, seed)
    if greedy:
        bodies = [{**b, "temperature": 0.0, "top_p": 1.0} for b in bodies]

    def one(body: dict[str, Any]) -> int:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        resp = httpx.post(r.url + path, json={"model": TINY_MODEL, **body}, timeout=120,
                          headers={"authorization": f"Bearer {r.key}"})
        if resp.status_code != 200:
            print(f"HTTP {resp.status_code}: {resp.text[:300]}")
        return resp.status_code
    with cf.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, bodies))


def drained(r: Region, timeout: float = 120) -> None:
    """Wait until the audit loop has scored everything it kept (but the verifier's own answers,
    which wait for a second trusted PC)."""
    a = r.gw.auditor
    assert a is not None
    deadline = time.monotonic() + timeout
    def waiting() -> bool:
        trusted = r.gw.trust.trusted()
        return bool(a.recheck_pending) or any(trusted - {s.node_id} or s.node_id not in trusted
                                              for s in list(a.pending))
    while waiting():
        assert time.monotonic() < deadline, f"audits still waiting after {timeout} s: {a.status()}"
        time.sleep(0.5)


def states(r: Region) -> dict[str, str]:
    return {p: r.gw.trust.get(p).state for p in PCS}


def test_cheaters_quarantined_honest_pcs_not(region: Region) -> None:
    r = region
    t0 = time.monotonic()
    rounds = 0
    while rounds < MAX_ROUNDS and not all(states(r)[p] == "quarantined" for p in ALWAYS):
        statuses = drive(r, ROUND, seed=1000 + rounds)
        assert statuses.count(200) == len(statuses), statuses
        drained(r)
        rounds += 1
    st = states(r)
    served = {p: s.requests for p, s in r.shims.items()}
    print(f"after {rounds * ROUND} requests ({time.monotonic() - t0:.0f} s): {st}; served {served}; "
          f"why {[(p, r.gw.trust.get(p).why) for p in PCS if st[p] != 'ok']}")
    for p in ALWAYS:
        assert st[p] == "quarantined", (p, st, served)
        assert r.gw.trust.get(p).why.startswith("audits:")
    for p in HONEST:
        assert st[p] == "ok", (p, r.gw.trust.get(p).why)
    # The tenth-cheater did cheat; at this many requests it is rarely caught yet (bench/audit.py:
    # a few thousand requests at the real rates), so its state is printed, not asserted.
    assert r.shims["pc-tenth"].cheated > 0
    a = r.gw.auditor
    assert a is not None
    print(f"pc-tenth: {r.shims['pc-tenth'].cheated} of {r.shims['pc-tenth'].requests} answers from the other weights; "
          f"{st['pc-tenth']}, record {a.records.get('pc-tenth')}")

    # A quarantined PC gets no customer's request after, and the audits hold back exactly the
    # cheaters. Not "pc-honest served some of these 24": once in CI it served none (223 before
    # and after; in other runs it takes most). The likely cause, not proven (the INFO log was
    # not kept): one failed request on the loaded machine suspends a PC for the table's
    # SUSPEND_S (10 s), and the 24 then go to the other PCs, as they should.
    before = {p: r.shims[p].requests for p in ALWAYS}
    assert drive(r, 24, seed=99).count(200) == 24
    assert {p: r.shims[p].requests for p in ALWAYS} == before
    assert r.gw.trust.excluded() == frozenset(ALWAYS)


def wait_state(r: Region, pc: str, want: str, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while (got := r.gw.trust.get(pc).state) != want and time.monotonic() < deadline:
        time.sleep(0.5)
    return got


def test_release_rechecks_on_canaries(region: Region) -> None:
    """`head node release` (Trust.start_recheck): canaries pinned to the PC decide. An honest PC
    quarantined by hand serves again; a PC serving other weights stays quarantined."""
    r = region
    for p, why in (("pc-honest", "by hand, for the test"), ("pc-other", "by hand, for the test")):
        if r.gw.trust.get(p).state != "quarantined":
            r.gw.trust.quarantine(p, why)
    canaries = {p: r.shims[p].requests for p in ("pc-honest", "pc-other")}
    r.gw.trust.start_recheck("pc-honest")
    r.gw.trust.start_recheck("pc-other")
    assert wait_state(r, "pc-honest", "ok") == "ok", r.gw.trust.get("pc-honest")
    assert wait_state(r, "pc-other", "quarantined") == "quarantined"
    assert r.gw.trust.get("pc-other").why.startswith("re-check failed"), r.gw.trust.get("pc-other").why
    # Each got its canaries (pinned past the exclusion), and nothing else while re-checked.
    assert r.shims["pc-honest"].requests > canaries["pc-honest"]
    assert r.shims["pc-other"].requests > canaries["pc-other"]
    # Released, the honest PC takes customers again.
    before = r.shims["pc-honest"].requests
    assert drive(r, 24, seed=77).count(200) == 24
    assert r.shims["pc-honest"].requests > before
