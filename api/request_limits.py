"""Limits on what one request may make the API do before any route runs: JSON and form bodies are
capped in size (413) and in nesting depth (422), and validation errors are answered in a bounded body
(the first errors, without echoing the input) — so a hostile body costs little memory and time."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CAPPED_TYPES = (b"application/json", b"application/x-www-form-urlencoded")
MAX_NESTING = 32
MAX_ERRORS = 20
MAX_MESSAGE_CHARS = 300


class InFlightLimit:
    """At most `limit` requests in flight per API key (an open event stream counts until it closes),
    refused with 429 before any routing, parsing or database work: a client that opens hundreds of
    requests at once costs the others almost nothing. Requests without a key pass (they get their 401)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit
        self.in_flight: dict[bytes, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = dict(scope.get("headers", ())).get(b"authorization") if scope["type"] == "http" else None
        if not key:
            await self.app(scope, receive, send)
            return
        if self.in_flight.get(key, 0) >= self.limit:
            response = JSONResponse(
                {"detail": f"too many requests in flight with this API key (limit {self.limit}); wait for some to finish"},
                status_code=status.HTTP_429_TOO_MANY_REQUESTS,
                headers={"Retry-After": "1"},
            )
            await response(scope, receive, send)
            return
        self.in_flight[key] = self.in_flight.get(key, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight[key] -= 1
            if not self.in_flight[key]:
                del self.in_flight[key]


def nesting_depth(body: bytes) -> int:
    """The deepest [ / { nesting of a JSON text, strings skipped; linear, no recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


class BodyLimits:
    """Buffers a JSON or form body up to `max_bytes` (413 beyond), refuses JSON nested deeper than
    MAX_NESTING (422), then hands the body on. Uploads stream untouched, whatever their content type
    says (`curl --data-binary` labels a file as a form): the upload route enforces its own limits."""

    def __init__(self, app: ASGIApp, max_bytes: int, streamed_paths: tuple[str, ...] = ()):
        self.app = app
        self.max_bytes = max_bytes
        self.streamed_paths = streamed_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        content_type = dict(scope.get("headers", ())).get(b"content-type", b"").split(b";")[0].strip().lower()
        if scope["type"] != "http" or content_type not in CAPPED_TYPES or scope["path"] in self.streamed_paths:
            await self.app(scope, receive, send)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await _reply(
                    scope,
                    send,
                    status.HTTP_413_CONTENT_TOO_LARGE,
                    f"request body over {self.max_bytes} bytes; job requests are small JSON objects",
                )
                return
        if content_type == b"application/json" and nesting_depth(body) > MAX_NESTING:
            await _reply(scope, send, status.HTTP_422_UNPROCESSABLE_CONTENT, f"body: JSON nested deeper than {MAX_NESTING} levels")
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


async def _reply(scope: Scope, send: Send, code: int, detail: str) -> None:
    await JSONResponse({"detail": detail}, status_code=code)(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def register_validation_handler(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, err: RequestValidationError) -> JSONResponse:
        errors = list(err.errors())
        detail = [{"loc": list(e.get("loc", ())), "msg": _message(e), "type": e.get("type", "value_error")} for e in errors[:MAX_ERRORS]]
        if len(errors) > MAX_ERRORS:
            detail.append({"loc": ["body"], "msg": f"and {len(errors) - MAX_ERRORS} more errors", "type": "too_many_errors"})
        return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


def _message(error: dict) -> str:
    parts = [str(p) for p in error.get("loc", ())[1:]]  # without "body" / "query" / "path"
    field = ".".join(parts[1:] if parts[:1] == ["spec"] else parts)  # job-spec fields by their own names, as in --set
    text = "unknown field" if error.get("type") == "extra_forbidden" else str(error.get("msg", "invalid"))
    if error.get("type") == "json_invalid":
        text = f"not valid JSON: {json.dumps(error.get('ctx', {}).get('error', ''))[:80]}"
    message = f"{field}: {text}" if field else text
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 1] + "…"
