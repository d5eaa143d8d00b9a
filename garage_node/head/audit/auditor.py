"""The audit loop: the gateway's tap (which requests are audited, their answers kept), the
bounded queue of samples, the verifier's work, the sequential test per PC, quarantine,
canaries and release re-checks.

Threads: the request path (the gateway's event loop) only draws and appends to a deque. The
loop runs on a thread of its own with its own event loop and HTTP client, at a lower OS
priority, one verifier request at a time, and uses a trusted PC's engine only while that PC
has nothing waiting (its work is counted in the table, so the router sends customers
elsewhere meanwhile). Canaries go through the gateway's own proxy, on the gateway's loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import httpx

from garage_node.core.clock import SYSTEM, Clock
from garage_node.head.audit import canaries, sprt
from garage_node.head.audit.book import Book
from garage_node.head.audit.sampling import CanaryBudget, Rates, Sampler, eligible
from garage_node.head.audit.trust import Trust
from garage_node.head.audit.verifier import Engine, Sample, VerifierError
from garage_node.head.gateway.app import _call as customer_call
from garage_node.head.gateway.proxy import Call, Proxy, RelayResponse
from garage_node.head.gateway.router import Router
from garage_node.head.gateway.store import Store
from garage_node.head.gateway.table import Endpoint, EndpointTable

log = logging.getLogger(__name__)

POLL_S = 0.5
PERSIST_S = 10.0  # request counts and the state `head audit status` shows
RATES_S = 60.0
VERIFIER_MODELS_S = 60.0
PRUNE_S = 3600.0
# A trusted PC verifies only while it has nothing waiting and at most this many open requests;
# a sample that has waited VERIFIER_PATIENCE_S takes it with any number open, as long as nothing
# waits (vLLM batches the prefill with what runs: customers' requests are not queued behind it).
VERIFIER_MAX_INFLIGHT = 2
VERIFIER_PATIENCE_S = 120.0
RECHECK_CANARIES = 8
CANARY_TIMEOUT_S = 300.0
MAX_PER_PASS = 16  # samples tried per pass (then the loop looks at canaries and re-checks again)
# A re-check's PC that answers none of its canaries for this long is quarantined again; between
# two unanswered canaries the loop waits RECHECK_RETRY_S (an engine restarting is not a verdict).
RECHECK_GIVE_UP_S = 600.0
RECHECK_RETRY_S = 10.0
NICE = 10  # the loop's thread, below the gateway's


@dataclass
class Recheck:
    """A release re-check under way: canaries pinned to the PC, scored on their own."""

    model: str
    sent: int = 0
    failing_since: float | None = None  # monotonic: the first of the unanswered canaries in a row
    retry_at: float = 0.0
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(sprt.TESTS, 0.0))
    scored: int = 0


@dataclass
class Counters:
    kept: int = 0
    dropped: int = 0  # past max_pending, oldest first
    scored: int = 0
    errors: int = 0
    canaries: int = 0
    canary_failures: int = 0
    quarantined: int = 0
    released: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


class Auditor:
    def __init__(self, cfg: Any, store: Store, trust: Trust, table: EndpointTable, router: Router,
                 engine_key: Callable[[str], str], proxy: Proxy, clock: Clock = SYSTEM,
                 rng: random.Random | None = None) -> None:
        """`cfg`: the head's [audit] section."""
        self.cfg, self.trust, self.table, self.router, self.engine_key = cfg, trust, table, router, engine_key
        self.proxy, self.clock = proxy, clock
        self.book = Book(store)
        self.rng = rng or random.Random()
        self.sampler = Sampler(Rates.of(cfg), self.rng.random)
        self.budget = CanaryBudget(cfg.canary_rate)
        self.thresholds = sprt.Thresholds.of(cfg.false_quarantine)
        self.pool = canaries.load(cfg.canary_prompts)
        self.pending: collections.deque[Sample] = collections.deque()
        self.recheck_pending: collections.deque[Sample] = collections.deque()
        self.counters = Counters()
        self.records: dict[str, sprt.Record] = {}
        self.rechecks: dict[str, Recheck] = {}
        self.rates: dict[tuple[str, str], float] = {}
        # Per model: the verifier in use, or why there is none ("" before the first sample).
        self.verifiers: dict[str, str] = {}
        self.last_error = ""
        self._persisted_state = ""
        self.gateway_loop: asyncio.AbstractEventLoop | None = None
        self._engines: dict[str, Engine] = {}
        self._url_models: list[str] = []
        self._url_models_at = float("-inf")
        self._no_chat: set[str] = set()  # models whose canaries fell back to text completions
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: dict[str, float] = {}

    # -- the request path (the gateway's loop): cheap

    def take(self, call: Call, node_id: str) -> bool:
        if call.kind != "customer":
            return True
        self.budget.requested(call.model)
        return self.sampler.take(node_id) and call.request is not None and eligible(call.path, call.request)

    def keep(self, call: Call, ep: Endpoint, text: str, finish_reason: str | None,
             completion_tokens: int | None) -> None:
        if call.request is None:
            return
        report = ep.report
        sample = Sample(at=self.clock.time(), node_id=ep.node_id, model=call.model, path=call.path,
                        request=call.request, text=text, finish_reason=finish_reason,
                        completion_tokens=completion_tokens, kind=call.kind,
                        engine=report.versions.agent if report is not None else "",
                        precision=(report.placement.device if report is not None and report.placement else "gpu"))
        queue = self.recheck_pending if call.kind == "recheck" else self.pending
        if call.kind != "recheck" and len(queue) >= self.cfg.max_pending:
            queue.popleft()
            self.counters.dropped += 1
        queue.append(sample)  # deque.append: safe across threads
        self.counters.kept += 1

    # -- lifecycle

    def start(self) -> None:
        if self._thread is not None:
            return
        self.records = self.book.records()
        self.sampler.seed(self.book.requests())
        self._mark_suspects()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="garage-audit", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        try:
            self._persist()
        except Exception:  # the database is gone with the head: nothing to keep
            log.exception("audit: could not keep the request counts")

    def _run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)  # this thread only (Linux)
        except OSError:
            pass
        asyncio.run(self._main())

    async def _main(self) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=5.0)) as http:
            while not self._stop.is_set():
                try:
                    await self.step(http)
                except Exception:
                    log.exception("audit: a pass failed")
                await asyncio.sleep(POLL_S)

    # -- one pass (tests call it)

    async def step(self, http: httpx.AsyncClient) -> None:
        now = self.clock.monotonic()
        if self._due("persist", PERSIST_S, now) or self.verifier_state != self._persisted_state:
            self._persist()
        if self._due("rates", RATES_S, now):
            self.reload_rates()
        if self._due("prune", PRUNE_S, now):
            self.book.prune(self.clock.time() - self.cfg.keep_days * 86400)
        await self._rechecks()
        for model in self.budget.due():
            await self._canary(model, kind="canary")
        for queue in (self.recheck_pending, self.pending):
            # Each waiting sample tried once a pass; one without a free verifier waits its turn
            # again (behind the others: one PC's samples never block another's).
            for _ in range(min(len(queue), MAX_PER_PASS)):
                if self._stop.is_set():
                    return
                await self._score_one(http, queue)

    def _due(self, what: str, every_s: float, now: float) -> bool:
        if now - self._last.get(what, float("-inf")) >= every_s:
            self._last[what] = now
            return True
        return False

    def _persist(self) -> None:
        self._persisted_state = self.verifier_state
        self.book.add_requests(dict(self.sampler.seen), self.clock.time())
        c = self.counters
        self.book.set_state({"verifier": self.verifier_state, "last_error": self.last_error,
                             "pending": len(self.pending),
                             "kept": c.kept, "dropped": c.dropped, "scored": c.scored, "errors": c.errors,
                             "canaries": c.canaries, "rechecks": {n: {"sent": r.sent, "scored": r.scored}
                                                                  for n, r in self.rechecks.items()}},
                            self.clock.time())

    # -- scoring

    async def _score_one(self, http: httpx.AsyncClient, queue: collections.deque[Sample]) -> None:
        """Score the next sample, or put it at the back when no verifier is free for it."""
        try:
            sample = queue.popleft()
        except IndexError:
            return
        patient = self.clock.time() - sample.at >= VERIFIER_PATIENCE_S
        picked = await self._verifier_for(http, sample.model, sample.node_id, patient)
        if picked is None:
            queue.append(sample)
            return
        engine, ep = picked
        if ep is not None:
            self.table.begin(ep)  # the router sees the verifier's work
        try:
            s = await engine.check(http, sample)
        except VerifierError as e:
            self.counters.errors += 1
            self.last_error = str(e)
            log.warning("audit: a sample of PC %s could not be scored: %s", sample.node_id, e)
            r = self.rechecks.get(sample.node_id) if sample.kind == "recheck" else None
            if r is not None:
                r.sent -= 1  # another canary instead
            return
        finally:
            if ep is not None:
                self.table.end(ep)
        self.counters.scored += 1
        self.counters.by_kind[sample.kind] = self.counters.by_kind.get(sample.kind, 0) + 1
        self._weigh(sample, s, engine.name)

    def reload_rates(self) -> None:
        """The honest rates calibrated (`head audit calibrate`), read again now (else every RATES_S)."""
        self.rates = {k: r.eps0 for k, r in self.book.rates().items()}

    def hypotheses(self, model: str, precision: str) -> sprt.Hypotheses:
        return sprt.Hypotheses.of(self.rates.get((model, precision)))

    def _weigh(self, sample: Sample, s: Any, verifier: str) -> None:
        h = self.hypotheses(sample.model, sample.precision)
        node = sample.node_id
        if sample.kind == "recheck":
            llr = sprt.audit_llr(s, h, self.thresholds.cap)
            self.book.record(sample.at, self.clock.time(), node, sample.model, sample.precision, sample.kind, s, llr,
                             verifier, sample.engine, None)
            r = self.rechecks.get(node)
            if r is not None:
                r.scored += 1
                for k in sprt.TESTS:
                    r.sums[k] += llr[k]
                self._recheck_decide(node, r)
            return
        step = sprt.weigh(self.records.get(node, sprt.Record()), s, h, self.thresholds)
        self.records[node] = step.record
        self._mark_suspects()
        self.book.record(sample.at, self.clock.time(), node, sample.model, sample.precision, sample.kind, s,
                         step.llr, verifier, sample.engine, step.record)
        if step.quarantine is not None and self.trust.get(node).state == "ok":
            why = sprt.why(step.quarantine, step.record)
            self.trust.quarantine(node, why)
            self.counters.quarantined += 1
            log.warning("audit: PC %s quarantined: %s", node, why)

    def _mark_suspects(self) -> None:
        """The PCs the sampler audits at suspect_rate: those whose record leans towards cheating."""
        self.sampler.suspects = frozenset(n for n, r in self.records.items() if r.suspect)

    # -- verifiers

    async def _verifier_for(self, http: httpx.AsyncClient, model: str, audited: str,
                            patient: bool = False) -> tuple[Engine, Endpoint | None] | None:
        """A free verifier serving `model` (never the audited PC itself), and its endpoint if a PC."""
        trusted = self.trust.trusted()
        busy = itself = False
        candidates = []
        with self.table.lock:
            now = self.table.clock.monotonic()
            for ep in self.table.pool(model):
                if ep.node_id in trusted and self.table.live(ep, now):
                    if ep.node_id == audited:
                        itself = True  # never its own verifier
                    else:
                        candidates.append(ep)
        for ep in sorted(candidates, key=lambda e: e.inflight):
            if ep.requests_waiting == 0 and (patient or ep.inflight <= VERIFIER_MAX_INFLIGHT):
                engine = self._engines.setdefault(ep.node_id, Engine(ep.node_id, ep.url, ""))
                engine.url, engine.key = ep.url, self.engine_key(ep.node_id)
                self.verifiers[model] = f"verifying with trusted PC {ep.node_id}"
                return engine, ep
            busy = True
        url_engine = await self._url_engine(http, model)
        if url_engine is not None:
            self.verifiers[model] = "verifying with [audit] verifier_url"
            return url_engine, None
        if busy:
            self.verifiers[model] = "waiting: the trusted PCs serving it are busy with customers"
        elif itself and self.verifiers.get(model, "").startswith("verifying"):
            pass  # a trusted PC's own answers wait for a second verifier; the others are verified
        else:
            self.verifiers[model] = ("no verifier: no " + ("other " if itself else "") + "PC marked trusted serves it "
                                     "(`garage-node head node trust NODE`) and [audit] verifier_url " +
                                     ("does not serve it" if self.cfg.verifier_url else "is not set") +
                                     "; samples are kept, not scored")
        return None

    async def _url_engine(self, http: httpx.AsyncClient, model: str) -> Engine | None:
        url = self.cfg.verifier_url.rstrip("/")
        if not url:
            return None
        if url.endswith("/v1"):
            url = url[:-3]
        engine = self._engines.get("verifier_url")
        if engine is None or engine.url != url:
            key = ""
            if self.cfg.verifier_key_file:
                try:
                    key = _read_key(self.cfg.verifier_key_file)
                except OSError as e:
                    self.last_error = f"[audit] verifier_key_file cannot be read ({e.strerror})"
                    return None
            engine = self._engines["verifier_url"] = Engine("verifier_url", url, key)
            self._url_models_at = float("-inf")
        now = self.clock.monotonic()
        if now - self._url_models_at >= VERIFIER_MODELS_S:
            self._url_models_at = now
            try:
                self._url_models = await engine.models(http)
            except VerifierError as e:
                self._url_models = []
                log.warning("audit: %s", e)
        return engine if model in self._url_models else None

    # -- canaries and re-checks

    async def _canary(self, model: str, kind: str, pin: str | None = None) -> bool:
        """One canary through the gateway's proxy; whether the PC answered it (200)."""
        loop = self.gateway_loop
        if loop is None or loop.is_closed():
            return False
        c = canaries.make(self.pool, model, self.rng, greedy=kind == "recheck", chat=model not in self._no_chat)
        call = _canary_call(c, self.router, kind, pin, self.clock.monotonic())
        self.counters.canaries += 1
        fut = asyncio.run_coroutine_threadsafe(_answered(self.proxy, call), loop)
        try:
            # Bounded: a gateway loop that stopped meanwhile never runs it.
            resp = await asyncio.wait_for(asyncio.wrap_future(fut), CANARY_TIMEOUT_S)
        except Exception as e:  # GatewayError (no PC), a timeout, or the loop went away
            fut.cancel()
            self.counters.canary_failures += 1
            log.info("audit: a canary for %s got no answer (%s)", model, e)
            return False
        if resp.status_code == 400 and c.path == "/v1/chat/completions":
            self._no_chat.add(model)  # no chat template: text completions from now on
        if resp.status_code != 200:
            self.counters.canary_failures += 1
        return resp.status_code == 200

    async def _rechecks(self) -> None:
        if self.gateway_loop is None or self.gateway_loop.is_closed():
            return  # the gateway's listener is not up (yet): nothing can be sent, nothing failed
        snapshot = self.trust.snapshot()
        for node, t in snapshot.items():
            if t.state != "rechecking":
                continue
            r = self.rechecks.get(node)
            if r is None:
                with self.table.lock:
                    ep = self.table.get(node)
                    model = ep.model if ep is not None else None
                if model is None:  # its engine is not reported (yet): nothing to send it
                    continue
                r = self.rechecks[node] = Recheck(model=model)
                log.info("audit: re-checking PC %s with %d canaries", node, RECHECK_CANARIES)
            now = self.clock.monotonic()
            if r.sent < RECHECK_CANARIES and now >= r.retry_at:
                if await self._canary(r.model, kind="recheck", pin=node):
                    r.sent += 1
                    r.failing_since = None
                    continue
                r.failing_since = now if r.failing_since is None else r.failing_since
                r.retry_at = now + RECHECK_RETRY_S
                if now - r.failing_since >= RECHECK_GIVE_UP_S:
                    self.trust.quarantine(node, "its re-check failed: it answered none of the test requests for "
                                                f"{RECHECK_GIVE_UP_S / 60:.0f} minutes")
                    del self.rechecks[node]
        for node in [n for n in self.rechecks if snapshot.get(n) is None or snapshot[n].state != "rechecking"]:
            del self.rechecks[node]  # released or quarantined by the operator meanwhile

    def _recheck_decide(self, node: str, r: Recheck) -> None:
        if r.scored < RECHECK_CANARIES:
            return
        del self.rechecks[node]
        rec = sprt.Record(audits=r.scored, sums=r.sums)
        worst, evidence = rec.worst
        if evidence >= self.thresholds.cap:
            why = sprt.why(worst, rec).replace("audits:", "re-check failed:", 1)
            self.trust.quarantine(node, why)
            log.warning("audit: PC %s stays quarantined: %s", node, why)
            return
        self.trust.release(node)
        self.book.reset(node, self.clock.time())
        self.records[node] = sprt.Record()
        self.counters.released += 1
        log.info("audit: PC %s passed its re-check (%d canaries) and serves again", node, r.scored)

    # -- what `head audit status` and the metrics read

    @property
    def verifier_state(self) -> str:
        """Per model, the verifier in use or why there is none."""
        if not self.verifiers:
            return "no sample to verify yet"
        return "; ".join(f"{m}: {v}" for m, v in sorted(self.verifiers.items()))

    @property
    def verifier_up(self) -> bool:
        return any(v.startswith("verifying") for v in self.verifiers.values())

    def status(self) -> dict[str, Any]:
        c = self.counters
        return {"verifier": self.verifier_state, "pending": len(self.pending), "kept": c.kept, "dropped": c.dropped,
                "scored": c.scored, "errors": c.errors, "canaries": c.canaries, "quarantined": c.quarantined,
                "released": c.released}


def _read_key(path: str) -> str:
    """The verifier's API key (a small 0600 file, read once: this loop's own thread)."""
    return Path(path).read_text().strip()


def _canary_call(c: canaries.Canary, router: Router, kind: str, pin: str | None, started: float) -> Call:
    """The call a customer sending this body would make (app.py's own: a stream gets the
    usage option the gateway adds to every stream)."""
    return replace(customer_call(c.path, c.body, canaries.KEY, started, router), kind=kind, pin=pin)


# A stream's response is run to its end as uvicorn would run it (ASGI 2.4: no disconnect
# listener), its bytes dropped: the relay, its capture and its usage run as for a customer.
_SCOPE = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}}


async def _answered(proxy: Proxy, call: Call) -> Any:
    """A canary through the proxy, on the gateway's loop; its response, consumed."""
    resp = await proxy.forward(call, None)
    if isinstance(resp, RelayResponse):
        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()  # never: nobody leaves
            return {"type": "http.disconnect"}

        async def send(_: Any) -> None:
            pass

        await resp(_SCOPE, receive, send)
    return resp
