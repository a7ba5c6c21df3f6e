"""The edge: what one request may make the API do before any route runs, decided once, in one place.

In order, for every HTTP request (`Edge`):
1. its head: a declared body (Content-Length) over the cap is refused (413) without reading a byte of it,
   whatever its content type; the web UI's forms (/ui/login, /ui/logout) take only a small
   application/x-www-form-urlencoded body (415 for any other type, multipart included, before the form is parsed);
2. the caller (`api.security.Caller`): the API key, however the Authorization header spells it, or on
   the web UI's pages (/ui) the session cookie; else the client's address;
3. requests in flight: at most `key_limit` per key (a key's web sessions count as the key, and together
   at most `session_limit`: a browser opens six connections to a site, and a page costs more than an API
   read), at most `address_limit` per client address for requests without a valid key or session (/healthz
   excepted), refused with 429 before any routing, parsing or database work beyond the key's own lookup;
4. the body, read up to the cap (413 beyond: a chunked body is cut there) and, when it could be parsed as
   JSON (application/json, application/*+json, or no type), refused nested deeper than MAX_NESTING (422).
Every 429 the API gives (these, and the routes' per-tenant limits) is held back `refusal_delay` seconds
before it is sent, so a client that retries at once cannot spin on refusals: a refused request costs the
API a sleeping coroutine, not a core. The dataset upload (POST /v1/datasets) alone streams past the cap:
its route checks the key before it reads a byte, then enforces the upload's own limits. Validation errors
are answered in a bounded body (the first errors, without echoing the input). So a hostile request costs
little memory and time."""

from __future__ import annotations

import asyncio
import email.message
import json
from collections import Counter
from typing import Literal

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.db import tenants
from core.db.session import Database
from core.db.tenants import TenantContext

from .errors import DATABASE_UNAVAILABLE, database_unavailable_response
from .security import CALLER, Caller, KeyCache, authenticate, bearer_token, digest, session_digest, session_tenant

MAX_NESTING = 32
MAX_ERRORS = 20
MAX_MESSAGE_CHARS = 300
FORM_TYPE = "application/x-www-form-urlencoded"


class InFlight:
    """Requests in flight per key of some kind (an API key's prefix, a client address), up to `limit` each."""

    def __init__(self, limit: int):
        self.limit = limit
        self.counts: Counter[str] = Counter()

    def acquire(self, key: str) -> bool:
        if self.counts[key] >= self.limit:
            return False
        self.counts[key] += 1
        return True

    def release(self, key: str) -> None:
        self.counts[key] -= 1
        if self.counts[key] <= 0:
            del self.counts[key]


def parsed_as_json(content_type: str) -> bool:
    """Whether FastAPI parses a body of this type as JSON: application/json and application/*+json, as its
    request handler decides (the same email.message parsing of the header)."""
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def nesting_depth(body: bytes | bytearray, limit: int | None = None) -> int:
    """The deepest [ / { nesting of a JSON text, strings skipped; linear, no recursion; with `limit`, it
    stops as soon as the depth passes it."""
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
            if depth > deepest:
                deepest = depth
                if limit is not None and deepest > limit:
                    break
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


