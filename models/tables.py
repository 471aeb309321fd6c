"""The usage database: SQLAlchemy 2.0 typed tables.

``pipeline_runs``/``pipeline_run_usages``/``agent_scanned_posts`` are the application's tables
(the rollups tokenmeter fills); ``openai_calls`` is tokenmeter's per-call ledger, the source of
truth every rollup and report can be recomputed from.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from models.types import Money

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# A BIGINT primary key that still auto-increments on SQLite (which only does so for INTEGER).
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class PipelineRun(Base):
    __tablename__ = "pipeline_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(32), default="running")
    summary: Mapped[str | None] = mapped_column(Text)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    start_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    end_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    usage: Mapped[PipelineRunUsage | None] = relationship(
        back_populates="pipeline_run", uselist=False, cascade="all, delete-orphan"
    )


class PipelineRunUsage(Base):
    """Exact totals of every OpenAI call made for one pipeline run (all attempts)."""

    __tablename__ = "pipeline_run_usages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pipeline_run_id: Mapped[int] = mapped_column(
        ForeignKey("pipeline_runs.id", ondelete="CASCADE"), unique=True
    )
    idea_model: Mapped[str | None] = mapped_column(String(128))
    image_model: Mapped[str | None] = mapped_column(String(128))
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    cached_prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    image_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    image_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # NULL when a contributing call's model has no known price (never a misleading 0).
    total_cost_usd: Mapped[Decimal | None] = mapped_column(
        Money(), default=Decimal(0), server_default="0"
    )

    pipeline_run: Mapped[PipelineRun] = relationship(back_populates="usage")


class AgentScannedPost(Base):
    """One Reddit post the promotion agent looked at, with what rating and commenting cost."""

    __tablename__ = "agent_scanned_posts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    post_id: Mapped[str] = mapped_column(String(32), unique=True)
    subreddit: Mapped[str] = mapped_column(String(128))
    comment_id: Mapped[str | None] = mapped_column(String(32))
    promoted: Mapped[bool] = mapped_column(Boolean, default=False)
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False)
    post_title: Mapped[str | None] = mapped_column(Text)
    post_score: Mapped[int | None] = mapped_column(Integer)
    promotion_message: Mapped[str | None] = mapped_column(Text)
    rejection_reason: Mapped[str | None] = mapped_column(Text)
    agent_ratings: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    scanned_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # usage columns (added by migration 0002; rows from before it keep 0 / NULL)
    agent_model: Mapped[str | None] = mapped_column(String(128))
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    total_cost_usd: Mapped[Decimal | None] = mapped_column(
        Money(), default=Decimal(0), server_default="0"
    )


class OpenAICall(Base):
    """The ledger: one row per OpenAI API call, from the provider's own ``usage`` numbers.

    No prompt or completion text is stored.  Two idempotency keys: ``request_id`` (OpenAI's
    ``x-request-id``; absent for calls that never reached the provider) and ``(execution_id,
    seq)``, one run of a root scope and the call's number in it.  The same execution flushed
    twice (write-ahead recovery, spool replay) inserts nothing twice, while a redelivered task's
    new execution, whose calls the provider billed again, is counted.
    """

    __tablename__ = "openai_calls"
    __table_args__ = (
        UniqueConstraint("execution_id", "seq"),
        Index("ix_openai_calls_created_at", "created_at"),
        Index("ix_openai_calls_model", "model"),
        Index("ix_openai_calls_task_id", "task_id"),
        Index("ix_openai_calls_scope", "scope_kind", "scope_ref"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    request_id: Mapped[str | None] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    # where the call was made
    task_id: Mapped[str | None] = mapped_column(String(155))
    task_name: Mapped[str | None] = mapped_column(String(255))
    attempt: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    execution_id: Mapped[str] = mapped_column(
        String(32), default=lambda: uuid.uuid4().hex, doc="one run of a root scope"
    )
    seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    scope_kind: Mapped[str | None] = mapped_column(String(64))
    scope_ref: Mapped[str | None] = mapped_column(String(255))
    hostname: Mapped[str | None] = mapped_column(String(255))

    # what was called
    operation: Mapped[str] = mapped_column(String(32))
    requested_model: Mapped[str | None] = mapped_column(String(128))
    response_model: Mapped[str | None] = mapped_column(String(128))
    model: Mapped[str | None] = mapped_column(
        String(128), doc="the model billed: the response's model, else the requested one"
    )
    stream: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))

    # what the provider billed
    input_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cached_input_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    input_image_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    output_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    reasoning_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    image_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    image_size: Mapped[str | None] = mapped_column(String(32))
    image_quality: Mapped[str | None] = mapped_column(String(32))
    usage_reported: Mapped[bool] = mapped_column(
        Boolean,
        default=True,
        server_default=text("true"),
        doc="false when the provider sent no usage (tokens then 0, cost NULL unless per-image)",
    )

    # money
    cost_usd: Mapped[Decimal | None] = mapped_column(Money())
    price_version: Mapped[str | None] = mapped_column(String(64))

    # outcome
    latency_ms: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), default="ok")
    error_type: Mapped[str | None] = mapped_column(String(128))
    http_status: Mapped[int | None] = mapped_column(Integer)
