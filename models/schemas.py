"""Pydantic v2 views of the application's tables (``from_attributes``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from tokenmeter.schemas import FromRow as _FromRow
from tokenmeter.schemas import MoneyJSON as Money


class PipelineRunSchema(_FromRow):
    id: int
    status: str
    summary: str | None = None
    config: dict[str, Any] = {}
    start_time: datetime
    end_time: datetime | None = None


class PipelineRunUsageSchema(_FromRow):
    id: int
    pipeline_run_id: int
    idea_model: str | None = None
    image_model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    reasoning_tokens: int = 0
    image_count: int = 0
    image_tokens: int = 0
    total_cost_usd: Money | None = None


class AgentScannedPostSchema(_FromRow):
    id: int
    post_id: str
    subreddit: str
    comment_id: str | None = None
    promoted: bool = False
    dry_run: bool = False
    post_title: str | None = None
    post_score: int | None = None
    promotion_message: str | None = None
    rejection_reason: str | None = None
    agent_ratings: dict[str, Any] | None = None
    scanned_at: datetime
    agent_model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_cost_usd: Money | None = None
