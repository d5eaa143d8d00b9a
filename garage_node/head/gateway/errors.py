"""Errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`), so OpenAI
clients show them as they would OpenAI's own. A message never echoes the key or the body."""

from __future__ import annotations

from fastapi.responses import JSONResponse

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         502: "server_error", 503: "server_error", 504: "server_error"}


class GatewayError(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after_s: float | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.retry_after_s = retry_after_s

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(max(1, int(self.retry_after_s + 0.999)))} if self.retry_after_s is not None else None
        return JSONResponse({"error": {"message": self.message, "type": TYPES.get(self.status, "server_error"),
                                       "param": self.param, "code": self.code}},
                            status_code=self.status, headers=headers)


class ClientGone(Exception):
    """The client left before anything was sent on its behalf (while its request was held)."""


def stream_error_event(message: str, code: str = "upstream_lost") -> bytes:
    """The last event of a stream that cannot go on: a client reading SSE sees why, then [DONE]."""
    import json

    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()
