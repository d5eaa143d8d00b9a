"""The head's HTTPS server against clients that hold connections open: a deadline for every
request, a cap on connections per client address, and a deadline for the TLS handshake.

Why this is needed: uvicorn limits how long a connection may sit idle *between* requests
(keep-alive), but not how long a client may take to *send* one. A client that sends half a
request keeps its connection, and a file descriptor, for as long as it likes; 1,100 of them
from one address starved every real node and filled the log with "Too many open files"
(issue #9). The same holds for a TLS handshake that is started and never finished.

How, and why this way:
- The request deadline lives in uvicorn's own HTTP protocol class (h11), subclassed: it is
  the one place that sees both the bytes arriving and, through h11's public connection state,
  whether a whole request (headers and body) is in. A request must be complete within
  `request_timeout_s` of its first byte (of the connection's start, for the first request);
  otherwise the connection is closed. The application therefore never waits on a slow body.
  Time the application spends answering is not limited here.
- The per-address cap is counted in the same class, where the peer address is known: a
  connection over the cap is aborted at once, before HTTP, so one address cannot hold more
  than `max_connections_per_client` of the server's file descriptors, whatever it sends.
  Nodes keep one connection each, so a few PCs behind one home router stay far below it.
- The TLS handshake happens before any protocol class sees the connection; asyncio bounds it
  with `ssl_handshake_timeout` (60 s by default), which uvicorn does not expose. An event loop
  whose `create_server` sets it is the smallest way to pass it in (uvicorn accepts a loop
  factory). A handshake in progress is not counted per address (the address is not known to
  any hook before the handshake ends); the short deadline and LimitNOFILE in
  garage-head.service bound what such clients can hold.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

REFUSAL_LOG_EVERY_S = 60.0  # a client over its cap is logged once a minute, not per connection


@dataclass(frozen=True)
class GuardLimits:
    request_timeout_s: float = 10.0
    max_connections_per_client: int = 32
    tls_handshake_timeout_s: float = 10.0


class ClientSlots:
    """Open connections per client address (one event loop: no locking needed)."""

    def __init__(self, per_client: int) -> None:
        self.per_client = per_client
        self.open: dict[str, int] = {}
        self._logged: dict[str, float] = {}

    def take(self, address: str) -> bool:
        held = self.open.get(address, 0)
        if held >= self.per_client:
            self._log_refusal(address)
            return False
        self.open[address] = held + 1
        return True

    def give(self, address: str) -> None:
        held = self.open.get(address, 0) - 1
        if held > 0:
            self.open[address] = held
        else:
            self.open.pop(address, None)

    def _log_refusal(self, address: str) -> None:
        now = time.monotonic()
        if now - self._logged.get(address, -REFUSAL_LOG_EVERY_S) >= REFUSAL_LOG_EVERY_S:
            if len(self._logged) > 4096:  # many addresses: forget old entries rather than grow
                self._logged.clear()
            self._logged[address] = now
            log.warning("client %s holds %d connections, the most one address may: further ones are closed "
                        "(logged once a minute)", address, self.per_client)


class _Guard:
    """The request deadline and the per-address cap, for either of uvicorn's HTTP protocols
    (mixed in before it). Each protocol tells when a request begins and when it is all in."""

    _address: str | None = None
    _deadline: asyncio.TimerHandle | None = None
    _slots: ClientSlots
    _limits: GuardLimits
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any  # uvicorn's RequestResponseCycle, or None
    scope: Any
    headers: Any

    def connection_made(self, transport: asyncio.Transport) -> None:
        if self._admit(transport):
            super().connection_made(transport)  # type: ignore[misc]
            self._arm()  # the first request must arrive in time too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._release():
            super().connection_lost(exc)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        done = self.cycle
        super().on_response_complete()  # type: ignore[misc]
        # uvicorn keeps the finished request's cycle (its ASGI scope: headers, the app's state,
        # FastAPI's exit stacks; ~50 objects) until the next request on the connection. With a
        # thousand PCs on kept-alive connections that was 50,000 objects renewed every
        # heartbeat period, always old enough for the full garbage collections to walk (18-73
        # ms pauses every ~8 s, the heartbeats' tail; heap.py). Not while pipelined requests
        # wait (httptools starts the next from this call); every use of `cycle` in uvicorn's
        # protocols takes None as "no request under way", as before the first request, and
        # `scope` and `headers` are made anew when the next request begins (uvicorn 0.55).
        if done is None or self.cycle is not done or not done.response_complete or getattr(self, "pipeline", None) \
                or self._deadline is not None:  # armed: the request's body is still coming in
            return
        self.cycle = None
        # The protocol keeps the scope and its headers too; not if the next request's parsing
        # has begun (they are then that request's).
        if self.scope is done.scope:
            if self.headers is done.scope.get("headers"):
                self.headers = None
            self.scope = None

    def _admit(self, transport: asyncio.Transport) -> bool:
        address = _peer_address(transport)
        if not self._slots.take(address):
            transport.abort()
            return False
        self._address = address
        return True

    def _release(self) -> bool:
        """False if the connection was refused at connection_made (uvicorn never knew it)."""
        self._disarm()
        if self._address is None:
            return False
        self._slots.give(self._address)
        self._address = None
        return True

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self._limits.request_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport is None or self.transport.is_closing():
            return
        # No answer: the client is either gone or not worth one; an application waiting
        # for this body gets a disconnect and ends without answering.
        log.debug("closing a connection from %s: no complete request within %.0f s", self._address,
                  self._limits.request_timeout_s)
        self.transport.close()


Shed = Callable[[bytes, bytes], "bytes | None"]


def guarded_protocol(limits: GuardLimits, fast: bool = False, shed: Shed | None = None) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class with the request deadline and the per-address cap (pass it
    as uvicorn.Config(http=...)): h11's, or with `fast` httptools' (less CPU per request; the
    gateway's). Each call makes a class with its own counts.

    `shed(method, path)` (httptools only: the gateway's admission, head/gateway/admission.py)
    is asked once a request's headers are in; when it gives an answer, that whole HTTP response
    is written at once and the request goes no further: no request cycle, no task, no app. A
    refusal must cost far less than a served request, or refusing frees no CPU."""
    slots = ClientSlots(limits.max_connections_per_client)
    if shed is not None and not fast:
        raise ValueError("shed needs the httptools protocol (fast=True)")
    return _httptools_guarded(limits, slots, shed) if fast else _h11_guarded(limits, slots)


