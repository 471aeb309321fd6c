"""The application's own reports: pipeline runs and scanned posts, from its rollup tables.

tokenmeter's read side knows only its ledger (``tokenmeter.reporting.queries``); what a pipeline
run or a Reddit post is, and how to show one, is the application's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session

from models.tables import AgentScannedPost, PipelineRun, PipelineRunUsage
from tokenmeter.ledger import OpenAICall
from tokenmeter.reporting.render import Col, fitted_table, money


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


def runs_table(rows: list[RunRow], title: str = "pipeline runs", width: int | None = None) -> Table:
    cols = [
        Col("run", "key"),
        Col("status", "key"),
        Col("prompt", short="in", drop=2),
        Col("completion", short="out", drop=1),
        Col("images", short="img", drop=3),
        Col("cost", "money"),
        Col("summary", "text"),
    ]
    cells = [
        [
            str(r.pipeline_run_id),
            r.status,
            f"{r.prompt_tokens:,}",
            f"{r.completion_tokens:,}",
            str(r.image_count),
            money(r.total_cost_usd),
            r.summary or "",
        ]
        for r in rows
    ]
    return fitted_table(cols, cells, title, width)


def posts_table(
    rows: list[PostRow], title: str = "scanned posts", width: int | None = None
) -> Table:
    cols = [
        Col("post", "key"),
        Col("subreddit", "key", short="sub"),
        Col("promoted", "key", short="prom"),
        Col("prompt", short="in", drop=2),
        Col("completion", short="out", drop=1),
        Col("cost", "money"),
        Col("title", "text"),
    ]
    cells = [
        [
            r.post_id,
            r.subreddit,
            "yes" if r.promoted else "no",
            f"{r.prompt_tokens:,}",
            f"{r.completion_tokens:,}",
            money(r.total_cost_usd),
            r.title or "",
        ]
        for r in rows
    ]
    return fitted_table(cols, cells, title, width)
