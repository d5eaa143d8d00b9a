"""The gateway's listener as uvicorn runs it, in the head (service.py) and in each extra
worker process (worker.py): the same guards, TLS settings and fast loop everywhere."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from garage_node.head.connguard import GuardLimits, Shed, guarded_loop_factory, guarded_protocol

if TYPE_CHECKING:
    import uvicorn

    from garage_node.head.config import GatewaySection

# The gateway's customers bring every kind of client, so it keeps TLS 1.2, but only with AEAD
# suites: uvicorn's default cipher string ("TLSv1") also offers the CBC-SHA1 suites an outside
# check found on the control API (issue #23). TLS 1.3's suites are not set by this string.
GATEWAY_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def gateway_tls(cert: str, key: str) -> dict[str, Any]:
    """uvicorn's TLS settings for the gateway's listener; {} without a certificate (plain HTTP)."""
    if not cert:
        return {}
    return {"ssl_certfile": cert, "ssl_keyfile": key, "ssl_ciphers": GATEWAY_CIPHERS}


def gateway_config(g: GatewaySection, limits: GuardLimits, app: Any, shed: Shed) -> uvicorn.Config:
    """The OpenAI API's listener (facing users: the same guards as the control API). With
    [gateway] workers above 1 every process binds the port with SO_REUSEPORT."""
    import uvicorn

    return uvicorn.Config(app, host=g.listen_host, port=g.port, log_level="warning",
                          access_log=False, timeout_keep_alive=30, timeout_graceful_shutdown=10,
                          # uvloop and httptools: less CPU per request (#22); the same guards.
                          # Past capacity a 503 is written by the protocol itself (admission.py).
                          http=guarded_protocol(limits, fast=True, shed=shed),
                          loop=guarded_loop_factory(limits, fast=True, reuse_port=g.workers > 1),  # type: ignore[arg-type]
                          **gateway_tls(g.tls_cert, g.tls_key))
