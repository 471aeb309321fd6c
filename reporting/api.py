"""The usage HTTP API and dashboard (FastAPI).  ``tokenmeter api`` serves it.

Every endpoint needs ``Authorization: Bearer $TOKENMETER_API_TOKEN`` (at least 16
characters); a browser signs in to the dashboard with a form or a one-time link, which set an
HttpOnly cookie (``web.py``).  Without a configured token the app refuses to start, unless it
is explicitly built with ``require_auth=False`` (``tokenmeter api --no-auth``: loopback only).
Money is serialised as exact decimal strings; an unknown cost is ``null``.

Dates: ISO 8601 dates or datetimes; naive means UTC; a bare ``end_date`` day is included (the
window ends at the next midnight).  Windows are half-open ``[start, end)``.
"""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime, timedelta
from typing import Literal

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from tokenmeter.db import get_engine
from tokenmeter.schemas import FromRow, MoneyJSON, OpenAICallSchema, UsageGroup
from tokenmeter.settings import TokenmeterSettings, get_settings

from . import dashboard, queries, web

GroupBy = Literal["model", "task", "kind", "day", "status", "tier", "project"]


class SummaryResponse(BaseModel):
    start: datetime
    end: datetime
    group_by: GroupBy
    groups: list[UsageGroup]
    total: UsageGroup


class ScopeUsage(FromRow):
    """One scope's usage (reporting.queries.ScopeRow)."""

    kind: str
    ref: str
    calls: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    image_count: int
    cost_usd: MoneyJSON | None  # None when some of its calls have no known price
    unpriced_calls: int
    first_call_at: datetime
    last_call_at: datetime
    cache_write_tokens: int = 0
    input_audio_tokens: int = 0
    output_audio_tokens: int = 0
    web_search_calls: int = 0
    file_search_calls: int = 0


class ScopesResponse(BaseModel):
    start: datetime
    end: datetime
    scopes: list[ScopeUsage]


class ScopeResponse(BaseModel):
    kind: str
    ref: str
    calls: list[OpenAICallSchema]


class CallsResponse(BaseModel):
    items: list[OpenAICallSchema]
    total: int
    page: int
    page_size: int


def parse_when(value: str | None, *, end: bool, name: str) -> datetime | None:
    """ISO date or datetime -> aware UTC datetime (a bare end date includes that day); a 422
    saying what is wrong otherwise."""
    if value is None:
        return None
    try:
        return queries.parse_moment(value, end=end, name=name)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


def window(start_date: str | None, end_date: str | None) -> tuple[datetime, datetime]:
    end = parse_when(end_date, end=True, name="end_date") or datetime.now(UTC)
    start = parse_when(start_date, end=False, name="start_date") or max(
        end - timedelta(days=7), queries.EARLIEST
    )
    if end <= start:
        raise HTTPException(422, "end_date must be after start_date")
    return start, end


class AuditDifference(BaseModel):
    """One difference of an audit: a measure in a bucket and group, each side's figure."""

    bucket_start: str  # ISO 8601, UTC
    group: list[str | bool | None]
    what: str  # requests, input_tokens, cached_input_tokens, output_tokens or usd
    provider: str  # decimal text (dollars are exact decimals, never floats)
    ledger: str
    kind: str  # unmetered, missing upstream, usage unknown or priced differently


class AuditResponse(BaseModel):
    """The last ``tokenmeter audit`` run: what it compared and what it found."""

    created_at: datetime
    window_start: datetime
    window_end: datetime
    bucket: str
    group_by: list[str]
    compared_buckets: int
    skipped_open_buckets: int
    clean: bool
    differences: int
    worst: AuditDifference | None


