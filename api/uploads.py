"""The file of an upload as a stream of bytes, whichever way it is sent: the raw request body
(`curl --data-binary @f.zip`), or the file part of a multipart/form-data body (`curl -F file=@f.zip`,
a browser form). Multipart is parsed as it arrives, so neither way holds the file in memory."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from fastapi import HTTPException, status
from python_multipart.multipart import MAX_BOUNDARY_LENGTH, MultipartParser, parse_options_header

UNSAFE_FILE_NAME_CHARACTERS = re.compile(r"[^\w.\- ]")


class IncomingFile:
    """`chunks()` yields the file's bytes; `filename` is known once they start to arrive."""

    def __init__(self, body: AsyncIterator[bytes], content_type: str, filename: str | None):
        self.body = body
        self.filename = filename
        media_type, options = parse_options_header(content_type)
        self.boundary: bytes | None = options.get(b"boundary") if media_type == b"multipart/form-data" else None

    @property
    def multipart(self) -> bool:
        return self.boundary is not None

    async def chunks(self) -> AsyncIterator[bytes]:
        if self.boundary is None:
            async for chunk in self.body:
                yield chunk
            return
        async for chunk in self._file_part(self.boundary):
            yield chunk

    async def _file_part(self, boundary: bytes) -> AsyncIterator[bytes]:
        """The data of the first part that carries a file name (a form's file field), as it is parsed."""
        ready: list[bytes] = []
        headers: dict[bytes, bytes] = {}
        field: list[bytes] = []
        state = {"in_file": False, "seen_file": False}

        def on_part_begin() -> None:
            headers.clear()

        def on_header_field(data: bytes, start: int, end: int) -> None:
            field.append(data[start:end])

        def on_header_value(data: bytes, start: int, end: int) -> None:
            name = b"".join(field).lower()
            headers[name] = headers.get(name, b"") + data[start:end]

        def on_header_end() -> None:
            field.clear()

        def on_headers_finished() -> None:
            _, options = parse_options_header(headers.get(b"content-disposition", b""))
            state["in_file"] = not state["seen_file"] and b"filename" in options
            if state["in_file"]:
                state["seen_file"] = True
                if self.filename is None:
                    self.filename = safe_file_name(options[b"filename"].decode("utf-8", "replace"))

        def on_part_data(data: bytes, start: int, end: int) -> None:
            if state["in_file"]:
                ready.append(bytes(data[start:end]))

        def on_part_end() -> None:
            state["in_file"] = False

        if len(boundary) > MAX_BOUNDARY_LENGTH:  # the parser refuses it with an error of its own, as a 500 had it escaped
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"malformed multipart body: its boundary is {len(boundary)} characters long, over the {MAX_BOUNDARY_LENGTH} "
                "accepted (RFC 2046 allows 70)",
            )
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": on_part_begin,
                "on_header_field": on_header_field,
                "on_header_value": on_header_value,
                "on_header_end": on_header_end,
                "on_headers_finished": on_headers_finished,
                "on_part_data": on_part_data,
                "on_part_end": on_part_end,
            },
        )
        async for chunk in self.body:
            try:
                parser.write(chunk)
            except Exception as err:  # python-multipart raises its own errors for malformed bodies
                raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"malformed multipart body: {err}") from None
            while ready:
                yield ready.pop(0)
        parser.finalize()
        if not state["seen_file"]:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                "the multipart body has no file: send it as a file field, e.g. curl -F file=@data.zip",
            )


def safe_file_name(name: str) -> str:
    """A client's file name as the service keeps it: its last path component, in letters, digits, '.', '-', '_' and spaces."""
    base = re.split(r"[\\/]", name)[-1]
    return UNSAFE_FILE_NAME_CHARACTERS.sub("_", base)[:200] or "upload"
