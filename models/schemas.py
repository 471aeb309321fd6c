"""Pydantic v2 views of the tables (``from_attributes``), for the API and the CLI."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, PlainSerializer

#: Money in JSON: an exact decimal string in plain notation ("0.0000000200", never "2.00E-8").
Money = Annotated[
    Decimal, PlainSerializer(lambda d: format(d, "f"), return_type=str, when_used="json")
]


class _FromRow(BaseModel):
    model_config = ConfigDict(from_attributes=True)


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


class OpenAICallSchema(_FromRow):
    id: int
    request_id: str | None = None
    created_at: datetime
    task_id: str | None = None
    task_name: str | None = None
    attempt: int = 0
    execution_id: str
    seq: int = 0
    scope_kind: str | None = None
    scope_ref: str | None = None
    hostname: str | None = None
    operation: str
    requested_model: str | None = None
    response_model: str | None = None
    model: str | None = None
    stream: bool = False
    input_tokens: int = 0
    cached_input_tokens: int = 0
    input_image_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    image_count: int = 0
    image_size: str | None = None
    image_quality: str | None = None
    usage_reported: bool = True
    cost_usd: Money | None = None
    price_version: str | None = None
    latency_ms: float | None = None
    status: str = "ok"
    error_type: str | None = None
    http_status: int | None = None


class UsageGroup(_FromRow):
    """One group of a usage summary (reporting.queries.UsageRow), as the API and CLI show it."""

    key: str
    calls: int
    errors: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    image_count: int
    cost_usd: Money | None  # None when some calls of the group have no known price
    unpriced_calls: int
