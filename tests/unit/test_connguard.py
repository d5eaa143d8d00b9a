"""The connection guard on a real uvicorn server (loopback, HTTPS as `head run` serves it):
half-sent requests are cut off after the request deadline, one address cannot hold more than
its share of connections, an unfinished TLS handshake is dropped, and a client from another
address is served throughout. The testbed (tests/integration/test_head_hardening.py) proves
the same against the real head with nodes heartbeating."""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
import threading
import time
import weakref

import httpx
import pytest
import uvicorn

from garage_node.head import pki
from garage_node.head.api.limits import BodyLimit
from garage_node.head.connguard import GuardLimits, guarded_loop_factory, guarded_protocol

LIMITS = GuardLimits(request_timeout_s=2.0, max_connections_per_client=4, tls_handshake_timeout_s=1.0)
ATTACKER, VISITOR = "127.0.0.2", "127.0.0.3"  # all of 127/8 is loopback: two distinct client addresses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Marker:
    pass


MARKERS: list[weakref.ReferenceType] = []  # one per request the server's app saw


# Every guard on both listeners: the control API's (asyncio, h11) and the gateway's (uvloop,
# httptools).
@pytest.fixture(scope="module", params=[False, True], ids=["asyncio-h11", "uvloop-httptools"])
def server(tmp_path_factory, request):
    fast = request.param
    calls: list[bytes] = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        scope["marker"] = marker = Marker()  # dies with the request's scope
        MARKERS.append(weakref.ref(marker))
        body = b""
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        calls.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    paths = pki.PkiPaths(tmp_path_factory.mktemp("pki"))
    pki.create_ca(paths, "test")
    pki.issue_server_cert(paths, "127.0.0.1")
    port = free_port()
    config = uvicorn.Config(BodyLimit(app, 1024), host="127.0.0.1", port=port, log_level="warning",
                            ssl_certfile=str(paths.server_cert), ssl_keyfile=str(paths.server_key),
                            http=guarded_protocol(LIMITS, fast=fast), loop=guarded_loop_factory(LIMITS, fast=fast),
                            lifespan="off")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    ctx = ssl.create_default_context(cafile=str(paths.ca_cert))
    yield port, ctx, calls
    srv.should_exit = True
    thread.join(timeout=10)


def tls_connect(port: int, ctx: ssl.SSLContext, source: str) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed `sock` (None: still open after `seconds`)."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return time.monotonic() - start
    except TimeoutError:
        return None
    except (ConnectionError, ssl.SSLError, OSError):
        return time.monotonic() - start


def at_eof(sock: ssl.SSLSocket) -> bool:
    """Whether the server has closed `sock` (without waiting)."""
    sock.setblocking(False)
    try:
        return sock.recv(4096) == b""
    except (ssl.SSLWantReadError, BlockingIOError):
        return False
    except (ConnectionError, ssl.SSLError, OSError):
        return True
    finally:
        sock.setblocking(True)


def visitor_get(port: int, ctx: ssl.SSLContext) -> int:
    transport = httpx.HTTPTransport(verify=ctx, local_address=VISITOR)
    with httpx.Client(transport=transport, timeout=5) as c:
        return c.post(f"https://127.0.0.1:{port}/", content=b"hello").status_code


def test_half_sent_headers_are_cut_off_after_the_deadline(server):
    port, ctx, _ = server
    s = tls_connect(port, ctx, ATTACKER)
    s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Le")
    took = closed_within(s, 5)
    assert took is not None and took < LIMITS.request_timeout_s + 1.5
    s.close()


def test_half_sent_body_is_cut_off_and_never_reaches_the_app(server):
    port, ctx, calls = server
    before = len(calls)
    s = tls_connect(port, ctx, ATTACKER)
    s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"a" * 10)
    took = closed_within(s, 5)
    assert took is not None and took < LIMITS.request_timeout_s + 1.5
    assert len(calls) == before
    s.close()


def test_a_silent_connection_is_cut_off_too(server):
    port, ctx, _ = server
    s = tls_connect(port, ctx, ATTACKER)
    took = closed_within(s, 5)
    assert took is not None and took < LIMITS.request_timeout_s + 1.5
    s.close()


