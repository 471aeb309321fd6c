"""Pydantic v2 views of the ledger (``from_attributes``), shared by the API and the CLI."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated

from pydantic import BaseModel, ConfigDict, PlainSerializer

#: Money in JSON: an exact decimal string in plain notation ("0.0000000200", never "2.00E-8").
MoneyJSON = Annotated[
    Decimal, PlainSerializer(lambda d: format(d, "f"), return_type=str, when_used="json")
]


class FromRow(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class OpenAICallSchema(FromRow):
    id: int
    request_id: str | None = None
    client_request_id: str | None = None
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
    service_tier: str | None = None
    batch: bool = False
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    input_image_tokens: int = 0
    input_audio_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    output_audio_tokens: int = 0
    image_count: int = 0
    image_size: str | None = None
    image_quality: str | None = None
    web_search_calls: int = 0
    file_search_calls: int = 0
    usage_reported: bool = True
    cost_usd: MoneyJSON | None = None
    price_source: str | None = None
    price_version: str | None = None
    latency_ms: float | None = None
    status: str = "ok"
    error_type: str | None = None
    http_status: int | None = None


class UsageGroup(FromRow):
    """One group of a usage summary (``reporting.queries.UsageRow``), as API and CLI show it."""

    key: str
    calls: int
    errors: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    image_count: int
    cost_usd: MoneyJSON | None  # None when some calls of the group have no known price
    unpriced_calls: int
    cache_write_tokens: int = 0
    input_audio_tokens: int = 0
    output_audio_tokens: int = 0
    web_search_calls: int = 0
    file_search_calls: int = 0