def create_app(settings: TokenmeterSettings | None = None, *, require_auth: bool = True) -> FastAPI:
    settings = settings or get_settings()
    sign_in = web.SignIn(web.check_token(settings.tokenmeter_api_token)) if require_auth else None
    app = FastAPI(
        title="tokenmeter usage API",
        version="0.1.0",
        description="Exact OpenAI token and cost usage recorded by tokenmeter.",
        docs_url=None,  # served below from local files: the default loads a CDN
        redoc_url=None,
    )
    app.state.sign_in = sign_in
    app.add_middleware(web.SecurityHeaders, loopback_only=not require_auth)
    bearer = HTTPBearer(auto_error=False)  # (declares the scheme in the OpenAPI schema)

    def bearer_ok(request: Request) -> bool:
        scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
        return (
            sign_in is not None
            and scheme.lower() == "bearer"
            and bool(given.strip())
            and sign_in.token_matches(web.header_bytes(given.strip()))
        )

    async def authorized(  # no I/O: run on the event loop, not in the thread pool
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    ) -> None:
        if sign_in is None or bearer_ok(request):
            return
        detail = "missing or wrong bearer token"
        if "token" in request.query_params:
            detail = (
                "send the token as 'Authorization: Bearer <token>'; ?token= is not accepted "
                "(URLs end up in logs)"
            )
        raise HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})

    def signed_in(request: Request) -> bool:
        return (
            sign_in is None
            or sign_in.cookie_matches(request.cookies.get(web.COOKIE))
            or bearer_ok(request)
        )

    def session_cookie(request: Request) -> RedirectResponse:
        assert sign_in is not None
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            web.COOKIE,
            sign_in.cookie_value,
            max_age=8 * 3600,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    def reading() -> Session:
        """A session on the read-only engine, opened and closed inside the endpoint's own
        thread: one thread-pool hop per request, and a connection never waits on a hop."""
        return Session(get_engine(settings.ledger_url, readonly=True))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        messages = [f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": "; ".join(messages)})

    auth = [Depends(authorized)]

    answers = web.AnswerCache(settings.tokenmeter_api_cache_s)

    def summary_body(
        start_date: str | None,
        end_date: str | None,
        group_by: GroupBy,
        model: str | None,
        task: str | None,
    ) -> bytes:
        with reading() as session:
            start, end = window(start_date, end_date)
            rows = queries.usage_summary(session, start, end, group_by, model=model, task=task)
            body = SummaryResponse(
                start=start,
                end=end,
                group_by=group_by,
                groups=[UsageGroup.model_validate(r) for r in rows],
                total=UsageGroup.model_validate(queries.total_of(rows)),
            )
        # serialised once, here (returned as a model, FastAPI would validate it again)
        return body.model_dump_json().encode()

    @app.get("/api/usage/summary", response_model=SummaryResponse, dependencies=auth)
    async def summary(
        start_date: str | None = Query(None, description="ISO date/datetime; default: end - 7d"),
        end_date: str | None = Query(None, description="ISO date/datetime; default: now"),
        group_by: GroupBy = Query("model"),
        model: str | None = Query(None, max_length=128, description="only this billed model"),
        task: str | None = Query(None, max_length=255, description="only this task name"),
    ) -> Response:
        """Totals and exact cost per group over a half-open window.  The same query asked
        again within ``TOKENMETER_API_CACHE_S`` (1 s) gets the same answer, from memory: its
        ``start`` and ``end`` say which window it covers."""
        key = (start_date, end_date, group_by, model, task)
        # the database is read in the thread pool, never on the event loop
        body = await answers.answer(key, lambda: run_in_threadpool(summary_body, *key))
        return Response(body, media_type="application/json")

    @app.get("/api/usage/scopes", response_model=ScopesResponse, dependencies=auth)
    def scopes(
        start_date: str | None = None,
        end_date: str | None = None,
        kind: str | None = Query(None, max_length=255, description="only this scope kind"),
        limit: int = Query(10, ge=1, le=1000),
    ) -> ScopesResponse:
        """The most expensive scopes (pipeline runs, scanned posts...) in the window."""
        with reading() as session:
            start, end = window(start_date, end_date)
            rows = queries.top_scopes(session, start, end, kind=kind, limit=limit)
            return ScopesResponse(
                start=start, end=end, scopes=[ScopeUsage.model_validate(r) for r in rows]
            )

    @app.get("/api/usage/scopes/{kind}/{ref}", response_model=ScopeResponse, dependencies=auth)
    def scope(
        kind: str = Path(min_length=1, max_length=255, description="scope kind"),
        ref: str = Path(min_length=1, max_length=4096, description="scope reference"),
    ) -> ScopeResponse:
        """Every call of one scope, all attempts, oldest first."""
        with reading() as session:
            calls = queries.scope_calls(session, kind, ref)
            if not calls:
                raise HTTPException(404, f"no calls recorded in scope {kind}/{ref}")
            return ScopeResponse(
                kind=kind, ref=ref, calls=[OpenAICallSchema.model_validate(c) for c in calls]
            )

    @app.get("/api/usage/calls", response_model=CallsResponse, dependencies=auth)
    def calls(
        start_date: str | None = None,
        end_date: str | None = None,
        model: str | None = None,
        task: str | None = None,
        status: str | None = None,
        scope_kind: str | None = None,
        page: int = Query(1, ge=1, le=1_000_000),
        page_size: int = Query(50, ge=1, le=500),
    ) -> CallsResponse:
        """The ledger, newest first, filtered and paginated."""
        with reading() as session:
            start, end = window(start_date, end_date)
            found = queries.list_calls(
                session,
                start,
                end,
                model=model,
                task=task,
                status=status,
                scope_kind=scope_kind,
                page=page,
                page_size=page_size,
            )
            return CallsResponse(
                items=[OpenAICallSchema.model_validate(c) for c in found.items],
                total=found.total,
                page=found.page,
                page_size=found.page_size,
            )

    @app.get("/api/usage/audits/latest", response_model=AuditResponse, dependencies=auth)
    def latest_audit() -> AuditResponse:
        """The last ``tokenmeter audit``: its window, verdict and worst difference."""
        with reading() as session:
            found = last_audit(session)
            if found is None:
                raise HTTPException(404, "no audit yet: run `tokenmeter audit`")
            return found

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def overview(
        request: Request,
        days: int = Query(30, ge=1, le=366),
        start_date: str | None = Query(None, max_length=40),
        end_date: str | None = Query(None, max_length=40),
        group_by: str = Query("model", pattern="^(model|task|kind|tier|project|status)$"),
    ) -> HTMLResponse:
        if not signed_in(request):
            return HTMLResponse(sign_in_page(), status_code=401)
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        if start_date or end_date:
            start, end = window(start_date, end_date)
            if end - start > timedelta(days=366):
                raise HTTPException(422, "the dashboard shows at most 366 days")
            days_text = f"{start:%Y-%m-%d} to {end:%Y-%m-%d} (UTC)"
        else:  # whole UTC days, today's included: read from the daily totals alone
            end = today + timedelta(days=1)
            start = end - timedelta(days=days)
            days_text = f"last {days} days (UTC, today included)"
        with reading() as session:
            spent = queries.usage_summary(session, today, today + timedelta(days=1), "none")[0]
            return HTMLResponse(
                dashboard.overview(
                    session,
                    start,
                    end,
                    group_by,
                    _audit_panel(last_audit(session)),
                    settings.tokenmeter_daily_budget_usd,
                    spent.priced_cost_usd,
                    sign_in is not None,
                    days_text,
                )
            )

    @app.get("/scopes/{kind}/{ref}", response_class=HTMLResponse, include_in_schema=False)
    def scope_detail(
        request: Request,
        kind: str = Path(min_length=1, max_length=255),
        ref: str = Path(min_length=1, max_length=4096),
    ) -> HTMLResponse:
        if not signed_in(request):
            return HTMLResponse(sign_in_page(), status_code=401)
        with reading() as session:
            calls = queries.scope_calls(session, kind, ref)
        if not calls:
            raise HTTPException(404, f"no calls recorded in scope {kind}/{ref}")
        return HTMLResponse(dashboard.scope_page(kind, ref, calls, sign_in is not None))

    @app.post("/login", response_class=HTMLResponse, include_in_schema=False)
    async def login(request: Request) -> Response:
        """The sign-in form's POST: the token in the body (never in a URL)."""
        from urllib.parse import parse_qs

        if sign_in is None:
            return RedirectResponse("/", status_code=303)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > 4096:
                return HTMLResponse(sign_in_page("that is not a token"), status_code=413)
        given = parse_qs(body.decode("utf-8", "replace")).get("token", [""])[0]
        if given and sign_in.token_matches(given.encode("utf-8")):
            return session_cookie(request)
        return HTMLResponse(sign_in_page("wrong token"), status_code=401)

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_once(request: Request, once: str = Query("", max_length=64)) -> Response:
        """A one-time sign-in link (``tokenmeter api`` prints one): used once, then dead."""
        if sign_in is None:
            return RedirectResponse("/", status_code=303)
        if once and sign_in.redeem_once(once):
            return session_cookie(request)
        return HTMLResponse(
            sign_in_page("this sign-in link was used already or has expired"), status_code=401
        )

    @app.post("/logout", include_in_schema=False)
    def logout() -> Response:
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(web.COOKIE, path="/")
        return response

    docs_files = _swagger_ui_files()
    app.mount("/docs/assets", StaticFiles(directory=docs_files), name="docs-assets")

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(DOCS_PAGE)

    @app.get("/docs/init.js", include_in_schema=False)
    def docs_init() -> Response:
        return Response(DOCS_INIT, media_type="text/javascript")

    return app


DOCS_PAGE = (
    '<!doctype html><html lang="en"><head><meta charset="utf-8">'
    "<title>tokenmeter usage API</title>"
    '<link rel="stylesheet" href="/docs/assets/swagger-ui.css"></head><body>'
    '<div id="swagger-ui"></div><script src="/docs/assets/swagger-ui-bundle.js"></script>'
    '<script src="/docs/init.js"></script></body></html>'
)
DOCS_INIT = 'window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});\n'


def _swagger_ui_files() -> str:
    """Swagger UI's files, from the swagger-ui-bundle package (offline, no CDN)."""
    from swagger_ui_bundle import swagger_ui_path

    return str(swagger_ui_path)


def sign_in_page(problem: str | None = None) -> str:
    """The dashboard's sign-in form: the token goes in a POST body, never in a URL."""
    note = f'<p id="problem">{html.escape(problem)}</p>' if problem else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        "<title>tokenmeter: sign in</title></head><body><h1>tokenmeter</h1>"
        f'{note}<form method="post" action="/login"><label>API token '
        '<input type="password" name="token" autocomplete="current-password" required>'
        '</label> <button type="submit">Sign in</button></form>'
        "<p>The token is <code>TOKENMETER_API_TOKEN</code>; <code>tokenmeter api</code> also "
        "prints a one-time sign-in link.</p></body></html>"
    )


