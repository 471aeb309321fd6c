"""tokenmeter's ledger: one row per OpenAI call, the source of truth of every report.

The table has its own metadata (and its own Alembic chain, ``tokenmeter.migrations``, with its
own version table), so it lives in a user's database beside the user's tables without touching
their models or their migration history.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .money import Money

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


# -- what a text column can hold --------------------------------------------------------------
def storable(value: str) -> str:
    """``value`` as any ledger database can keep it: a lone surrogate (which no UTF-8 carries:
    a name decoded with ``surrogateescape``, a label cut from bytes) backslash-escaped, a NUL
    (which no PostgreSQL text holds) written ``\\x00``; every other string as it is.  A
    label a user controls never makes a batch unwritable."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value.replace("\x00", "\\x00") if "\x00" in value else value


def fit(value: str, limit: int) -> str:
    """``value`` if it fits, else its head plus a hash of the whole (distinct values stay
    distinct): a label never makes a batch unwritable, and the call is never dropped for it."""
    if len(value) <= limit:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{value[: limit - len(digest) - 1]}~{digest}"


def text_lengths(table: Table) -> dict[str, int | None]:
    """``table``'s text columns and their lengths (None: unbounded), for :func:`fitted`."""
    return {c.name: c.type.length for c in table.columns if isinstance(c.type, String)}


def fitted(value: Any, limit: int | None) -> Any:
    """A text value as its column keeps it (:func:`storable`, then :func:`fit` to ``limit``
    characters); any other value as it is."""
    if not isinstance(value, str):
        return value
    value = storable(value)
    return value if limit is None or len(value) <= limit else fit(value, limit)


