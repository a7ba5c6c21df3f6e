"""Error bodies in FastAPI's own validation shape, so clients parse one format:
{"detail": [{"loc": [...], "msg": "...", "type": "..."}]} for field errors, {"detail": "..."} otherwise."""

from __future__ import annotations

from fastapi import HTTPException, status


def field_errors(errors: list[tuple[str, str]], code: int = status.HTTP_422_UNPROCESSABLE_CONTENT) -> HTTPException:
    detail = [
        {"loc": ["body", *(field.split(".") if field else [])], "msg": f"{field}: {message}" if field else message, "type": "value_error"}
        for field, message in errors
    ]
    return HTTPException(code, detail)
