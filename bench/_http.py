"""A minimal asyncio HTTP/1.1 client for load generation: one keep-alive connection per object, one
request at a time, requests encoded once and reused. It reads Content-Length and chunked bodies and
server-sent events, which is all the service answers with.

Why not httpx: against the API's /healthz on this project's 2-core machine, httpx.AsyncClient spends
several times the CPU per request (`python -m bench.load_status --compare-clients` measures both), CPU
the server under test would lose."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from urllib.parse import urlsplit

HEAD_LIMIT = 64 * 1024
NO_BODY_STATUSES = {204, 304}


class HttpError(Exception):
    """The answer could not be read as HTTP/1.1, or the stream ended."""


class StreamEnded(HttpError):
    """The server finished a streamed response (or closed the connection) before the next event."""


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def split_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{url}: only http://host:port URLs are supported")
    return parts.hostname, parts.port or 80


def encode_head(method: str, path: str, host: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    status_line, *header_lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    version, _, rest = status_line.partition(" ")
    if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
        raise HttpError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(rest[:3]), headers


class Connection:
    """One keep-alive connection to host:port; `headers` go with every request (e.g. Authorization)."""

    def __init__(self, host: str, port: int, headers: dict[str, str] | None = None):
        self.host, self.port = host, port
        self.headers = headers or {}
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._get_heads: dict[str, bytes] = {}
        self._chunked = False  # the response being streamed has a chunked body
        self._stream_buffer = b""

    @classmethod
    def to(cls, url: str, headers: dict[str, str] | None = None) -> Connection:
        return cls(*split_url(url), headers)

    async def connect(self) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=HEAD_LIMIT)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()  # no lingering FIN handshake: load tests close thousands
        self.reader = self.writer = None
        self._stream_buffer = b""

    async def get(self, path: str) -> Response:
        head = self._get_heads.get(path)
        if head is None:
            head = self._get_heads[path] = encode_head("GET", path, self.host, self.headers)
        return await self._exchange(head)

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Response:
        extra = {"Content-Length": str(len(body))} if body or method in ("POST", "PUT", "PATCH") else {}
        return await self._exchange(encode_head(method, path, self.host, {**self.headers, **extra, **(headers or {})}) + body)

    async def _exchange(self, data: bytes) -> Response:
        await self.connect()
        self.writer.write(data)
        return await self.read_response()

    async def send_head(self, method: str, path: str, headers: dict[str, str] | None = None) -> None:
        """Start a request whose body follows with `send` (e.g. a slow upload)."""
        await self.connect()
        self.writer.write(encode_head(method, path, self.host, {**self.headers, **(headers or {})}))
        await self.writer.drain()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_response(self) -> Response:
        status, headers = await self._read_head()
        body = b"" if status in NO_BODY_STATUSES or 100 <= status < 200 else await self._read_body(headers)
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Response(status, headers, body)

    async def _read_head(self) -> tuple[int, dict[str, str]]:
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as err:
            self.close()
            raise HttpError("connection closed before a response") from err
        except asyncio.LimitOverrunError as err:
            self.close()
            raise HttpError("response head over 64 KiB") from err
        return parse_head(head)

    async def _chunks(self):
        while True:
            size_line = await self.reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                while await self.reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then the blank line
                    pass
                return
            chunk = await self.reader.readexactly(size + 2)
            yield chunk[:-2]

    # server-sent events

    async def open_stream(self, path: str) -> Response:
        """GET an event stream. A 200 answer leaves the body unread, for `next_event`; any other is read whole."""
        await self.connect()
        self.writer.write(encode_head("GET", path, self.host, {**self.headers, "Accept": "text/event-stream"}))
        status, headers = await self._read_head()
        if status != 200:
            body = await self._read_body(headers)
            if headers.get("connection", "").lower() == "close":
                self.close()
            return Response(status, headers, body)
        self._chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        self._stream_buffer = b""
        return Response(status, headers)

    async def _read_body(self, headers: dict[str, str]) -> bytes:
        if "content-length" in headers:
            return await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("transfer-encoding", "").lower() == "chunked":
            return b"".join([chunk async for chunk in self._chunks()])
        headers["connection"] = "close"  # a body delimited by the server closing the connection
        return await self.reader.read()

    async def next_event(self) -> str:
        """The next event of the open stream, without comment lines (keep-alives are skipped)."""
        while True:
            block, separator, rest = self._stream_buffer.partition(b"\n\n")
            if separator:
                self._stream_buffer = rest
                lines = [line for line in block.decode().split("\n") if line and not line.startswith(":")]
                if lines:
                    return "\n".join(lines)
                continue
            self._stream_buffer += await self._stream_data()

    async def _stream_data(self) -> bytes:
        try:
            if not self._chunked:
                data = await self.reader.read(65536)
                if not data:
                    raise StreamEnded("the server closed the stream")
                return data
            size_line = await self.reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                raise StreamEnded("the server ended the stream")
            return (await self.reader.readexactly(size + 2))[:-2]
        except asyncio.IncompleteReadError as err:
            raise StreamEnded("the server closed the stream") from err
