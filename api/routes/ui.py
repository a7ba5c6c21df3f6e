"""A small server-rendered web UI: sign in with an API key, follow your jobs, see curves and metrics, download artifacts.

Signing in starts a server-side session whose token (never the key) is kept in an HttpOnly, SameSite=Strict
cookie (path /ui), marked Secure when served over HTTPS; serve the UI over HTTPS in production, since the
token stands for the key until the session ends. The edge (api.request_limits) looks the session up on every
page, counts the page among its key's requests in flight, and lets the sign-in form take only a small
urlencoded body."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import jinja2
from fastapi import APIRouter, Depends, Form, Query, Request, Response, status
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from starlette.datastructures import URL
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.db import jobs as job_rows
from core.db import tenants
from core.db.models import ACTIVE_STATUSES, Job
from core.db.tenants import TenantContext
from core.engine.report import MODEL_LABELS, metric_label, per_class_table
from core.settings import Settings
from core.text import format_duration

from ..deps import UI_COOKIE, ArtifactName, CpuWorkDep, DatabaseDep, SettingsDep, StorageDep, UIOwnedJob, UITenantDep, ui_signed_in
from ..schemas import JOB_LISTING
from ..security import authenticate
from .artifacts import artifact_file
from .curves import curves_png

PAGE_SIZE = 50
UI_SESSION_LIFETIME = dt.timedelta(hours=12)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _percent(value: Any) -> str:
    return f"{value * 100:.1f}%" if isinstance(value, int | float) and math.isfinite(value) else "–"


def _when(value: dt.datetime | None) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "–"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).resolve().parents[1] / "templates"), autoescape=True)
env.filters.update(percent=_percent, duration=format_duration, when=_when, size=_size, metric_label=metric_label)
templates = Jinja2Templates(env=env)


def page(request: Request, name: str, context: dict[str, Any] | None = None, status_code: int = 200) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context or {}, status_code=status_code, headers=SECURITY_HEADERS)


class PageRoute(APIRoute):
    """Errors of UI routes as pages: a missing or stale sign-in goes to the sign-in form, others get error.html."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except StarletteHTTPException as err:
                if err.status_code == status.HTTP_401_UNAUTHORIZED:
                    response = RedirectResponse(path_to(request, "ui_home"), status.HTTP_303_SEE_OTHER)
                    if UI_COOKIE in request.cookies:  # an expired session or a revoked key: forget it
                        _forget_session(response)
                    return response
                return page(request, "error.html", {"status_code": err.status_code, "detail": err.detail}, err.status_code)

        return route_handler


def _forget_session(response: Response) -> Response:
    response.delete_cookie(UI_COOKIE, path="/ui", httponly=True, samesite="strict")
    return response


def path_to(request: Request, route: str, /, **params: Any) -> URL:
    """A page's path, never an absolute URL: links and redirects do not depend on the Host header."""
    return URL(str(request.app.url_path_for(route, **params)))


@jinja2.pass_context
def _url_for(context: dict[str, Any], route: str, /, **params: Any) -> URL:
    return path_to(context["request"], route, **params)


templates.env.globals["url_for"] = _url_for


router = APIRouter(prefix="/ui", include_in_schema=False, route_class=PageRoute)


@router.get("", name="ui_home")
async def home(request: Request, tenant: Annotated[TenantContext | None, Depends(ui_signed_in)]) -> Response:
    if tenant is not None:
        return RedirectResponse(path_to(request, "ui_jobs"), status.HTTP_303_SEE_OTHER)
    return page(request, "login.html")


def _same_site(request: Request, settings: Settings) -> bool:
    """A state-changing form must come from one of our own pages: its Origin (or, without one, its Referer)
    is the configured public URL's origin. A missing or `null` origin is refused (login CSRF would sign a
    victim in with the attacker's key; a forged sign-out would end their session)."""
    origin = request.headers.get("origin") or _origin_of(request.headers.get("referer"))
    return origin is not None and origin in trusted_origins(settings)


def _origin_of(url: str | None) -> str | None:
    parts = urlsplit(url or "")
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else None


def trusted_origins(settings: Settings) -> set[str]:
    public = _origin_of(settings.resolved_public_url)
    origins = {public} if public else set()
    if settings.public_url is None and settings.api_host in ("127.0.0.1", "localhost"):  # the local default: both names work
        origins |= {f"http://127.0.0.1:{settings.api_port}", f"http://localhost:{settings.api_port}"}
    return origins