def test_one_address_holds_at_most_its_share_and_others_are_served(server):
    port, ctx, _ = server
    socks = []
    for _ in range(20):
        s = tls_connect(port, ctx, ATTACKER)
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n")  # half a request each
        socks.append(s)
    # Over the cap: closed at once, long before the request deadline.
    time.sleep(0.3)
    still_open = [s for s in socks if not at_eof(s)]
    assert len(still_open) == LIMITS.max_connections_per_client
    assert visitor_get(port, ctx) == 200  # another address is served meanwhile
    for s in still_open:
        assert closed_within(s, 5) is not None  # the deadline ends the rest
    for s in socks:
        s.close()
    time.sleep(0.2)
    fresh = tls_connect(port, ctx, ATTACKER)  # slots are given back
    fresh.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    fresh.settimeout(5)
    assert fresh.recv(4096).startswith(b"HTTP/1.1 200")
    fresh.close()


def test_keep_alive_requests_are_not_cut_off(server):
    port, ctx, _ = server
    transport = httpx.HTTPTransport(verify=ctx, local_address=VISITOR)
    with httpx.Client(transport=transport, timeout=5) as c:
        for _ in range(3):  # idle between requests under keep-alive, longer than... nothing: each is whole
            assert c.post(f"https://127.0.0.1:{port}/", content=b"x").status_code == 200
            time.sleep(0.5)


def test_a_kept_alive_connection_holds_nothing_of_its_finished_request(server):
    port, ctx, _ = server
    transport = httpx.HTTPTransport(verify=ctx, local_address=VISITOR)
    with httpx.Client(transport=transport, timeout=5) as c:
        assert c.post(f"https://127.0.0.1:{port}/", content=b"x").status_code == 200
        request = MARKERS[-1]
        time.sleep(0.3)  # the server's side of the response ends after the client has it
        gc.collect()
        assert request() is None, "the idle connection still holds its last request's scope"
        assert c.post(f"https://127.0.0.1:{port}/", content=b"y").status_code == 200  # and serves the next
        assert len(c._transport._pool.connections) == 1  # on the same connection


def test_an_unfinished_tls_handshake_is_dropped(server):
    port, _, _ = server
    raw = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(ATTACKER, 0))
    raw.sendall(b"\x16\x03\x01\x00\xff")  # the start of a ClientHello, and no more
    took = closed_within(raw, 5)
    assert took is not None and took < LIMITS.tls_handshake_timeout_s + 1.5
    raw.close()


def test_a_body_over_the_cap_is_413(server):
    port, ctx, _ = server
    transport = httpx.HTTPTransport(verify=ctx, local_address=VISITOR)
    with httpx.Client(transport=transport, timeout=5) as c:
        assert c.post(f"https://127.0.0.1:{port}/", content=b"x" * 2048).status_code == 413


def test_an_answer_sent_before_its_body_is_in_keeps_the_connection_sound(server):
    """The app answers (413) while the body is still coming; the rest of the body arrives
    after the answer is complete. It is dropped, and nothing more is written: no second
    answer (a request let go of too early made the parser fail on that body and add a 400)."""
    port, ctx, _ = server
    s = tls_connect(port, ctx, VISITOR)
    s.settimeout(5)
    s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n\r\n" + b"x" * 100)
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
        answer += s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413")
    s.sendall(b"x" * 3996)  # the rest of the body, after the answer
    time.sleep(0.5)
    s.settimeout(1)
    after = b""
    try:
        while chunk := s.recv(4096):
            after += chunk
    except (TimeoutError, ssl.SSLError, OSError):
        pass
    assert after == b"", after[:200]
    s.close()


def test_the_fast_listener_accepts_a_queue_of_connections_in_a_few_turns_of_its_loop():
    """uvloop's own server accepts one connection per turn of the loop (libuv's choice); under
    load that left hundreds waiting un-accepted for seconds. The fast listener takes a batch."""
    loop = guarded_loop_factory(LIMITS, fast=True)()
    made: list[asyncio.Transport] = []

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            made.append(transport)
            self.transport = transport

        def data_received(self, data):
            self.transport.write(data)

    clients: list[socket.socket] = []
    try:
        server = loop.run_until_complete(loop.create_server(Echo, "127.0.0.1", 0, backlog=512))
        port = server.sockets[0].getsockname()[1]
        for _ in range(200):  # all in the listen queue before the loop turns once
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        for _ in range(3):
            loop.run_until_complete(asyncio.sleep(0))
        assert len(made) >= 128, f"{len(made)} connections set up in 3 turns of the loop"
        loop.run_until_complete(asyncio.sleep(0.2))
        assert len(made) == 200
        clients[-1].sendall(b"ping")
        loop.run_until_complete(asyncio.sleep(0.2))
        assert clients[-1].recv(16) == b"ping"
        server.close()
        loop.run_until_complete(server.wait_closed())
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
    finally:
        for c in clients:
            c.close()
        for t in made:
            t.close()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
