"""Errors answered to clients, always in OpenAI's envelope.

``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`` with the status the
OpenAI SDK maps to its matching exception class (400 BadRequestError, 401 AuthenticationError,
403 PermissionDeniedError, 404 NotFoundError, 409 ConflictError, 413/422, 429 RateLimitError,
503 InternalServerError after retries).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ApiError(Exception):
    """An error answered to the client with an OpenAI-shaped body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


MAX_ECHO_CHARS = 128
"""How much of a client's value an error message repeats: enough to recognise, never a large echo."""


def echo(value: str) -> str:
    """``value`` as an error message quotes it, cut to ``MAX_ECHO_CHARS``."""
    return value if len(value) <= MAX_ECHO_CHARS else value[:MAX_ECHO_CHARS] + "…"


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model `{echo(model)}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def overloaded(retry_after: int, message: str = "The model is overloaded. Please retry shortly.") -> ApiError:
    return ApiError(
        503, message, type="server_overloaded", code="server_overloaded", headers={"Retry-After": str(retry_after)}
    )
