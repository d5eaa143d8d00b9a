"""Join tokens: one copy-pasteable string that lets a PC enroll with its regional head.

Format: ``gn1.`` + base64url(JSON) with keys ``a`` (head API URL), ``c`` (pin of the head's
CA certificate, ``sha256:<hex>``), ``i`` (token id, public) and ``s`` (secret). The pin lets
a node verify the head on first contact, as kubeadm's discovery hash does; the head keeps
only a hash of the secret.

Nothing here ever puts the secret into a message or a repr.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass, field

PREFIX = "gn1."
_PIN = re.compile(r"^sha256:[0-9a-f]{64}$")
_ID = re.compile(r"^[a-z0-9]{6,32}$")


class TokenError(ValueError):
    """The token string cannot be used; the message never contains the secret."""


@dataclass(frozen=True)
class JoinToken:
    api_url: str
    ca_pin: str
    token_id: str
    secret: str = field(repr=False)

    def encode(self) -> str:
        body = json.dumps(
            {"a": self.api_url, "c": self.ca_pin, "i": self.token_id, "s": self.secret},
            separators=(",", ":"),
        )
        return PREFIX + base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def new_token(api_url: str, ca_pin: str) -> JoinToken:
    return JoinToken(api_url, ca_pin, secrets.token_hex(4), secrets.token_urlsafe(32))


def parse(text: str) -> JoinToken:
    text = text.strip()
    hint = "Copy the whole token again from `garage-node head token create` on the head."
    if not text.startswith(PREFIX):
        raise TokenError(f"this is not a garage-node join token (it should start with '{PREFIX}'). {hint}")
    raw = text[len(PREFIX):]
    try:
        body = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise TokenError(f"the join token is damaged (it does not decode); it may be cut short. {hint}") from None
    if not isinstance(body, dict) or not all(isinstance(body.get(k), str) for k in "acis"):
        raise TokenError(f"the join token is incomplete (a field is missing). {hint}")
    if not body["a"].startswith("https://"):
        raise TokenError(f"the join token names no HTTPS head address. {hint}")
    if not _PIN.match(body["c"]) or not _ID.match(body["i"]) or len(body["s"]) < 16:
        raise TokenError(f"the join token is damaged (bad certificate pin, id or secret). {hint}")
    return JoinToken(body["a"], body["c"], body["i"], body["s"])


def ca_pin(ca_pem: bytes) -> str:
    """The pin a token carries: SHA-256 of the head CA certificate's DER (as kubeadm's discovery hash)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = x509.load_pem_x509_certificate(ca_pem).public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def hash_secret(secret: str) -> str:
    # The secret has 256 bits of entropy, so a plain SHA-256 is enough (no password KDF needed).
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)