class LedgerBase(DeclarativeBase):
    """Declarative base of tokenmeter's own tables (not the application's)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class OpenAICall(LedgerBase):
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
        Index("ix_openai_calls_client_request_id", "client_request_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    request_id: Mapped[str | None] = mapped_column(String(128), unique=True)
    client_request_id: Mapped[str | None] = mapped_column(
        String(512),
        doc="the X-Client-Request-Id the request carried (OpenAI logs it): identifies a call "
        "that was never answered, which has no request id",
    )
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
    project: Mapped[str | None] = mapped_column(
        String(128), doc="the OpenAI project the client named (its OpenAI-Project header)"
    )
    api_key_hint: Mapped[str | None] = mapped_column(
        String(32), doc="the key that called, redacted as OpenAI shows it (sk-proj...abcd)"
    )

    # what was called
    operation: Mapped[str] = mapped_column(String(32))
    requested_model: Mapped[str | None] = mapped_column(String(128))
    response_model: Mapped[str | None] = mapped_column(String(128))
    model: Mapped[str | None] = mapped_column(
        String(128), doc="the model billed: the response's model, else the requested one"
    )
    stream: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    service_tier: Mapped[str | None] = mapped_column(
        String(32),
        doc="the tier the response says served it (not the one asked for); a call never "
        "answered has no response: the flex or priority tier it asked for, else NULL",
    )
    batch: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))

    # what the provider billed
    input_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cached_input_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cache_write_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    input_image_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    input_audio_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    output_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    reasoning_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    output_audio_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    image_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    web_search_calls: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    file_search_calls: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
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
    price_source: Mapped[str | None] = mapped_column(
        Text, doc="what priced it: genai-prices <version>, tokenmeter, file:<path>"
    )
    price_version: Mapped[str | None] = mapped_column(Text, doc="the row and variant")

    # outcome
    latency_ms: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), default="ok")
    error_type: Mapped[str | None] = mapped_column(String(128))
    http_status: Mapped[int | None] = mapped_column(Integer)


class PendingRollup(LedgerBase):
    """A rollup that could not apply when its calls were written (its application row missing
    or unwritable): kept here, in the same transaction as those calls, and applied alone later.

    Applying it deletes it in the same transaction, so it is applied exactly once however many
    processes retry.  After ``TOKENMETER_ROLLUP_MAX_ATTEMPTS`` failures it is ``dead`` (kept,
    reported by ``tokenmeter rollups``, retried only when asked).
    """

    __tablename__ = "tokenmeter_pending_rollups"
    __table_args__ = (Index("ix_tokenmeter_pending_rollups_dead", "dead"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    execution_id: Mapped[str] = mapped_column(String(32))
    task_id: Mapped[str | None] = mapped_column(String(155))
    task_name: Mapped[str | None] = mapped_column(String(255))
    rollup: Mapped[str] = mapped_column(Text, doc="the rollup, as JSON (TableRollup.to_json)")
    calls: Mapped[str] = mapped_column(Text, doc="the calls it adds, as JSON")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    dead: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))


class LedgerIdentity(LedgerBase):
    """The ledger's one identity, created with it: write-ahead entries, spooled batches and
    budget counters carry it (and Redis keys are named by it), so two applications or
    environments sharing one Redis never write into each other's ledger."""

    __tablename__ = "tokenmeter_ledger"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditRun(LedgerBase):
    """One ``tokenmeter audit``: the window it compared with the provider's books and what it
    found (the differences as JSON, the worst first).  The API shows the latest."""

    __tablename__ = "tokenmeter_audits"
    __table_args__ = (Index("ix_tokenmeter_audits_created_at", "created_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    window_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    window_end: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    bucket: Mapped[str] = mapped_column(String(4))
    group_by: Mapped[str] = mapped_column(String(128), doc="comma-separated")
    compared: Mapped[int] = mapped_column(Integer, doc="closed buckets compared")
    skipped: Mapped[int] = mapped_column(Integer, doc="buckets still open, left out")
    clean: Mapped[bool] = mapped_column(Boolean)
    differences: Mapped[str] = mapped_column(Text, doc="JSON list, the largest first")


class DailyUsage(LedgerBase):
    """The ledger's totals per UTC day and (model, task, scope kind, status, tier, project),
    kept by triggers on ``openai_calls`` in the same transaction as every write to it
    (migration tm0008).  ``''`` stands for no value in the key columns.  Read-only to code:
    the usage summary reads it for whole days."""

    __tablename__ = "tokenmeter_daily_usage"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True, server_default="")
    task_name: Mapped[str] = mapped_column(String(255), primary_key=True, server_default="")
    scope_kind: Mapped[str] = mapped_column(String(64), primary_key=True, server_default="")
    status: Mapped[str] = mapped_column(String(16), primary_key=True, server_default="")
    service_tier: Mapped[str] = mapped_column(String(32), primary_key=True, server_default="")
    project: Mapped[str] = mapped_column(String(128), primary_key=True, server_default="")
    calls: Mapped[int] = mapped_column(BigInteger, server_default="0")
    errors: Mapped[int] = mapped_column(BigInteger, server_default="0")
    input_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    cached_input_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    output_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    image_count: Mapped[int] = mapped_column(BigInteger, server_default="0")
    cache_write_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    input_audio_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    output_audio_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    web_search_calls: Mapped[int] = mapped_column(BigInteger, server_default="0")
    file_search_calls: Mapped[int] = mapped_column(BigInteger, server_default="0")
    priced_calls: Mapped[int] = mapped_column(BigInteger, server_default="0")
    unpriced_calls: Mapped[int] = mapped_column(BigInteger, server_default="0")
    cost_usd: Mapped[Decimal] = mapped_column(Money(), server_default="0")


class DailyScope(LedgerBase):
    """What each scope's calls cost per UTC day (calls and priced cost), kept by triggers on
    ``openai_calls`` like ``DailyUsage`` (migration tm0009); calls outside any scope are not
    in it, and ``''`` stands for no ref.  Read-only to code: the dashboard ranks its most
    expensive runs and posts from it."""

    __tablename__ = "tokenmeter_daily_scopes"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    scope_kind: Mapped[str] = mapped_column(String(64), primary_key=True)
    scope_ref: Mapped[str] = mapped_column(String(255), primary_key=True, server_default="")
    calls: Mapped[int] = mapped_column(BigInteger, server_default="0")
    cost_usd: Mapped[Decimal] = mapped_column(Money(), server_default="0")