def _refused(request: Request, what: str) -> Response:
    return page(request, "error.html", {"status_code": 403, "detail": f"{what} from another site refused"}, status.HTTP_403_FORBIDDEN)


@router.post("/login", name="ui_login")
async def login(request: Request, db: DatabaseDep, settings: SettingsDep, api_key: Annotated[str, Form(max_length=256)] = "") -> Response:
    if not _same_site(request, settings):
        return _refused(request, "sign-in")
    tenant = await authenticate(db, api_key.strip()) if api_key.strip() else None
    if tenant is None:
        return page(request, "login.html", {"error": "That API key is not valid or has been revoked."}, status.HTTP_401_UNAUTHORIZED)
    token = await db.arun(lambda session: tenants.start_ui_session(session, tenant, UI_SESSION_LIFETIME))
    response = RedirectResponse(path_to(request, "ui_jobs"), status.HTTP_303_SEE_OTHER)
    response.set_cookie(
        UI_COOKIE,
        token,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=settings.resolved_public_url.startswith("https://"),
        max_age=int(UI_SESSION_LIFETIME.total_seconds()),
    )
    return response


@router.post("/logout", name="ui_logout")
async def logout(request: Request, db: DatabaseDep, settings: SettingsDep) -> Response:
    if not _same_site(request, settings):
        return _refused(request, "sign-out")
    token = request.cookies.get(UI_COOKIE)
    if token:
        await db.arun(lambda session: tenants.end_ui_session(session, token))
    return _forget_session(RedirectResponse(path_to(request, "ui_home"), status.HTTP_303_SEE_OTHER))


@router.get("/jobs", name="ui_jobs")
async def jobs_page(
    request: Request, db: DatabaseDep, tenant: UITenantDep, page_number: Annotated[int, Query(alias="page", ge=1, le=10**6)] = 1
) -> Response:
    total, jobs = await JOB_LISTING.page(db, tenant.id, None, PAGE_SIZE, (page_number - 1) * PAGE_SIZE)
    return page(
        request,
        "jobs.html",
        {
            "tenant": tenant,
            "jobs": jobs,
            "total": total,
            "page": page_number,
            "pages": max(1, math.ceil(total / PAGE_SIZE)),
            "refresh": any(j["status"] in ACTIVE_STATUSES for j in jobs),
        },
    )


def _per_class_tables(job: Job) -> list[tuple[str, list[str], list[tuple[str, str, list[Any]]]]]:
    """Per model of the report: (label, metric keys, rows of (class, its test images, accuracy per metric))."""
    tables = []
    for key, metrics in (job.result or {}).items():
        columns, rows = per_class_table(metrics, job.evaluation or {})
        if rows:
            shown = [(name, f"{n}" if aa is None else f"{n} ({aa} AutoAttack)", values) for name, n, aa, values in rows]
            tables.append((MODEL_LABELS.get(key, key), columns, shown))
    return tables


@router.get("/jobs/{job_id}", name="ui_job")
async def job_page(job: UIOwnedJob, request: Request, tenant: UITenantDep, db: DatabaseDep) -> Response:
    artifacts = await db.arun(lambda session: job_rows.artifacts(session, job.id))
    result = job.result or {}
    return page(
        request,
        "job.html",
        {
            "tenant": tenant,
            "job": job,
            "artifacts": artifacts,
            "spec": json.dumps(job.spec, indent=2),
            "metric_keys": list(dict.fromkeys(k for m in result.values() for k in m.get("test") or {})),
            "same_images": [
                (MODEL_LABELS.get(key, key), m["test_on_autoattack_images"])
                for key, m in result.items()
                if m.get("test_on_autoattack_images")
            ],
            "per_class": _per_class_tables(job),
            "model_labels": {key: MODEL_LABELS.get(key, key) for key in result},
            "refresh": job.status in ACTIVE_STATUSES,
            "version": int(job.updated_at.timestamp()),
        },
    )


@router.get("/jobs/{job_id}/curves.png", name="ui_job_curves")
async def job_curves(job: UIOwnedJob, request: Request, db: DatabaseDep, cpu_work: CpuWorkDep) -> Response:
    return await curves_png(request, db, cpu_work, job)


@router.get("/jobs/{job_id}/artifacts/{name}", name="ui_artifact")
async def download(job: UIOwnedJob, name: ArtifactName, db: DatabaseDep, storage: StorageDep) -> FileResponse:
    return await artifact_file(db, storage, job, name)
