"""The usage HTTP API and dashboard (FastAPI).  ``tokenmeter api`` serves it.

Every endpoint needs ``Authorization: Bearer $TOKENMETER_API_TOKEN`` (the dashboard also
accepts ``?token=``, for a browser).  Without a configured token the app refuses to start,
unless it is explicitly built with ``require_auth=False`` (``tokenmeter api --no-auth``, for a
laptop).  Money is serialised as exact decimal strings; an unknown cost is ``null``.

Dates: ISO 8601 dates or datetimes; naive means UTC; a bare ``end_date`` day is included (the
window ends at the next midnight).  Windows are half-open ``[start, end)``.
"""

from __future__ import annotations

import html
import json
import secrets
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from tokenmeter.db import get_engine
from tokenmeter.schemas import FromRow, MoneyJSON, OpenAICallSchema, UsageGroup
from tokenmeter.settings import TokenmeterSettings, get_settings

from . import queries
from .render import money

GroupBy = Literal["model", "task", "kind", "day", "status", "tier"]


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
    """ISO date or datetime -> aware UTC datetime; a bare end date includes that day."""
    if value is None:
        return None
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            moment = datetime.combine(day, time(), UTC)
            return moment + timedelta(days=1) if end else moment
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise HTTPException(
            422,
            f"{name}={value!r} is not an ISO date (2026-11-24) or datetime (2026-11-24T12:00:00Z)",
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def window(start_date: str | None, end_date: str | None) -> tuple[datetime, datetime]:
    end = parse_when(end_date, end=True, name="end_date") or datetime.now(UTC)
    start = parse_when(start_date, end=False, name="start_date") or end - timedelta(days=7)
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
    token = settings.tokenmeter_api_token
    if require_auth and not token:
        raise RuntimeError(
            "TOKENMETER_API_TOKEN is not set: set it (clients send 'Authorization: Bearer "
            "<token>'), or run `tokenmeter api --no-auth` on a trusted machine"
        )
    app = FastAPI(
        title="tokenmeter usage API",
        version="0.1.0",
        description="Exact OpenAI token and cost usage recorded by tokenmeter.",
    )
    bearer = HTTPBearer(auto_error=False)

    def authorized(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    ) -> None:
        if not require_auth:
            return
        given = credentials.credentials if credentials else request.query_params.get("token")
        if not given or not secrets.compare_digest(given, token or ""):
            raise HTTPException(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    def db() -> Iterator[Session]:
        with Session(get_engine(settings.ledger_url, readonly=True)) as session:
            yield session

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        messages = [f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": "; ".join(messages)})

    auth = [Depends(authorized)]
    DB = Depends(db)

    @app.get("/api/usage/summary", response_model=SummaryResponse, dependencies=auth)
    def summary(
        session: Session = DB,
        start_date: str | None = Query(None, description="ISO date/datetime; default: end - 7d"),
        end_date: str | None = Query(None, description="ISO date/datetime; default: now"),
        group_by: GroupBy = Query("model"),
    ) -> SummaryResponse:
        """Totals and exact cost per group over a half-open window."""
        start, end = window(start_date, end_date)
        rows = queries.usage_summary(session, start, end, group_by)
        total = queries.usage_summary(session, start, end, "none")[0]
        return SummaryResponse(
            start=start,
            end=end,
            group_by=group_by,
            groups=[UsageGroup.model_validate(r) for r in rows],
            total=UsageGroup.model_validate(total),
        )

    @app.get("/api/usage/scopes", response_model=ScopesResponse, dependencies=auth)
    def scopes(
        session: Session = DB,
        start_date: str | None = None,
        end_date: str | None = None,
        kind: str | None = Query(None, max_length=255, description="only this scope kind"),
        limit: int = Query(10, ge=1, le=1000),
    ) -> ScopesResponse:
        """The most expensive scopes (pipeline runs, scanned posts...) in the window."""
        start, end = window(start_date, end_date)
        rows = queries.top_scopes(session, start, end, kind=kind, limit=limit)
        return ScopesResponse(
            start=start, end=end, scopes=[ScopeUsage.model_validate(r) for r in rows]
        )

    @app.get("/api/usage/scopes/{kind}/{ref}", response_model=ScopeResponse, dependencies=auth)
    def scope(
        kind: str = Path(min_length=1, max_length=255, description="scope kind"),
        ref: str = Path(min_length=1, max_length=4096, description="scope reference"),
        session: Session = DB,
    ) -> ScopeResponse:
        """Every call of one scope, all attempts, oldest first."""
        calls = queries.scope_calls(session, kind, ref)
        if not calls:
            raise HTTPException(404, f"no calls recorded in scope {kind}/{ref}")
        return ScopeResponse(
            kind=kind, ref=ref, calls=[OpenAICallSchema.model_validate(c) for c in calls]
        )

    @app.get("/api/usage/calls", response_model=CallsResponse, dependencies=auth)
    def calls(
        session: Session = DB,
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
    def latest_audit(session: Session = DB) -> AuditResponse:
        """The last ``tokenmeter audit``: its window, verdict and worst difference."""
        found = last_audit(session)
        if found is None:
            raise HTTPException(404, "no audit yet: run `tokenmeter audit`")
        return found

    @app.get("/", response_class=HTMLResponse, include_in_schema=False, dependencies=auth)
    def dashboard(session: Session = DB, days: int = Query(30, ge=1, le=366)) -> HTMLResponse:
        end = datetime.now(UTC)
        start = end - timedelta(days=days)
        return HTMLResponse(
            render_dashboard(
                queries.usage_summary(session, start, end, "day"),
                queries.usage_summary(session, start, end, "model"),
                queries.usage_summary(session, start, end, "none")[0],
                queries.top_scopes(session, start, end, limit=10),
                days,
                last_audit(session),
            )
        )

    return app


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


def _bars(rows: list[tuple[str, Decimal]], title: str) -> str:
    """A horizontal SVG bar chart (no scripts, works offline)."""
    if not rows:
        return f"<h2>{html.escape(title)}</h2><p>no data</p>"
    top = max((v for _, v in rows), default=Decimal(0)) or Decimal(1)
    height = 26 * len(rows) + 10
    bars = []
    for i, (label, value) in enumerate(rows):
        width = int(Decimal(560) * value / top)
        y = 5 + 26 * i
        bars.append(
            f'<text x="0" y="{y + 16}" font-size="13">{html.escape(label[:28])}</text>'
            f'<rect x="220" y="{y}" width="{max(width, 1)}" height="20" fill="#3b82f6"/>'
            f'<text x="{226 + width}" y="{y + 16}" font-size="13">{money(value)}</text>'
        )
    return (
        f'<h2>{html.escape(title)}</h2><svg width="900" height="{height}" '
        f'role="img" aria-label="{html.escape(title)}">{"".join(bars)}</svg>'
    )


def render_dashboard(
    by_day: list[queries.UsageRow],
    by_model: list[queries.UsageRow],
    total: queries.UsageRow,
    scopes: list[queries.ScopeRow],
    days: int,
    audit: AuditResponse | None = None,
) -> str:
    day_rows = sorted(((r.key, r.priced_cost_usd) for r in by_day), key=lambda kv: kv[0])
    model_rows = [(r.key, r.priced_cost_usd) for r in by_model]
    scope_rows = "".join(
        f"<tr><td>{html.escape(s.kind)}</td><td>{html.escape(s.ref)}</td><td>{s.calls}</td>"
        f"<td>{s.input_tokens:,}</td><td>{s.output_tokens:,}</td><td>{s.image_count}</td>"
        f"<td>{money(s.cost_usd)}</td></tr>"
        for s in scopes
    )
    unpriced = (
        f" ({total.unpriced_calls} calls with unknown prices)" if total.unpriced_calls else ""
    )
    page: list[Any] = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        "<title>tokenmeter usage</title><style>body{font-family:sans-serif;margin:2em;"
        "color:#111}td,th{padding:4px 10px;text-align:right}th{background:#eef}</style></head>",
        f"<body><h1>OpenAI usage, last {days} days</h1>",
        f'<p id="total">Total: <b id="total-cost">{money(total.cost_usd)}</b> over '
        f"{total.calls} calls, {total.input_tokens:,} input ({total.cached_input_tokens:,} "
        f"cached), {total.output_tokens:,} output tokens, {total.image_count} images"
        f"{unpriced}.</p>",
        _bars(day_rows, "Cost per day (UTC)"),
        _bars(model_rows, "Cost by model"),
        "<h2>Most expensive scopes</h2><table><tr><th>kind</th><th>ref</th><th>calls</th>"
        f"<th>input</th><th>output</th><th>images</th><th>cost</th></tr>{scope_rows}</table>",
        _audit_panel(audit),
        "</body></html>",
    ]
    return "".join(page)
