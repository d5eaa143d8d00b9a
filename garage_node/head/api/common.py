"""The API's one error shape."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def region_fields(facts) -> dict:
    """The RegionFacts part of an answer, as keyword arguments (EnrollReply, HeartbeatReply)."""
    from dataclasses import fields

    return {f.name: getattr(facts, f.name) for f in fields(facts)}
