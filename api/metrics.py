"""Prometheus metrics of the API: request counts and latencies by route, and jobs by status."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request

from core.db.models import JOB_STATUSES, Job
from core.db.session import session_factory

REGISTRY = CollectorRegistry()
REQUESTS = Counter("peeraid_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=REGISTRY)
LATENCY = Histogram(
    "peeraid_http_request_seconds", "HTTP request latency", ["method", "route"], registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


class JobCollector:
    """Jobs per status, read from the database at scrape time (the database is the source of truth)."""

    def __init__(self, database_url: str):
        self.database_url = database_url

    def collect(self):
        gauge = GaugeMetricFamily("peeraid_jobs", "Jobs by status", labels=["status"])
        counts = dict.fromkeys(JOB_STATUSES, 0)
        try:
            with session_factory(self.database_url)() as session:
                counts.update(dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all()))
        except Exception:
            return
        for job_status, count in counts.items():
            gauge.add_metric([job_status], count)
        yield gauge


def register_job_collector(database_url: str) -> None:
    if not any(isinstance(c, JobCollector) for c in list(REGISTRY._collector_to_names)):
        REGISTRY.register(JobCollector(database_url))


class MetricsMiddleware(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        LATENCY.labels(request.method, path).observe(time.perf_counter() - started)
        REQUESTS.labels(request.method, path, str(response.status_code)).inc()
        return response
