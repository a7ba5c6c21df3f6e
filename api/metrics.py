"""Prometheus metrics of the API: request counts and latencies by route, and jobs by status."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.db.models import Job, JobStatus
from core.db.session import database

REGISTRY = CollectorRegistry()
REQUESTS = Counter("peeraid_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=REGISTRY)
LATENCY = Histogram(
    "peeraid_http_request_seconds",
    "HTTP request latency",
    ["method", "route"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


class JobCollector:
    """Jobs per status, read from the database at scrape time (the database is the source of truth)."""

    def __init__(self, database_url: str):
        self.database_url = database_url

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("peeraid_jobs", "Jobs by status", labels=["status"])
        counts: dict[str, int] = dict.fromkeys(JobStatus, 0)
        try:
            with database(self.database_url).transaction() as session:
                counts.update({status: count for status, count in session.execute(select(Job.status, func.count()).group_by(Job.status))})
        except Exception:
            return
        for job_status, count in counts.items():
            gauge.add_metric([job_status], count)
        yield gauge


def job_metrics(database_url: str) -> bytes:
    """The jobs gauge of this app's database, in the exposition format (a registry per scrape: the request
    metrics' registry is the process's, and several apps with their own databases may share a process)."""
    registry = CollectorRegistry()
    registry.register(JobCollector(database_url))
    return generate_latest(registry)


class MetricsMiddleware:
    """Counts and times every request by its route template (a plain ASGI middleware: no per-request task)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            LATENCY.labels(scope["method"], route).observe(time.perf_counter() - started)
            REQUESTS.labels(scope["method"], route, str(status_code)).inc()
