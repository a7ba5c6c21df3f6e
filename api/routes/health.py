"""Liveness, readiness (database and broker reachable) and Prometheus metrics. No API key needed."""

from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException, Response, status
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from core.db.session import database

from ..deps import OperatorDep, SettingsDep
from ..errors import responses
from ..metrics import REGISTRY, job_metrics

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The API process is alive")
async def health_live() -> dict:
    return {"status": "ok"}


async def _check_database(url: str) -> str | None:
    try:
        await database(url).arun(lambda session: session.execute(text("SELECT 1")))
    except Exception as err:
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return None


def _check_broker(url: str) -> str | None:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=3) as connection:
            connection.ensure_connection(max_retries=1, timeout=3)
    except Exception as err:
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return None


@router.get("/readyz", summary="Ready to serve: the database and the broker answer (details for the operator only)")
async def health_ready(settings: SettingsDep, operator: OperatorDep, response: Response) -> dict:
    started = time.perf_counter()
    problems = {
        "database": await _check_database(settings.resolved_database_url),
        "broker": await run_in_threadpool(_check_broker, settings.resolved_broker_url),
    }
    ready = not any(problems.values())
    response.status_code = status.HTTP_200_OK if ready else status.HTTP_503_SERVICE_UNAVAILABLE
    if not operator:  # which hosts failed, and how, is for the operator's eyes
        return {"status": "ready" if ready else "unavailable"}
    return {
        "status": "ready" if ready else "unavailable",
        "checks": {name: (problem or "ok") for name, problem in problems.items()},
        "seconds": round(time.perf_counter() - started, 3),
    }


@router.get(
    "/metrics",
    summary="Prometheus metrics (the operator's token: Authorization: Bearer $PEERAID_OPERATOR_TOKEN)",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **responses(401)},
)
def health_metrics(settings: SettingsDep, operator: OperatorDep) -> Response:
    if not operator:
        hint = "send the operator token" if settings.operator_token else "set PEERAID_OPERATOR_TOKEN to enable them"
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, f"metrics are for the operator: {hint}", headers={"WWW-Authenticate": "Bearer"})
    return Response(generate_latest(REGISTRY) + job_metrics(settings.resolved_database_url), media_type=CONTENT_TYPE_LATEST)
