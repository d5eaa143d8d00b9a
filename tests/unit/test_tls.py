"""TLS 1.3 only on the control API (issue #23): the head's listener refuses a TLS 1.2 handshake
(Python's ssl held to 1.2, and `openssl s_client -tls1_2` with the CBC-SHA1 suite an outside
check found accepted), and the agent's client refuses a head that offers only TLS 1.2; 1.3
works both ways. On a real uvicorn server with the head's own certificates (head/pki.py) and
the control API's guards, on loopback."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from garage_node.core.token import JoinToken, ca_pin
from garage_node.head import pki
from garage_node.head.connguard import GuardLimits, guarded_loop_factory, guarded_protocol
from garage_node.head.listener import BackgroundServer, tls13_config
from garage_node.node import headclient

LIMITS = GuardLimits(request_timeout_s=5, max_connections_per_client=8, tls_handshake_timeout_s=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving(body: bytes):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body})
    return app


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> pki.PkiPaths:
    paths = pki.PkiPaths(tmp_path_factory.mktemp("pki"))
    pki.create_ca(paths, "test")
    pki.issue_server_cert(paths, "127.0.0.1")
    return paths


@pytest.fixture(scope="module")
def head(certs: pki.PkiPaths) -> Iterator[int]:
    """The control API's listener as `head run` configures it (service.py), on a free port."""
    port = free_port()
    config = tls13_config(serving(certs.ca_cert.read_bytes()), host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                          ssl_certfile=str(certs.server_cert), ssl_keyfile=str(certs.server_key),
                          http=guarded_protocol(LIMITS), loop=guarded_loop_factory(LIMITS))
    server = BackgroundServer("control API", config)
    server.start()
    yield port
    server.stop()


def handshake(port: int, ctx: ssl.SSLContext) -> str:
    """The TLS version the handshake agreed on; raises ssl.SSLError when it failed."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return str(tls.version())


def client_context(certs: pki.PkiPaths, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def test_the_head_refuses_tls_1_2(head: int, certs: pki.PkiPaths) -> None:
    with pytest.raises(ssl.SSLError):
        handshake(head, client_context(certs, ssl.TLSVersion.TLSv1_2))
    assert handshake(head, client_context(certs)) == "TLSv1.3"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_the_head_refuses_the_cbc_sha1_suite(head: int) -> None:
    """What the outside check ran: a TLS 1.2 handshake offering only ECDHE-ECDSA-AES128-SHA."""
    def s_client(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{head}", *args],
                              input="", capture_output=True, text=True, timeout=20)
    old = s_client("-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA")
    assert old.returncode != 0 and "Cipher is (NONE)" in old.stdout + old.stderr, old.stdout
    new = s_client("-tls1_3")
    assert new.returncode == 0 and "TLSv1.3" in new.stdout, new.stderr


def test_the_agents_client_speaks_tls_1_3_to_the_head(head: int, certs: pki.PkiPaths) -> None:
    ca_pem = certs.ca_cert.read_bytes()
    with headclient.client(ca_pem) as c:
        assert c.get(f"https://127.0.0.1:{head}/v1/health").status_code == 200
    token = JoinToken(api_url=f"https://127.0.0.1:{head}", token_id="tok001", secret="s" * 43, ca_pin=ca_pin(ca_pem))
    assert headclient.fetch_pinned_ca(token) == ca_pem


@pytest.fixture
def tls12_only_head(certs: pki.PkiPaths) -> Iterator[int]:
    """A server that offers TLS 1.2 and nothing newer (a downgraded or impostor head)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(certs.server_cert), str(certs.server_key))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()
    handshakes: list[str] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    handshakes.append(str(tls.version()))
                    tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nCA PEM")
            except (ssl.SSLError, OSError):
                handshakes.append("refused")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()
    thread.join(timeout=10)
    # The server saw the handshakes fail (not some other error before TLS).
    assert handshakes and set(handshakes) == {"refused"}, handshakes


def test_the_agents_client_refuses_a_tls_1_2_head(tls12_only_head: int, certs: pki.PkiPaths) -> None:
    ca_pem = certs.ca_cert.read_bytes()
    with headclient.client(ca_pem) as c, pytest.raises(httpx.ConnectError):
        c.get(f"https://127.0.0.1:{tls12_only_head}/v1/health")
    token = JoinToken(api_url=f"https://127.0.0.1:{tls12_only_head}", token_id="tok001", secret="s" * 43,
                      ca_pin=ca_pin(ca_pem))
    with pytest.raises(headclient.HeadUnreachable):
        headclient.fetch_pinned_ca(token)


def test_tls13_config_without_a_certificate_serves_plain_http(tmp_path: Path) -> None:
    """The fleet page on loopback has no certificate: the subclass must not need one."""
    config = tls13_config(serving(b""), host="127.0.0.1", port=free_port(), lifespan="off")
    config.load()
    assert config.ssl is None


@pytest.fixture(scope="module")
def gateway(certs: pki.PkiPaths) -> Iterator[int]:
    """The gateway's HTTPS listener with the TLS settings `head run` gives it (gateway/serve.py)."""
    import uvicorn

    from garage_node.head.gateway.serve import gateway_tls

    port = free_port()
    config = uvicorn.Config(serving(b"ok"), host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                            **gateway_tls(str(certs.server_cert), str(certs.server_key)))  # type: ignore[arg-type]
    server = BackgroundServer("gateway", config)
    server.start()
    yield port
    server.stop()


def test_the_gateway_keeps_tls_1_2_but_only_with_aead_suites(gateway: int, certs: pki.PkiPaths) -> None:
    # Customers' clients may be old, so TLS 1.2 stays; its CBC-SHA1 suites do not.
    assert handshake(gateway, client_context(certs, ssl.TLSVersion.TLSv1_2)) == "TLSv1.2"
    cbc = client_context(certs, ssl.TLSVersion.TLSv1_2)
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA")
    with pytest.raises(ssl.SSLError):
        handshake(gateway, cbc)
    assert handshake(gateway, client_context(certs)) == "TLSv1.3"