def _h11_guarded(limits: GuardLimits, slots: ClientSlots) -> type[asyncio.Protocol]:
    class GuardedH11Protocol(_Guard, H11Protocol):  # type: ignore[misc]  # _Guard narrows the transport to asyncio.Transport
        _slots, _limits = slots, limits

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._follow_request()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._follow_request()

        def _follow_request(self) -> None:
            """Arm the deadline while a request is coming in; disarm once it is all in, or
            while the connection waits idle for the next one (keep-alive's own timeout)."""
            state = self.conn.their_state
            partial = bool(self.conn.trailing_data[0])
            if state is h11.SEND_BODY or (state is h11.IDLE and partial):
                if self._deadline is None:
                    self._arm()
            else:
                self._disarm()

    return GuardedH11Protocol


def _httptools_guarded(limits: GuardLimits, slots: ClientSlots, shed: Shed | None) -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(_Guard, HttpToolsProtocol):  # type: ignore[misc]
        """httptools calls back as it parses: a request's first byte (on_message_begin) arms
        the deadline, its last (on_message_complete) disarms it."""

        _slots, _limits = slots, limits
        _shedding = False  # this request was answered by `shed`: its body is read and dropped

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._deadline is None:
                self._arm()

        def on_headers_complete(self) -> None:
            # Not while an earlier request on this connection is still answered (pipelining):
            # answers must go out in order, so that one takes the app's path.
            if shed is not None and (self.cycle is None or self.cycle.response_complete):
                answer = shed(self.parser.get_method(), self.url.split(b"?", 1)[0])
                if answer is not None:
                    self._shedding = True
                    self.transport.write(answer)
                    if self.expect_100_continue:  # the client sends no body now: the framing is lost
                        self.transport.close()
                    return
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._shedding:
                super().on_body(body)

        def on_message_complete(self) -> None:
            self._disarm()
            if self._shedding:
                self._shedding = False
                if not self.parser.should_keep_alive():
                    self.transport.close()
                elif not self.transport.is_closing():  # as uvicorn does after an answer
                    self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                        self.timeout_keep_alive_handler)
                return
            super().on_message_complete()

    return GuardedHttpToolsProtocol