class Edge:
    """See the module's docstring. `streamed`: (method, path) pairs whose bodies pass uncapped (the upload);
    `forms`: the paths of the web UI's forms, capped at `form_max_bytes`; `unlimited_paths`: never refused for
    their address (liveness probes)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        database: Database,
        key_cache: KeyCache,
        max_body_bytes: int,
        key_limit: int,
        address_limit: int,
        session_limit: int | None = None,
        streamed: tuple[tuple[str, str], ...] = (("POST", "/v1/datasets"),),
        forms: tuple[str, ...] = ("/ui/login", "/ui/logout"),
        form_max_bytes: int = 4096,
        session_cookie: str = "peeraid_session",
        unlimited_paths: tuple[str, ...] = ("/healthz",),
        refusal_delay: float = 0.0,
    ):
        self.app = app
        self.database = database
        self.key_cache = key_cache
        self.max_body_bytes = max_body_bytes
        self.by_key = InFlight(key_limit)
        self.by_address = InFlight(address_limit)
        self.by_session = InFlight(session_limit or key_limit)
        self.streamed = streamed
        self.forms = forms
        self.form_max_bytes = form_max_bytes
        self.session_cookie = session_cookie
        self.unlimited_paths = unlimited_paths
        self.refusal_delay = refusal_delay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.refusal_delay > 0:  # every 429, the routes' too, passes here
            send = _holding_back_429(send, self.refusal_delay)
        headers = Headers(scope=scope)
        path = scope["path"]
        streamed = (scope["method"], path) in self.streamed
        form = path in self.forms
        cap = self.form_max_bytes if form else self.max_body_bytes
        content_type = headers.get("content-type", "")

        # 1. the head alone
        if not streamed:
            declared = headers.get("content-length")
            if declared is not None and not declared.strip().isdigit():
                await _reply(scope, send, status.HTTP_400_BAD_REQUEST, f"Content-Length {declared[:40]!r} is not a number of bytes")
                return
            if declared is not None and int(declared) > cap:
                await _reply(scope, send, status.HTTP_413_CONTENT_TOO_LARGE, _too_large(cap, form))
                return
            media_type = content_type.split(";", 1)[0].strip().lower()
            if form and media_type not in ("", FORM_TYPE):
                await _reply(
                    scope,
                    send,
                    status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                    f"this form takes a small {FORM_TYPE} body, not {media_type[:80]}",
                )
                return

        # 2. the caller, and 3. its places among the requests in flight
        client = scope.get("client")
        address = client[0] if client else "unknown"
        web = path == "/ui" or path.startswith("/ui/")  # the web UI's pages know their caller by the session cookie alone
        token = None if web else bearer_token(headers.get("authorization"))
        cookie = cookie_parser(headers.get("cookie", "")).get(self.session_cookie) if web else None
        admitted = await self._admit(scope, send, address, path, token, cookie)
        if admitted is None:
            return
        tenant, places = admitted
        via: Literal["key", "session"] | None = None if tenant is None else "session" if cookie else "key"
        scope[CALLER] = Caller(address=address, tenant=tenant, via=via, token=token)

        try:
            if streamed:
                await self.app(scope, receive, send)
                return
            # 4. the body, up to the cap
            body = bytearray()
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # the client left before its body ended
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > cap:
                    await _reply(scope, send, status.HTTP_413_CONTENT_TOO_LARGE, _too_large(cap, form))
                    return
            if body and (not content_type or parsed_as_json(content_type)) and nesting_depth(body, MAX_NESTING) > MAX_NESTING:
                await _reply(scope, send, status.HTTP_422_UNPROCESSABLE_CONTENT, f"body: JSON nested deeper than {MAX_NESTING} levels")
                return
            await self.app(scope, _replay(bytes(body), receive), send)
        finally:
            for counts, key in places:
                counts.release(key)

    async def _admit(
        self, scope: Scope, send: Send, address: str, path: str, token: str | None, cookie: str | None
    ) -> tuple[TenantContext | None, list[tuple[InFlight, str]]] | None:
        """The caller's tenant (or None) and the places its request now holds among those in flight; None when it
        was refused (and answered 429). An API key is remembered (KeyCache); a web session is looked up on every
        page. A lookup itself happens within an in-flight limit: a credential valid lately within its key's (and
        a session within its key's sessions'), so a busy key's requests are refused without one; any other within
        its address's, so made-up keys cost a bounded few lookups at once."""
        places: list[tuple[InFlight, str]] = []

        async def take(*wanted: tuple[InFlight, str]) -> bool:
            for counts, key in wanted:
                if not counts.acquire(key):
                    for taken, taken_key in places:
                        taken.release(taken_key)
                    places.clear()
                    await _reply_busy(scope, send, self._busy(counts))
                    return False
                places.append((counts, key))
            return True

        def wanted_for(key_prefix: str | None) -> list[tuple[InFlight, str]]:
            if key_prefix is None:
                return [] if path in self.unlimited_paths else [(self.by_address, address)]
            return [(self.by_key, key_prefix), *([(self.by_session, key_prefix)] if cookie else [])]

        tenant = None
        credential = session_digest(cookie) if cookie else digest(token) if token and tenants.key_prefix(token) else None
        if path in self.unlimited_paths:
            credential = None  # a liveness probe needs no caller, and is never refused
        if credential is not None and not cookie:
            tenant = self.key_cache.get(credential)
        if credential is not None and tenant is None:
            known_key = self.key_cache.seen(credential)
            if not await take(*(wanted_for(known_key) if known_key is not None else [(self.by_address, address)])):
                return None
            try:
                if cookie:
                    tenant = await session_tenant(self.database, cookie, self.key_cache)
                else:
                    assert token is not None
                    tenant = await authenticate(self.database, token, self.key_cache)
            except BaseException as err:
                for counts, key in places:
                    counts.release(key)
                if isinstance(err, DATABASE_UNAVAILABLE):  # the key cannot be checked now: 503, as the routes answer
                    await database_unavailable_response(scope["method"], path, err)(scope, _no_receive, send)
                    return None
                raise
        wanted = wanted_for(tenant.key_prefix if tenant is not None else None)
        if places != wanted:
            for counts, key in places:
                counts.release(key)
            places.clear()
            if not await take(*wanted):
                return None
        return tenant, places

    def _busy(self, counts: InFlight) -> str:
        if counts is self.by_key:
            return self._key_busy()
        if counts is self.by_session:
            return self._session_busy()
        return self._address_busy()

    def _key_busy(self) -> str:
        return (
            f"too many requests in flight with this API key (limit {self.by_key.limit}, its web sessions included); wait for some to finish"
        )

    def _session_busy(self) -> str:
        return f"too many web pages in flight for this API key's sessions (limit {self.by_session.limit}); wait for some to finish"

    def _address_busy(self) -> str:
        return (
            f"too many requests in flight without a valid API key from this address (limit {self.by_address.limit}); "
            "send your key (Authorization: Bearer <key>) or wait for some to finish"
        )


def _too_large(cap: int, form: bool) -> str:
    if form:
        return f"request body over {cap} bytes: this form is small (an API key)"
    return f"request body over {cap} bytes; job requests are small JSON objects (datasets are uploaded to POST /v1/datasets)"


def _holding_back_429(send: Send, delay: float) -> Send:
    async def held_back(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] == status.HTTP_429_TOO_MANY_REQUESTS:
            await asyncio.sleep(delay)
        await send(message)

    return held_back


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body read already, as one message; then the client's own messages (its disconnect)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _reply(scope: Scope, send: Send, code: int, detail: str, headers: dict[str, str] | None = None) -> None:
    await JSONResponse({"detail": detail}, status_code=code, headers=headers)(scope, _no_receive, send)


async def _reply_busy(scope: Scope, send: Send, detail: str) -> None:
    await _reply(scope, send, status.HTTP_429_TOO_MANY_REQUESTS, detail, {"Retry-After": "1"})


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
