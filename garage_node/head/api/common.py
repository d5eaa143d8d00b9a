"""The API's one error shape, and the formats its requests must have (documented in the
OpenAPI description, so a client or a schema fuzzer knows every answer it can get)."""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated, Any, Callable

from pydantic import BaseModel, BeforeValidator, Field

from garage_node.core.errors import SENT_BY_HEAD
from garage_node.core.wire import NodeReport, RegionFacts, check_strictly

# Formats of what clients send. Join tokens and credentials come from `secrets.token_urlsafe`.
TOKEN_ID = r"^[a-z0-9]{6,32}$"
SECRET = r"^[A-Za-z0-9_-]{16,256}$"
NODE_ID = r"^n[0-9a-f]{10}$"
# Base64 of 32 bytes: 43 characters, the last of which carries 2 bits, then one '='.
WG_PUBLIC_KEY = r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$"
CREDENTIAL_FORMAT = "43 characters of base64url (A-Z a-z 0-9 - _), as `Authorization: Bearer <credential>`"

WgPublicKey = Annotated[str, Field(pattern=WG_PUBLIC_KEY, description="a WireGuard public key (base64 of 32 bytes)")]


def _exactly(cls: type) -> Callable[[Any], Any]:
    """A check, before pydantic's, that the raw JSON is a `cls` without coercion. Pydantic's lax
    mode would take `true` for a number, `1.0` or `"3"` for an integer and `0` for a boolean,
    none of which the published schema allows (schemathesis found 27 such requests accepted);
    its strict mode cannot be used, as it refuses the dicts our dataclasses arrive as."""
    def check(value: Any) -> Any:
        if isinstance(value, dict):  # anything else: pydantic's own "not an object" answer
            check_strictly(value, cls)  # WireError is a ValueError: a 422 naming the field
        return value
    return check


# A node's report, validated as exactly as the schema describes it (see _exactly).
StrictNodeReport = Annotated[NodeReport, BeforeValidator(_exactly(NodeReport))]


class ErrorBody(BaseModel):
    """Every refusal: a machine-readable code and a sentence that says what to do."""

    # A str, not the enum: the framework's own refusals are http_<status> (404, 405...).
    error: str = Field(description="a machine-readable code: one of " + ", ".join(sorted(SENT_BY_HEAD))
                       + ", or http_<status> for the framework's own refusals")
    message: str


_WHY = {
    401: "the join token or the node's credential is not valid (unknown, wrong, expired or used up)",
    403: "the operator revoked this node",
    409: "a conflict: the WireGuard key belongs to another node, or the overlay has no free address",
    413: "the request body is larger than the head accepts",
    422: "the request does not have the documented shape (a field is missing, of the wrong type or out of bounds)",
}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the refusals a route can give (all with ErrorBody)."""
    return {code: {"model": ErrorBody, "description": _WHY[code]} for code in codes}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def region_fields(facts: RegionFacts) -> dict[str, Any]:
    """The RegionFacts part of an answer, as keyword arguments (EnrollReply, HeartbeatReply)."""
    return {f.name: getattr(facts, f.name) for f in fields(RegionFacts)}
