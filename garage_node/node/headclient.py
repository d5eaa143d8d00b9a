"""The node's side of the head's control API: enrollment (verify the head against the token's
pin, then trade the token for an identity) and heartbeats, over HTTPS pinned to the head's CA.

Nothing is written here: the agent persists what the head grants. Answers are decoded into the
typed messages of core.wire; failures become one of three exceptions the agent can act on.
"""

from __future__ import annotations

import random
import ssl
import time
from typing import Any, TypeVar

import httpx

from garage_node.core import token, wireguard
from garage_node.core.errors import ErrorCode
from garage_node.core.token import JoinToken
from garage_node.core.wire import CredentialReply, EnrollReply, HeartbeatReply, NodeReport, WireError, decode, encode
from garage_node.node.identity import Identity

TIMEOUT = httpx.Timeout(10.0, connect=5.0)
T = TypeVar("T")

# Each period between heartbeats is the head's heartbeat_s, give or take this much.
HEARTBEAT_JITTER = 0.10


class BeatTimer:
    """How long until the next heartbeat: spread, so that a thousand PCs that came up together
    (power back in a street, a LAN party) do not beat the head in step.

    The first heartbeat goes at once (it is how a PC joins and shows up at the head); the wait
    after it is a random part of a period (10-100 %), which scatters PCs that booted in the same
    second over the whole period; every wait after that is the period ±10 %, which keeps them
    scattered (the head's clock and network delays would otherwise pull them together again
    only slowly, never apart). The agent adds these delays to its injectable clock."""

    def __init__(self, rng: random.Random | None = None, jitter: float = HEARTBEAT_JITTER) -> None:
        self.rng = rng or random.Random()
        self.jitter = jitter
        self._scattered = False

    def next_in(self, period_s: float) -> float:
        if not self._scattered:
            self._scattered = True
            return period_s * self.rng.uniform(0.1, 1.0)
        return period_s * self.rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)


class HeadError(Exception):
    """Talking to the head failed; `retry` says whether trying again later can help; `code`:
    the head's (or this client's) ErrorCode, a str for a code this version does not know."""

    def __init__(self, message: str, retry: bool, code: ErrorCode | str = "") -> None:
        super().__init__(message)
        self.retry, self.code = retry, code


class HeadUnreachable(HeadError):
    """No answer, or a broken one (head down, network, a 5xx): retried with backoff."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retry=True, code=ErrorCode.UNREACHABLE)


class Refused(HeadError):
    """The head said no for good (token refused, wrong head, wrong region)."""

    def __init__(self, message: str, code: ErrorCode | str) -> None:
        super().__init__(message, retry=False, code=code)


class Revoked(HeadError):
    def __init__(self, message: str) -> None:
        super().__init__(message, retry=False, code=ErrorCode.REVOKED)


def fetch_pinned_ca(tok: JoinToken) -> bytes:
    """Download the head's CA without trusting it yet, and accept it only if it matches the pin."""
    try:
        # No verification is deliberate: the CA is checked below against the pin the token carries.
        resp = httpx.get(f"{tok.api_url}/v1/ca", verify=tls_context(None), timeout=TIMEOUT)
        resp.raise_for_status()
    except httpx.HTTPError as e:
        raise HeadUnreachable(f"head unreachable at {tok.api_url}: {_reason(e)}") from None
    ca_pem = resp.content
    try:
        got = token.ca_pin(ca_pem)
    except ValueError:
        got = "(not a certificate)"
    if got != tok.ca_pin:
        raise Refused(
            f"the server at {tok.api_url} is not the head this token was made for (its certificate "
            "does not match the token's pin). Check the address, or ask the operator for a new token.",
            code=ErrorCode.PIN_MISMATCH,
        )
    return ca_pem


def enroll(tok: JoinToken, name: str, report: NodeReport, wg_private_key: str,
           expected_region: str = "") -> tuple[Identity, bytes]:
    """Enroll with the WireGuard key the agent made and stored before this call (asking again
    with the same token and key returns the same identity); raises HeadError."""
    ca_pem = fetch_pinned_ca(tok)
    with client(ca_pem) as c:
        if expected_region:
            _check_region(c, tok.api_url, expected_region)
        private_key = wg_private_key
        body = {
            "token_id": tok.token_id, "secret": tok.secret, "name": name,
            "wg_public_key": wireguard.public_key_of(private_key), "report": encode(report),
        }
        resp = _post(c, f"{tok.api_url}/v1/enroll", body)
    if resp.status_code != 200:
        code, message = error_of(resp)
        if resp.status_code >= 500:
            raise HeadUnreachable(f"the head failed to enroll this node ({resp.status_code}): {message}")
        raise Refused(f"the head refused to enroll this node: {message}", code=code)
    reply = _decode(resp, EnrollReply, tok.api_url)
    return Identity.from_enrollment(name, tok.api_url, private_key, reply, time.time()), ca_pem


