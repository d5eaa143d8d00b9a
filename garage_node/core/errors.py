"""The machine-readable codes of the head's control API (`{"error": CODE, "message": TEXT}`),
named once for the head that sends them and the node that acts on them.

A StrEnum: a code is its own JSON string, and compares equal to it (`code == "key_in_use"`).
A node may meet a code this version does not name (a newer head): it keeps it as a plain str.
The framework's own refusals (an unknown path: 404) are `http_<status>`, not named here.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    # Enrollment (401 unless said otherwise)
    TOKEN_UNKNOWN = "token_unknown"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_USED = "token_used"
    KEY_IN_USE = "key_in_use"        # 409: the WireGuard key belongs to another node
    NETWORK_FULL = "network_full"    # 409: the overlay has no free address
    # A node's own routes
    UNAUTHORIZED = "unauthorized"            # 401: unknown node or wrong credential
    CREDENTIAL_EXPIRED = "credential_expired"  # 401
    REVOKED = "revoked"                      # 403
    # Any route
    INVALID_REQUEST = "invalid_request"  # 422
    BODY_TOO_LARGE = "body_too_large"    # 413
    # Said by the node about the head, never sent by it
    UNREACHABLE = "unreachable"    # no answer, or a broken one: retried
    PIN_MISMATCH = "pin_mismatch"  # the server is not the head the token names
    WRONG_REGION = "wrong_region"  # the head serves another region than [node] region

    @classmethod
    def of(cls, code: str) -> ErrorCode | str:
        """`code` as a member when this version knows it, else as it came."""
        try:
            return cls(code)
        except ValueError:
            return code


# What the head's API answers (the rest the node says of the head).
SENT_BY_HEAD = frozenset(ErrorCode) - {ErrorCode.UNREACHABLE, ErrorCode.PIN_MISMATCH, ErrorCode.WRONG_REGION}

# Enrollment refusals answered 409, not 401: the same request may succeed after a change (a new
# key, a wider network).
CONFLICTS = frozenset({ErrorCode.KEY_IN_USE, ErrorCode.NETWORK_FULL})
