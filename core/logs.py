"""Logging for the API and the workers: plain text, or one JSON object per line (PEERAID_LOG_JSON=1).

Records carry the id of the job being worked on (set with `job_context`), so a job's lines can be
found across the API and every worker."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from contextlib import contextmanager

current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar("current_job", default=None)


@contextmanager
def job_context(job_id: str):
    token = current_job.set(job_id)
    try:
        yield
    finally:
        current_job.reset(token)


class JobIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = getattr(record, "job_id", None) or current_job.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if job_id := getattr(record, "job_id", None):  # set by job_context's filter
            entry["job_id"] = job_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        job_id = getattr(record, "job_id", None)
        return text if not job_id else f"{text} [job={job_id}]"


def configure(level: str = "INFO", json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(JobIdFilter())
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
