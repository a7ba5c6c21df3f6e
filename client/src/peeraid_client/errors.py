"""Typed errors carrying the server's own message."""

from __future__ import annotations

from typing import Any

import httpx


class PeeraidError(Exception):
    """Any failure talking to the service. `status_code` is None where no HTTP answer came back."""

    def __init__(self, status_code: int | None, message: str, details: Any = None):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status_code={self.status_code!r}, message={self.message!r})"


class AuthenticationError(PeeraidError):
    """401: no API key, or an unknown or revoked one."""


class NotFound(PeeraidError):
    """404: no such dataset, job or artifact (another tenant's ids are not found either)."""


class Conflict(PeeraidError):
    """409: e.g. cancelling a finished job, or an Idempotency-Key reused for a different request."""


class PayloadTooLarge(PeeraidError):
    """413: an upload over the server's limit."""


class ValidationError(PeeraidError):
    """422: `errors` lists (field, message) pairs, field dotted (`peeraid.tau`) or '' for the whole request."""

    def __init__(self, status_code: int | None, message: str, details: Any = None, errors: list[tuple[str, str]] | None = None):
        super().__init__(status_code, message, details)
        self.errors = errors or []

    @property
    def fields(self) -> list[str]:
        return [field for field, _ in self.errors]


class RateLimited(PeeraidError):
    """429: too many queued or running jobs; `retry_after` is the server's suggested wait in seconds."""

    def __init__(self, status_code: int | None, message: str, details: Any = None, retry_after: float | None = None):
        super().__init__(status_code, message, details)
        self.retry_after = retry_after


class ServerError(PeeraidError):
    """5xx."""


class ConnectionFailed(PeeraidError):
    """The service could not be reached, or the connection broke (status_code is None)."""


class ChecksumMismatch(PeeraidError):
    """A download whose size or SHA-256 differs from what the service announced; nothing was written in place."""

    def __init__(self, message: str, expected: str | int | None = None, actual: str | int | None = None):
        super().__init__(None, message)
        self.expected = expected
        self.actual = actual


class ConfigError(PeeraidError):
    """An unreadable or malformed configuration file."""

    def __init__(self, message: str):
        super().__init__(None, message)


_BY_STATUS: dict[int, type[PeeraidError]] = {
    401: AuthenticationError,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationError,
    429: RateLimited,
}
_LOCATIONS = {"body", "query", "path", "header"}


def _field(loc: Any) -> str:
    parts = [str(p) for p in loc] if isinstance(loc, list | tuple) else []
    if parts and parts[0] in _LOCATIONS:
        parts = parts[1:]
    if parts[:1] == ["spec"]:  # job-spec fields by their own names, as `--set` and `spec=` take them
        parts = parts[1:]
    return ".".join(parts)


def _field_errors(detail: list[Any]) -> list[tuple[str, str]]:
    errors = []
    for item in detail:
        if not isinstance(item, dict):
            errors.append(("", str(item)))
            continue
        field, message = _field(item.get("loc")), str(item.get("msg", ""))
        errors.append((field, message.removeprefix(f"{field}: ") if field else message))  # the service prefixes its own
    return errors


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def error_from_response(response: httpx.Response) -> PeeraidError:
    """The typed error for a 4xx/5xx answer (its body must have been read)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    errors: list[tuple[str, str]] = []
    if isinstance(detail, str):
        message = detail
    elif isinstance(detail, list):
        errors = _field_errors(detail)
        message = "; ".join(f"{field}: {msg}" if field else msg for field, msg in errors)
    else:
        message = response.text.strip()[:500] or response.reason_phrase
    code = response.status_code
    message = message or f"HTTP {code}"
    cls = _BY_STATUS.get(code) or (ServerError if code >= 500 else PeeraidError)
    if cls is ValidationError:
        return ValidationError(code, message, detail, errors=errors)
    if cls is RateLimited:
        return RateLimited(code, message, detail, retry_after=_retry_after(response))
    return cls(code, message, detail)