def guarded_loop_factory(limits: GuardLimits, fast: bool = False,
                         reuse_port: bool = False) -> Callable[[], asyncio.AbstractEventLoop]:
    """An event loop factory for uvicorn.Config(loop=...) whose TLS servers give up on a
    handshake after `tls_handshake_timeout_s`: asyncio's loop, or with `fast` uvloop's, whose
    TCP servers then accept in batches (BatchAcceptServer). `reuse_port`: the listening socket
    takes SO_REUSEPORT, so that several processes (the gateway's workers) share the port and
    the kernel spreads new connections across them; uvicorn has no setting for it."""
    base: type[asyncio.AbstractEventLoop] = asyncio.SelectorEventLoop
    if fast:
        import uvloop

        base = uvloop.Loop

    class GuardedEventLoop(base):  # type: ignore[valid-type,misc]
        async def create_server(self, *args: Any, **kw: Any) -> Any:
            if kw.get("ssl") is not None and kw.get("ssl_handshake_timeout") is None:
                kw["ssl_handshake_timeout"] = limits.tls_handshake_timeout_s
            if reuse_port:
                kw["reuse_port"] = True
            sock = batch_listener(args, kw) if fast else None
            if sock is not None:
                return BatchAcceptServer(self, args[0], sock, kw.get("ssl"), kw.get("ssl_handshake_timeout"))
            return await super().create_server(*args, **kw)

    return GuardedEventLoop


ACCEPT_BATCH = 128  # connections accepted at most per readiness of the listening socket
# What uvicorn passes to create_server (besides the protocol factory); anything else, or a host
# name rather than an address, goes to the loop's own server.
_BATCH_ARGS = frozenset({"host", "port", "sock", "backlog", "ssl", "ssl_handshake_timeout", "reuse_port"})


def batch_listener(args: tuple[Any, ...], kw: dict[str, Any]) -> socket.socket | None:
    """The listening socket for BatchAcceptServer, from create_server's arguments: uvicorn's
    own (`sock`), or one bound to a literal address; None where the loop's server should do."""
    named = dict(zip(("host", "port"), args[1:3], strict=False), **kw)  # host, port may be positional
    if len(args) > 3 or not named.keys() <= _BATCH_ARGS:
        return None
    backlog = named.get("backlog", 100)
    sock: socket.socket | None = named.get("sock")
    if sock is not None:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        sock.listen(backlog)
    else:
        host: Any = named.get("host")
        try:
            version = ipaddress.ip_address(host).version
        except (TypeError, ValueError):
            return None
        # SO_REUSEADDR, and IPv6 only on an IPv6 address, as asyncio's create_server does.
        sock = socket.create_server((host, named.get("port") or 0), backlog=backlog,
                                    family=socket.AF_INET6 if version == 6 else socket.AF_INET,
                                    reuse_port=bool(named.get("reuse_port")))
    sock.setblocking(False)
    return sock


class BatchAcceptServer:
    """A TCP server for uvloop that accepts up to ACCEPT_BATCH connections each time its socket
    is ready, where uvloop's own accepts one per turn of the loop.

    Why by hand: libuv (uvloop's core) accepts a single connection per loop iteration, by design
    since 1.45, so that a busy server keeps serving the connections it has. For the gateway past
    its CPU that is the wrong way round: strace showed accept4 once per epoll_wait, 13 turns a
    second on a gateway capped at 20 % of a core, so 900-970 connections waited un-accepted in
    the listen queue for seconds, and with them the requests the admission limit was there to
    refuse at once. asyncio's own loop accepts in batches (100) but costs more per request.
    What is built on the accepted socket is uvloop's (`connect_accepted_socket`, TLS included);
    only the accept loop is ours. The subset of asyncio.Server that uvicorn uses."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol_factory: Callable[[], asyncio.BaseProtocol],
                 sock: socket.socket, ssl: Any, ssl_handshake_timeout: float | None) -> None:
        self._loop, self._factory, self._sock = loop, protocol_factory, sock
        self._tls = {"ssl": ssl, "ssl_handshake_timeout": ssl_handshake_timeout} if ssl is not None else {}
        self._pending: set[asyncio.Task[Any]] = set()
        self._serving = True
        loop.add_reader(sock.fileno(), self._accept)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._sock,) if self._serving else ()

    def is_serving(self) -> bool:
        return self._serving

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:  # out of file descriptors, say: the next readiness tries again
                log.warning("accepting a connection failed: %s", e)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._loop.connect_accepted_socket(self._factory, conn, **self._tls))
            self._pending.add(task)
            task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[Any]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:  # a TLS handshake that failed or timed out
            log.debug("a connection ended before it was set up: %s", task.exception())

    def close(self) -> None:
        if self._serving:
            self._serving = False
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()

    async def wait_closed(self) -> None:
        return None


def _peer_address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, (tuple, list)) and peer:
        return str(peer[0])
    return "unknown"