def last_audit(session: Session) -> AuditResponse | None:
    """The latest kept audit run (``tokenmeter audit`` or the ``tokenmeter.audit`` task)."""
    from tokenmeter.ledger import AuditRun

    run = session.scalars(select(AuditRun).order_by(AuditRun.id.desc()).limit(1)).first()
    if run is None:
        return None
    differences = json.loads(run.differences)
    return AuditResponse(
        created_at=run.created_at,
        window_start=run.window_start,
        window_end=run.window_end,
        bucket=run.bucket,
        group_by=[g for g in run.group_by.split(",") if g],
        compared_buckets=run.compared,
        skipped_open_buckets=run.skipped,
        clean=run.clean,
        differences=len(differences),
        worst=AuditDifference.model_validate(differences[0]) if differences else None,
    )


def _audit_panel(found: AuditResponse | None) -> str:
    """The last audit against the provider's books: its verdict and its worst difference."""
    if found is None:
        return (
            '<h2>Provider audit</h2><p id="audit">no audit yet: run <code>tokenmeter audit</code> '
            "or schedule the <code>tokenmeter.audit</code> task</p>"
        )
    when = f"{found.created_at:%Y-%m-%d %H:%M} UTC"
    window = f"{found.window_start:%Y-%m-%d %H:%M} - {found.window_end:%Y-%m-%d %H:%M} UTC"
    scope = f"{found.compared_buckets} closed {found.bucket} buckets of {window}"
    if found.clean:
        verdict = f'<b id="audit-verdict">clean</b>: the provider agrees in {scope}'
    else:
        verdict = f'<b id="audit-verdict">{found.differences} differences</b> in {scope}'
    worst = ""
    if found.worst is not None:
        w = found.worst
        group = ", ".join(str(v) for v in w.group) or "-"
        worst = (
            f'<p id="audit-worst">worst: {html.escape(w.kind)} {html.escape(w.what)} in '
            f"{html.escape(group)} ({html.escape(w.bucket_start[:16])}): provider "
            f"{html.escape(w.provider)}, ledger {html.escape(w.ledger)}</p>"
        )
    return f'<h2>Provider audit</h2><p id="audit">{when}: {verdict}</p>{worst}'
