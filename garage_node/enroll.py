"""Enrollment: verify the head against the token's pin, then trade the token for an identity.

Nothing is written here: the caller persists the identity only once the head has accepted
the node, so a refused or failed enrollment leaves no trace on disk or on the interface.
"""

from __future__ import annotations

import ssl
import time
from typing import Any

import httpx

from . import pki, wireguard
from .identity import Identity
from .token import JoinToken

TIMEOUT = httpx.Timeout(10.0, connect=5.0)


class EnrollFailed(Exception):
    """`retry` says whether trying again later can help (head down) or not (token refused)."""

    def __init__(self, message: str, retry: bool, code: str = "") -> None:
        super().__init__(message)
        self.retry, self.code = retry, code


def fetch_pinned_ca(tok: JoinToken) -> bytes:
    """Download the head's CA without trusting it yet, and accept it only if it matches the pin."""
    try:
        # verify=False is deliberate: the CA is checked below against the pin the token carries.
        resp = httpx.get(f"{tok.api_url}/v1/ca", verify=False, timeout=TIMEOUT)
        resp.raise_for_status()
    except httpx.HTTPError as e:
        raise EnrollFailed(f"head unreachable at {tok.api_url}: {_reason(e)}", retry=True, code="unreachable") from None
    ca_pem = resp.content
    try:
        got = pki.ca_pin(ca_pem)
    except ValueError:
        got = "(not a certificate)"
    if got != tok.ca_pin:
        raise EnrollFailed(
            f"the server at {tok.api_url} is not the head this token was made for (its certificate "
            "does not match the token's pin). Check the address, or ask the operator for a new token.",
            retry=False, code="pin_mismatch",
        )
    return ca_pem


def enroll(tok: JoinToken, name: str, report: dict[str, Any]) -> tuple[Identity, bytes]:
    ca_pem = fetch_pinned_ca(tok)
    private_key = wireguard.generate_private_key()
    body = {
        "token_id": tok.token_id, "secret": tok.secret, "name": name,
        "wg_public_key": wireguard.public_key_of(private_key), "report": report,
    }
    try:
        with client(ca_pem) as c:
            resp = c.post(f"{tok.api_url}/v1/enroll", json=body)
    except httpx.HTTPError as e:
        raise EnrollFailed(f"head unreachable at {tok.api_url}: {_reason(e)}", retry=True, code="unreachable") from None
    if resp.status_code != 200:
        code, message = error_of(resp)
        raise EnrollFailed(f"the head refused to enroll this node: {message}", retry=resp.status_code >= 500, code=code)
    return Identity.from_enrollment(name, tok.api_url, private_key, resp.json(), time.time()), ca_pem


def client(ca_pem: bytes) -> httpx.Client:
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    return httpx.Client(verify=ctx, timeout=TIMEOUT)


def error_of(resp: httpx.Response) -> tuple[str, str]:
    try:
        data = resp.json()
        return str(data.get("error", resp.status_code)), str(data.get("message", resp.reason_phrase))
    except ValueError:
        return str(resp.status_code), f"HTTP {resp.status_code} {resp.reason_phrase}"


def _reason(e: httpx.HTTPError) -> str:
    # httpx messages carry no secrets (bodies are not included), but keep them short.
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:200]
