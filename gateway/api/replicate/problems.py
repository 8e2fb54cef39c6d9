"""Errors in Replicate's shape: RFC 7807 problem details, which its clients read into ``ReplicateError``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from gateway.errors import ApiError

PROBLEM_MEDIA_TYPE = "application/problem+json"

# Replicate's own titles where its clients or docs show them; otherwise the HTTP reason phrase.
_TITLES = {
    401: "Unauthenticated",
    404: "Not found",
    422: "Input validation failed",
    429: "Request was throttled",
}


def title_for(status: int) -> str:
    if status in _TITLES:
        return _TITLES[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class Problem(Exception):
    """An error answered as ``{"title", "detail", "status"}`` with that HTTP status."""

    def __init__(
        self, status: int, detail: str, *, title: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title or title_for(status)
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"title": self.title, "detail": self.detail, "status": self.status}

    @classmethod
    def from_api_error(cls, error: ApiError) -> Problem:
        """The same refusal (auth, limits, overload, unknown model) in Replicate's shape."""
        return cls(error.status, error.message, headers=error.headers)


@dataclass(frozen=True, slots=True)
class InvalidField:
    field: str
    """Where the value sits in the request body, e.g. ``input.temperature``."""
    type: str
    """What is wrong: ``required``, ``type``, ``minimum``, ``maximum`` or ``value``."""
    description: str


class InvalidInput(Problem):
    """422 naming every rejected field, as Replicate answers a prediction with bad inputs."""

    def __init__(self, fields: Sequence[InvalidField]) -> None:
        self.fields = tuple(fields)
        detail = "".join(f"- {f.field}: {f.description}\n" for f in self.fields)
        super().__init__(422, detail)

    def body(self) -> dict[str, Any]:
        invalid = [{"type": f.type, "field": f.field, "description": f.description} for f in self.fields]
        return {**super().body(), "invalid_fields": invalid}


def invalid(field: str, type: str, description: str) -> InvalidInput:
    return InvalidInput([InvalidField(field, type, description)])
