"""Maintained price data: ``genai-prices`` (Pydantic's package) for token-priced OpenAI models.

Decimal prices with start dates, variants by the served service tier and by batch processing,
long-context tiers and per-call tool fees.  The package's data is bundled (no network call is
made: its updater is never started here); upgrading the package is how prices update.

What this adds to the package: nothing is guessed.  A tier or batch variant the data does not
have for that model on that day, or a billed dimension the model has no price for (web search
calls, cache writes, audio tokens), makes the cost unknown rather than the standard price or $0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any

from .context import CallRecord

logger = logging.getLogger("tokenmeter.pricing")

PROVIDER = "openai"


@dataclass(frozen=True)
class Quote:
    """A price from the maintained data: the cost (None: unknown) and what priced it."""

    cost: Decimal | None
    model_id: str
    version: str  # "<model id>@<row start or 'listed'>[ <tier>][ batch]"
    reason: str | None = None  # why the cost is unknown


@lru_cache(maxsize=1)  # pragma: no mutate  (a cache only: the same answer without it)
def source() -> str:
    """``genai-prices <version>``: the data's version (the package carries no data date)."""
    import genai_prices

    return f"genai-prices {genai_prices.__version__}"


def _find(model: str) -> tuple[Any, Any] | None:
    """(provider, model) of the package for ``model`` (its own curated match rules), or None."""
    from genai_prices.data_snapshot import get_snapshot

    try:
        return get_snapshot().find_provider_model(model, None, PROVIDER, None)
    except LookupError:
        return None


def _row_start(info: Any, at: datetime) -> date | None:
    """Start date of the price row in force at ``at`` (None: the model's one row)."""
    prices = info.prices
    if not isinstance(prices, list):
        return None
    for conditional in reversed(prices):
        constraint = conditional.constraint
        if constraint is None or constraint.active(at):
            return getattr(constraint, "start_date", None)
    first = prices[0].constraint
    return getattr(first, "start_date", None)


def _variant_active(info: Any, context: dict[str, str], at: datetime) -> bool:
    for variant in info.price_variants or ():
        if variant.constraint is not None and not variant.constraint.active(at):
            continue
        if all(context.get(k) == v for k, v in variant.when.items()):
            return True
    return False


#: CallRecord field -> (genai-prices Usage key, the price key that must exist when it is used)
_PRICED_PARTS = {
    "cache_write_tokens": ("cache_write_tokens", "cache_write_mtok"),
    "input_audio_tokens": ("input_audio_tokens", "input_audio_mtok"),
    "output_audio_tokens": ("output_audio_tokens", "output_audio_mtok"),
    "web_search_calls": ("web_searches", "web_searches_kcount"),
    "file_search_calls": ("storage_searches", "storage_searches_kcount"),
}


def quote(call: CallRecord, model: str, tier: str, batch: bool) -> Quote | None:
    """The maintained price of ``call`` as ``model``; None when the data has no such model."""
    from genai_prices import Usage

    found = _find(model)
    if found is None:
        return None
    provider, info = found
    at = call.created_at if call.created_at.tzinfo else call.created_at.replace(tzinfo=UTC)
    start = _row_start(info, at)
    version = f"{info.id}@{start.isoformat() if start else 'listed'}"
    context: dict[str, str] | None = None
    if tier != "default":
        context = {"service_tier": tier}
        version += f" {tier}"
    elif batch:
        context = {"processing": "batch"}
        version += " batch"
    own = any(info is m for m in provider.models)  # variants belong to their provider's models
    if context is not None and not (own and _variant_active(info, context, at)):
        what = f"the {tier} tier" if tier != "default" else "batch processing"
        return Quote(None, info.id, version, f"{info.id} has no price for {what} on {at.date()}")
    if not call.usage_reported:  # the usage is unknown, not the price
        return Quote(None, info.id, version)
    prices = info.get_prices(at, context)
    usage: dict[str, int] = {
        "input_tokens": call.input_tokens,
        "cache_read_tokens": min(call.cached_input_tokens, call.input_tokens),
        "output_tokens": call.output_tokens,
    }
    image_rate = getattr(prices, "input_image_mtok", None)
    if call.input_image_tokens and image_rate is not None:  # pragma: no mutate  (`or`: adds 0)
        usage["input_image_tokens"] = call.input_image_tokens  # (else billed as input tokens)
    for field_name, (usage_key, price_key) in _PRICED_PARTS.items():
        used = getattr(call, field_name)
        if not used:
            continue
        if getattr(prices, price_key, None) is None:
            reason = f"{info.id} has no price for {field_name.replace('_', ' ')}"
            return Quote(None, info.id, version, reason)
        usage[usage_key] = used
    try:  # the very rates checked above: no second lookup
        result = prices.calc_price(Usage(**usage))
    except (LookupError, ValueError) as exc:
        return Quote(None, info.id, version, f"{info.id}: {exc}")
    return Quote(Decimal(result["total_price"]), info.id, version)


def openai_models() -> list[str]:
    """Every OpenAI model id in the maintained data."""
    from genai_prices.data_snapshot import get_snapshot

    for provider in get_snapshot().providers:
        if provider.id == PROVIDER:  # pragma: no mutate  (ids are unique; openai precedes >=)
            return [m.id for m in provider.models]
    return []


def newest_date() -> date | None:
    """The newest day the data's notes say a figure was verified (how old the data is)."""
    import re

    from genai_prices.data_snapshot import get_snapshot

    today = datetime.now(UTC).date()
    days = [
        day
        for provider in get_snapshot().providers
        for model in provider.models
        for text in re.findall(
            r"(?:verified|checked)[^.]*?(\d{4}-\d{2}-\d{2})", model.price_comments or ""
        )
        if (day := date.fromisoformat(text)) <= today  # (some rows start in the future)
    ]
    return max(days, default=None)