def _check_region(c: httpx.Client, api_url: str, expected: str) -> None:
    """Before the token is spent: a stick set up for one region must not join another."""
    try:
        resp = c.get(f"{api_url}/v1/health")
        region = resp.json().get("region") if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        raise HeadUnreachable(f"head unreachable at {api_url}") from None
    if region is not None and region != expected:
        raise Refused(f"this PC is set up for region '{expected}' ([node] region) but the head at {api_url} "
                      f"serves region '{region}'. Fix [node] region in garage.toml, or use a token of "
                      f"region '{expected}'.", code=ErrorCode.WRONG_REGION)


class HeadClient:
    """Heartbeats to the head with the node's credential; keeps one connection open."""

    def __init__(self, ident: Identity, ca_pem: bytes) -> None:
        self.ident = ident
        self._client = client(ca_pem)

    def heartbeat(self, report: NodeReport) -> HeartbeatReply:
        ident = self.ident
        resp = _post(self._client, f"{ident.api_url}/v1/nodes/{ident.node_id}/heartbeat", {"report": encode(report)},
                     headers={"Authorization": f"Bearer {ident.credential}"})
        if resp.status_code == 403:
            raise Revoked(error_of(resp)[1])
        if resp.status_code != 200:
            raise HeadUnreachable(f"the head answered {resp.status_code}: {error_of(resp)[1]}")
        return _decode(resp, HeartbeatReply, ident.api_url)

    def renew_credential(self, wg_public_key: str | None) -> CredentialReply:
        """A new credential (the current one stays valid for a short overlap) and, with
        `wg_public_key`, a new WireGuard key at the hub."""
        ident = self.ident
        body = {"wg_public_key": wg_public_key} if wg_public_key else {}
        resp = _post(self._client, f"{ident.api_url}/v1/nodes/{ident.node_id}/credential", body,
                     headers={"Authorization": f"Bearer {ident.credential}"})
        if resp.status_code == 403:
            raise Revoked(error_of(resp)[1])
        if resp.status_code == 409:
            code, message = error_of(resp)
            raise Refused(f"the head refused the renewal: {message}", code=code)
        if resp.status_code != 200:
            raise HeadUnreachable(f"the head answered {resp.status_code} to a credential renewal: {error_of(resp)[1]}")
        return _decode(resp, CredentialReply, ident.api_url)

    def close(self) -> None:
        self._client.close()


def tls_context(ca_pem: bytes | None) -> ssl.SSLContext:
    """TLS 1.3 only, as the head's listener (head/listener.py): trusting the head's CA, or,
    with None, trusting nothing yet (the first fetch of the CA, checked against the token's
    pin afterwards)."""
    if ca_pem is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(cadata=ca_pem.decode())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def client(ca_pem: bytes) -> httpx.Client:
    return httpx.Client(verify=tls_context(ca_pem), timeout=TIMEOUT)


def _post(c: httpx.Client, url: str, body: dict[str, Any], **kw: Any) -> httpx.Response:
    try:
        try:
            return c.post(url, json=body, **kw)
        except httpx.RemoteProtocolError:
            # The head closed a kept-alive connection just as it was reused ("server
            # disconnected"): the request never reached it, so one retry on a new one is safe.
            return c.post(url, json=body, **kw)
    except httpx.HTTPError as e:
        raise HeadUnreachable(f"head unreachable at {url.split('/v1/')[0]}: {_reason(e)}") from None


def _decode(resp: httpx.Response, cls: type[T], api_url: str) -> T:
    try:
        return decode(resp.json(), cls)
    except (ValueError, WireError) as e:
        raise HeadUnreachable(f"the head at {api_url} sent an answer this node cannot read ({e}); "
                              "is it running the same garage-node version?") from None


def error_of(resp: httpx.Response) -> tuple[ErrorCode | str, str]:
    try:
        data = resp.json()
        return ErrorCode.of(str(data.get("error", resp.status_code))), str(data.get("message", resp.reason_phrase))
    except ValueError:
        return str(resp.status_code), f"HTTP {resp.status_code} {resp.reason_phrase}"


def _reason(e: httpx.HTTPError) -> str:
    # httpx messages carry no secrets (bodies are not included), but keep them short.
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:200]


class HeadApi:
    """The head as the agent uses it: enroll once, then a client for heartbeats. The agent's
    one edge to the head, which unit tests replace."""

    def enroll(self, tok: JoinToken, name: str, report: NodeReport, wg_private_key: str,
               expected_region: str = "") -> tuple[Identity, bytes]:
        return enroll(tok, name, report, wg_private_key, expected_region)

    def connect(self, ident: Identity, ca_pem: bytes) -> HeadClient:
        return HeadClient(ident, ca_pem)
