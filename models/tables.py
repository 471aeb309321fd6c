"""The application's tables (SQLAlchemy 2.0, typed).

``pipeline_run_usages`` and the usage columns of ``agent_scanned_posts`` are rollups that
tokenmeter keeps equal to its ledger (``tokenmeter.OpenAICall``), bound through the library's
public ``TableRollup`` exactly as any other application would bind its own tables.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from tokenmeter import Money
from tokenmeter.ledger import NAMING_CONVENTION, utcnow


class Base(DeclarativeBase):
    """The application's tables (tokenmeter's ledger has its own metadata)."""

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
