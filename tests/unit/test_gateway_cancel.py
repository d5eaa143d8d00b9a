"""The gateway ends what it holds open when nobody will get the answer (issue #23): a client
that leaves, a PC the head has given up, a PC alive but silent. The gateway is served by a real
uvicorn with the head's guarded protocol (how a client's leaving reaches it matters), the
engines by stand-ins that hold their answers and note when the gateway hangs up on them; the
table's clock is a FakeClock, so a PC goes stale when a test says so."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import replace
from typing import Any, Callable

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from garage_node.core.wire import EngineReport, EngineState
from garage_node.head.config import GatewaySection
from garage_node.head.connguard import GuardLimits, guarded_loop_factory, guarded_protocol
from garage_node.head.gateway.app import create_gateway_app
from garage_node.head.gateway.gateway import Gateway
from testing.fakes import FakeClock, sample_report

MODEL = "tiny"
USAGE = {"prompt_tokens": 7, "completion_tokens": 50, "total_tokens": 57}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(app: Any, **kwargs: Any) -> tuple[uvicorn.Server, threading.Thread, int]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", **kwargs))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return server, thread, port


class HoldingEngine:
    """A vLLM stand-in that answers after `hold_s` (a stream: its first event at once when
    `first_at_once`, the rest after `hold_s`), noting whether the gateway hung up first."""

    def __init__(self, name: str, hold_s: float, first_at_once: bool = False) -> None:
        self.name, self.hold_s, self.first_at_once = name, hold_s, first_at_once
        self.calls = 0
        self.hung_up = threading.Event()  # the gateway closed the request before its end
        self.finished = threading.Event()
        app = FastAPI()

        @app.post("/v1/completions")
        async def complete(request: Request) -> Any:
            body = await request.json()
            self.calls += 1
            if not body.get("stream"):
                if await self._held(request):
                    return {"id": "c", "object": "text_completion", "model": MODEL, "usage": USAGE,
                            "choices": [{"index": 0, "text": f"from {self.name}", "finish_reason": "length"}]}
                return {}

            async def events():
                if self.first_at_once:
                    yield 'data: {"id":"c","choices":[{"index":0,"text":"a"}],"usage":null}\n\n'
                if await self._held(request):
                    yield 'data: {"id":"c","choices":[{"index":0,"text":"b"}],"usage":null}\n\n'
                    yield f"data: {json.dumps({'id': 'c', 'choices': [], 'usage': USAGE})}\n\n"
                    yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")

        self.server, self.thread, self.port = serve(app)

    async def _held(self, request: Request) -> bool:
        """True once held to the end; False when the gateway hung up first."""
        end = time.monotonic() + self.hold_s
        try:
            while time.monotonic() < end:
                await asyncio.sleep(0.05)
                if await request.is_disconnected():
                    self.hung_up.set()
                    return False
        except asyncio.CancelledError:  # a stream: Starlette cancels it when the client leaves
            self.hung_up.set()
            raise
        self.finished.set()
        return True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)


def engine_report(endpoint: str, running: int | None = None, waiting: int | None = None):
    return replace(sample_report(), engine=EngineReport(state=EngineState.HEALTHY, model=MODEL, endpoint=endpoint,
                                                        requests_running=running, requests_waiting=waiting))


class Region:
    """A gateway on uvicorn (as `head run` serves it) in front of the given engines."""

    def __init__(self, tmp_path: Any, engines: dict[str, HoldingEngine], **cfg: Any) -> None:
        self.clock = FakeClock()
        # A long first_byte_timeout_s and stream_idle_timeout_s: only the verdicts end a wait.
        section = GatewaySection(**{"first_byte_timeout_s": 600.0, "stream_idle_timeout_s": 600.0, **cfg})
        self.gw = Gateway(section, tmp_path, lambda: {n: f"{n}-pc" for n in engines}, clock=self.clock)
        self.engines = engines
        for n, e in engines.items():
            self.gw.on_report(n, engine_report(e.url))
        _, self.secret = self.gw.keys.create("tester", now=time.time())
        limits = GuardLimits(max_connections_per_client=64)
        # The listener `head run` builds: httptools and uvloop, the admission in the protocol.
        self.app = app = create_gateway_app(self.gw)
        self.server, self.thread, self.port = serve(app, http=guarded_protocol(limits, fast=True,
                                                                               shed=app.admission.protocol_hook()),
                                                    loop=guarded_loop_factory(limits, fast=True))

    def post(self, body: dict[str, Any], timeout_s: float) -> httpx.Response:
        return httpx.post(f"http://127.0.0.1:{self.port}/v1/completions", json={"model": MODEL, **body},
                          headers={"authorization": f"Bearer {self.secret}"}, timeout=timeout_s)

    def raw_post(self, body: dict[str, Any]) -> socket.socket:
        """A completion request sent on a plain socket, which the caller closes to leave (httpx
        would read the answer to its end first)."""
        data = json.dumps({"model": MODEL, **body}).encode()
        client = socket.create_connection(("127.0.0.1", self.port))
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                       b"Authorization: Bearer " + self.secret.encode() + b"\r\n"
                       b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
        return client

    def in_background(self, body: dict[str, Any], timeout_s: float) -> Callable[[], httpx.Response]:
        out: list[Any] = []

        def run() -> None:
            try:
                out.append(self.post(body, timeout_s))
            except Exception as e:  # handed to the test by result()
                out.append(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()

        def result() -> httpx.Response:
            t.join(timeout_s + 5)
            if isinstance(out[0], Exception):
                raise out[0]
            return out[0]
        return result

    def inflight(self) -> int:
        return sum(ep.inflight for ep in self.gw.table.snapshot())

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        for e in self.engines.values():
            e.stop()
        self.gw.stop()


def wait_for(check: Callable[[], bool], within_s: float) -> bool:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.02)
    return check()


@pytest.fixture
def regions(tmp_path):
    made: list[Region] = []

    def make(engines: dict[str, HoldingEngine], **cfg: Any) -> Region:
        made.append(Region(tmp_path / str(len(made)), engines, **cfg))
        return made[-1]

    yield make
    for r in made:
        r.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_before_its_answer_cancels_it_on_the_pc_and_is_billed_nothing(regions, stream):
    """Non-streamed, the engine's answer (headers included) comes in one piece at its end: the
    gateway used to wait for it, blind to the client, and bill all of it. A stream left before
    its first event (a long prompt's prefill) is the same wait."""
    region = regions({"n1": HoldingEngine("n1", hold_s=30)})
    engine = region.engines["n1"]
    with region.raw_post({"prompt": "a long question", "stream": stream}):
        assert wait_for(lambda: engine.calls == 1, 10)  # the PC has it; then the client leaves
    assert_ended_on_the_pc_and_billed(region, engine, completion_tokens=0)


def assert_ended_on_the_pc_and_billed(region: Region, engine: HoldingEngine, completion_tokens: int) -> None:
    """After its client left: the PC's request closed before its end, the PC's slot given back,
    and the ledger holding one request of `completion_tokens` (what reached the client)."""
    assert engine.hung_up.wait(10), "the gateway kept the request open on the PC after its client left"
    assert not engine.finished.is_set()
    assert wait_for(lambda: region.inflight() == 0, 5)
    region.gw.ledger.flush()
    rows = region.gw.ledger.usage("key")
    assert [(r.group, r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [
        ("tester", 1, 0, completion_tokens)]


def test_a_client_that_leaves_mid_stream_ends_it_on_the_pc_and_is_billed_what_it_got(regions):
    """The request's own listener goes on watching the client while its stream is relayed
    (Starlette's task group and listener are not used): the client reads the first event and
    leaves, the engine's request is closed at once, the PC's slot is given back, and the one
    event relayed is billed. A client leaving is no stream error."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    region = regions({"n1": HoldingEngine("n1", hold_s=30, first_at_once=True)})
    engine = region.engines["n1"]
    with region.raw_post({"prompt": "q", "stream": True}) as client:
        client.settimeout(10)
        got = b""
        while b"data: " not in got:
            got += client.recv(65536)
        time.sleep(0.3)  # past CLIENT_WATCH_AFTER_S: the listener is the request's, started before
    assert_ended_on_the_pc_and_billed(region, engine, completion_tokens=1)
    text = generate_latest(region.gw.metrics.registry).decode()
    errors = [s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "garage_gateway_stream_errors_total"]
    assert sum(errors) == 0


def test_streams_being_relayed_are_no_queue_to_the_admission_governor(regions):
    """The governor reads a queue building from what is in flight; a stream whose first event
    is relayed waits for nothing in the gateway. Counted, 400 streams arriving over a second
    read as a queue and were refused (bench/seed_scale.py --streams 400). A request still
    waiting for its answer does count."""
    region = regions({"n1": HoldingEngine("n1", hold_s=3, first_at_once=True)})
    admission = region.app.admission
    streams = [region.in_background({"prompt": "q", "stream": True}, timeout_s=20) for _ in range(3)]
    waiting = region.in_background({"prompt": "q"}, timeout_s=20)
    assert wait_for(lambda: admission.in_flight == 4 and admission.relaying == 3, 10)
    assert admission.governor.in_flight() == 1
    assert [s().status_code for s in streams] == [200, 200, 200] and waiting().status_code == 200
    assert wait_for(lambda: admission.in_flight == 0, 5)
    assert admission.relaying == 0 and admission.governor.in_flight() == 0


def test_a_watch_done_with_ends_nothing_and_its_listener_is_not_cancelled():
    """Cancelling the listener leaves its CancelledError, traceback and frames in a cycle for
    the collector: two per stream made a third of what a full collection walked at 300 streams.
    Done with, the listener ends by itself when the server answers http.disconnect."""
    from garage_node.head.gateway.proxy import _ClientWatch

    async def go() -> tuple[bool, bool, bool, bool]:
        answered = asyncio.Event()

        async def receive():
            await answered.wait()  # uvicorn: once the response is complete
            return {"type": "http.disconnect"}

        watch = _ClientWatch(receive, after_s=0.0)
        ended: list[str] = []
        watch.on_leave = lambda: ended.append("left")
        await asyncio.sleep(0.01)  # the listener is under way
        task = watch._task
        assert task is not None and not task.done()
        watch.stop()
        answered.set()
        await asyncio.sleep(0.01)
        return task.done(), task.cancelled(), bool(ended), watch.on_leave is None

    assert asyncio.run(go()) == (True, False, False, True)


def test_requests_on_a_pc_the_head_gives_up_go_elsewhere_or_end_at_once(regions):
    """n1 takes a non-streamed request and a stream that has begun, then stops heartbeating.
    Once the table calls it stale, the request without a first byte is answered by n2 and the
    stream ends with upstream_lost — not after first_byte_timeout_s / stream_idle_timeout_s."""
    region = regions({"n1": HoldingEngine("n1", hold_s=300, first_at_once=True)})
    waiting = region.in_background({"prompt": "q"}, timeout_s=20)
    streaming = region.in_background({"prompt": "q", "stream": True}, timeout_s=20)
    n1 = region.engines["n1"]
    assert wait_for(lambda: n1.calls == 2 and region.inflight() == 2, 10)
    n2 = region.engines["n2"] = HoldingEngine("n2", hold_s=0)
    region.clock.advance(region.gw.table.stale_after_s + 1)  # n1 silent past stale_after_s ...
    region.gw.on_report("n2", engine_report(n2.url))  # ... while n2 reports
    answer = waiting()
    assert answer.status_code == 200 and answer.headers["x-garage-node-id"] == "n2"
    assert answer.json()["choices"][0]["text"] == "from n2"
    stream = streaming()
    events = [line[6:] for line in stream.text.splitlines() if line.startswith("data: ")]
    assert stream.headers["x-garage-node-id"] == "n1"
    assert json.loads(events[-2])["error"]["code"] == "upstream_lost" and events[-1] == "[DONE]"
    assert n1.hung_up.wait(5) and wait_for(lambda: region.inflight() == 0, 5)


def test_a_pc_alive_but_silent_loses_a_request_its_engine_does_not_hold(regions):
    """n1 heartbeats, but its engine reports no request running or waiting long after ours
    was sent: ours is lost there, and n2 answers it (silent_first_byte_s after it was sent)."""
    region = regions({"n1": HoldingEngine("n1", hold_s=300)}, silent_first_byte_s=20.0)
    pending = region.in_background({"prompt": "q"}, timeout_s=20)
    n1 = region.engines["n1"]
    assert wait_for(lambda: n1.calls == 1, 10)
    n2 = region.engines["n2"] = HoldingEngine("n2", hold_s=0)
    region.gw.on_report("n2", engine_report(n2.url))
    def ten_seconds_on() -> None:
        region.clock.advance(10)
        region.gw.on_report("n2", engine_report(n2.url))
        region.gw.on_report("n1", engine_report(n1.url, running=0, waiting=0))

    ten_seconds_on()
    time.sleep(1.0)  # four sweeps: a report sent 10 s after the request is too soon to tell
    assert not n1.hung_up.is_set()
    ten_seconds_on()
    answer = pending()
    assert answer.status_code == 200 and answer.headers["x-garage-node-id"] == "n2"
    assert n1.hung_up.wait(5)


def test_a_long_prompt_keeps_its_pc_while_the_engine_reports_it_running(regions):
    """The same wait past silent_first_byte_s, but n1's engine reports a request running (a
    long prefill, on CPU): the request stays on n1 and is answered there."""
    region = regions({"n1": HoldingEngine("n1", hold_s=2.5)}, silent_first_byte_s=20.0)
    pending = region.in_background({"prompt": "a very long prompt"}, timeout_s=20)
    n1 = region.engines["n1"]
    assert wait_for(lambda: n1.calls == 1, 10)
    n2 = HoldingEngine("n2", hold_s=0)
    region.engines["n2"] = n2
    region.gw.on_report("n2", engine_report(n2.url))
    region.clock.advance(25)
    region.gw.on_report("n1", engine_report(n1.url, running=1, waiting=0))
    region.gw.on_report("n2", engine_report(n2.url))
    answer = pending()
    assert answer.status_code == 200 and answer.headers["x-garage-node-id"] == "n1"
    assert n2.calls == 0 and not n1.hung_up.is_set()


def test_a_client_that_leaves_while_sending_its_body_is_counted_not_a_traceback(tmp_path):
    """Starlette raises ClientDisconnect from the body read; unhandled it reached uvicorn as
    'Exception in ASGI application' with a traceback (seen under bench/gateway_load.py)."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    gw = Gateway(GatewaySection(), tmp_path, lambda: {})
    _, secret = gw.keys.create("tester", now=time.time())
    app = create_gateway_app(gw)
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "server": ("127.0.0.1", 8080), "client": ("127.0.0.1", 5000),
             "headers": [(b"authorization", f"Bearer {secret}".encode()), (b"content-type", b"application/json"),
                         (b"content-length", b"100")]}
    incoming = [{"type": "http.request", "body": b'{"model": "ti', "more_body": True}, {"type": "http.disconnect"}]
    sent: list[dict] = []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))  # raised ClientDisconnect before
    assert sent[0]["status"] == 499
    text = generate_latest(gw.metrics.registry).decode()
    counted = {s.labels["status"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "garage_gateway_requests_total"}
    assert counted == {"499": 1.0}
    gw.stop()


def test_a_stream_relaying_a_burst_still_sees_its_client_leave(tmp_path):
    """Events already read from the PC (httpx reads many at once when the gateway lags) were
    relayed without the event loop running between them: the client's leaving went unnoticed
    for a whole burst (1-4 s behind the real engine on a busy machine). ASGI 2.3, as uvicorn:
    the leaving arrives as http.disconnect, which the request's listener can only see when the
    loop runs."""
    from garage_node.head.gateway.app import _call
    from garage_node.head.gateway.proxy import RelayResponse

    burst = 20_000
    app = FastAPI()

    @app.post("/v1/completions")
    async def complete(request: Request) -> StreamingResponse:
        await request.json()
        chunk = '{"id":"c","choices":[{"index":0,"text":"x"}],"usage":null}'
        one_write = "".join(f"data: {chunk}\n\n" for _ in range(burst)) + "data: [DONE]\n\n"

        async def events():
            yield one_write
        return StreamingResponse(events(), media_type="text/event-stream")

    server, thread, port = serve(app)
    gw = Gateway(GatewaySection(), tmp_path, lambda: {})
    gw.on_report("n1", engine_report(f"http://127.0.0.1:{port}"))
    gw.keys.create("tester", now=time.time())

    async def go() -> int:
        call = _call("/v1/completions", {"model": MODEL, "prompt": "x", "stream": True},
                     gw.keys.get("tester"), time.monotonic(), gw.router)
        response = await gw.proxy.forward(call, None)
        assert isinstance(response, RelayResponse)
        gone = asyncio.Event()
        after = 0

        async def send(message):
            nonlocal after
            if gone.is_set():
                after += 1
            elif message.get("body"):
                gone.set()  # the client reads the first event and leaves

        async def receive():
            await gone.wait()
            return {"type": "http.disconnect"}

        await response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
        await gw.proxy.close()
        return after

    try:
        relayed_after = asyncio.run(go())
    finally:
        server.should_exit = True
        thread.join(5)
        gw.stop()
    assert relayed_after < 100, f"{relayed_after} events relayed to a client that had left"
