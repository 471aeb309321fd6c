"""One query layer over the ledger and the rollups, for the CLI, the demo and the API.

Windows are half-open ``[start, end)`` on ``openai_calls.created_at`` (timezone-aware, UTC).
Money stays ``Decimal``: SQL ``SUM`` over the ``Money`` type is exact on both backends.  A row
with an unknown price is counted in ``unpriced_calls``; a group with any unpriced call has a
cost of ``None`` (unknown), never a partial figure presented as the total.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import String, case, func, literal_column, select
from sqlalchemy.orm import Session

from models.tables import AgentScannedPost, OpenAICall, PipelineRun, PipelineRunUsage

GroupBy = Literal["model", "task", "kind", "day", "status", "none"]
GROUPS: dict[str, object] = {
    "model": OpenAICall.model,
    "task": OpenAICall.task_name,
    "kind": func.coalesce(OpenAICall.scope_kind, "none"),
    "status": OpenAICall.status,
}


@dataclass(frozen=True)
class UsageRow:
    key: str
    calls: int
    errors: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    image_count: int
    priced_cost_usd: Decimal
    unpriced_calls: int

    @property
    def cost_usd(self) -> Decimal | None:
        return None if self.unpriced_calls else self.priced_cost_usd


@dataclass(frozen=True)
class RunRow:
    pipeline_run_id: int
    status: str
    summary: str | None
    prompt_tokens: int
    completion_tokens: int
    image_count: int
    total_cost_usd: Decimal | None


@dataclass(frozen=True)
class PostRow:
    post_id: str
    subreddit: str
    title: str | None
    promoted: bool
    prompt_tokens: int
    completion_tokens: int
    total_cost_usd: Decimal | None


def usage_summary(
    session: Session, start: datetime, end: datetime, group_by: GroupBy = "model"
) -> list[UsageRow]:
    """Totals per group over ``[start, end)``; ``group_by="none"`` gives one total row."""
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("start and end must be timezone-aware")
    if end <= start:
        raise ValueError("end must be after start")
    key: Any
    if group_by == "day":  # the UTC calendar day, as YYYY-MM-DD
        bind = session.get_bind()
        moment: Any = OpenAICall.created_at
        if bind.dialect.name == "postgresql":
            moment = func.timezone("UTC", moment)
        key = func.date(moment, type_=String())
    elif group_by == "none":
        key = literal_column("'total'")
    elif group_by in GROUPS:
        key = GROUPS[group_by]
    else:
        raise ValueError(f"group_by must be one of {sorted([*GROUPS, 'day', 'none'])}")
    billable = OpenAICall.status.notin_(("error", "blocked"))
    stmt = select(
        key.label("key"),
        func.count().label("calls"),
        func.sum(case((OpenAICall.status == "error", 1), else_=0)).label("errors"),
        func.coalesce(func.sum(OpenAICall.input_tokens), 0),
        func.coalesce(func.sum(OpenAICall.cached_input_tokens), 0),
        func.coalesce(func.sum(OpenAICall.output_tokens), 0),
        func.coalesce(func.sum(OpenAICall.reasoning_tokens), 0),
        func.coalesce(func.sum(OpenAICall.image_count), 0),
        func.sum(OpenAICall.cost_usd),
        func.sum(case((billable & OpenAICall.cost_usd.is_(None), 1), else_=0)),
    ).where(OpenAICall.created_at >= start, OpenAICall.created_at < end)
    if group_by != "none":
        stmt = stmt.group_by(key).order_by(func.sum(OpenAICall.cost_usd).desc().nulls_last(), key)
    return [
        UsageRow(
            key=str(r[0]) if r[0] is not None else "(none)",
            calls=int(r[1]),
            errors=int(r[2] or 0),
            input_tokens=int(r[3]),
            cached_input_tokens=int(r[4]),
            output_tokens=int(r[5]),
            reasoning_tokens=int(r[6]),
            image_count=int(r[7]),
            priced_cost_usd=r[8] if r[8] is not None else Decimal(0),
            unpriced_calls=int(r[9] or 0),
        )
        for r in session.execute(stmt)
    ]


def top_runs(session: Session, limit: int = 10) -> list[RunRow]:
    stmt = (
        select(PipelineRun, PipelineRunUsage)
        .join(PipelineRunUsage, PipelineRunUsage.pipeline_run_id == PipelineRun.id)
        .order_by(PipelineRunUsage.total_cost_usd.desc().nulls_last(), PipelineRun.id)
        .limit(limit)
    )
    return [
        RunRow(
            run.id,
            run.status,
            run.summary,
            u.prompt_tokens,
            u.completion_tokens,
            u.image_count,
            u.total_cost_usd,
        )
        for run, u in session.execute(stmt)
    ]


def top_posts(session: Session, limit: int = 10) -> list[PostRow]:
    stmt = (
        select(AgentScannedPost)
        .order_by(AgentScannedPost.total_cost_usd.desc().nulls_last(), AgentScannedPost.post_id)
        .limit(limit)
    )
    return [
        PostRow(
            p.post_id,
            p.subreddit,
            p.post_title,
            p.promoted,
            p.prompt_tokens,
            p.completion_tokens,
            p.total_cost_usd,
        )
        for p in session.scalars(stmt)
    ]


@dataclass(frozen=True)
class CallPage:
    items: list[OpenAICall]
    total: int
    page: int
    page_size: int


def run_detail(
    session: Session, run_id: int
) -> tuple[PipelineRun, PipelineRunUsage | None, list[OpenAICall]] | None:
    """One pipeline run, its usage row and its calls (every attempt), or None."""
    run = session.get(PipelineRun, run_id)
    if run is None:
        return None
    usage = session.scalars(
        select(PipelineRunUsage).where(PipelineRunUsage.pipeline_run_id == run_id)
    ).first()
    calls = list(
        session.scalars(
            select(OpenAICall)
            .where(OpenAICall.scope_kind == "pipeline_run", OpenAICall.scope_ref == str(run_id))
            .order_by(OpenAICall.created_at, OpenAICall.id)
        )
    )
    return run, usage, calls


def post_detail(session: Session, post_id: str) -> tuple[AgentScannedPost, list[OpenAICall]] | None:
    post = session.scalars(
        select(AgentScannedPost).where(AgentScannedPost.post_id == post_id)
    ).first()
    if post is None:
        return None
    calls = list(
        session.scalars(
            select(OpenAICall)
            .where(OpenAICall.scope_kind == "scanned_post", OpenAICall.scope_ref == post_id)
            .order_by(OpenAICall.created_at, OpenAICall.id)
        )
    )
    return post, calls


def list_calls(
    session: Session,
    start: datetime,
    end: datetime,
    *,
    model: str | None = None,
    task: str | None = None,
    status: str | None = None,
    scope_kind: str | None = None,
    page: int = 1,
    page_size: int = 50,
) -> CallPage:
    """Ledger rows in ``[start, end)``, newest first, filtered and paginated."""
    where = [OpenAICall.created_at >= start, OpenAICall.created_at < end]
    if model:
        where.append(OpenAICall.model == model)
    if task:
        where.append(OpenAICall.task_name == task)
    if status:
        where.append(OpenAICall.status == status)
    if scope_kind:
        where.append(
            OpenAICall.scope_kind.is_(None)
            if scope_kind == "none"
            else OpenAICall.scope_kind == scope_kind
        )
    total = session.scalar(select(func.count()).select_from(OpenAICall).where(*where)) or 0
    items = list(
        session.scalars(
            select(OpenAICall)
            .where(*where)
            .order_by(OpenAICall.created_at.desc(), OpenAICall.id.desc())
            .offset((page - 1) * page_size)
            .limit(page_size)
        )
    )
    return CallPage(items, int(total), page, page_size)
