"""What the sandbox charges for a request, from its OWN price list (the provider's invoice).

Written apart from tokenmeter's pricing on purpose: it imports nothing of it and does not use a
price package, so a mistake in the meter's prices shows up as a difference instead of agreeing
with itself.  One row per model name exactly as the sandbox bills it (the served snapshot), with
the page and day the figure was read.  Where this list and the meter disagree, that is a finding
to investigate, not a number to copy.

How OpenAI bills (standard tier, https://platform.openai.com/docs/pricing):
- text models: uncached input, cached input and output tokens, each at its own rate per 1M
  tokens; reasoning tokens are part of the output tokens and billed as output; cache writes
  at 1.25x the input rate from the GPT-5.6 family on (as input before it).
- embeddings: input tokens.
- gpt-image-1: text input, image input and output (image) tokens, each at its own rate.
- dall-e-2 / dall-e-3: a price per image by quality and size.
- the served service tier (flex, priority) has rates of its own; the web search tool bills
  per call on top of the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

PRICING_PAGE = "https://platform.openai.com/docs/pricing"
MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class TokenRates:
    """USD per 1M tokens."""

    input: Decimal
    output: Decimal = Decimal(0)
    cached_input: Decimal | None = None  # None: the model has no cached-input discount
    image_input: Decimal | None = None
    source: str = PRICING_PAGE
    read_on: str = "2025-08-15"


def _rates(
    input: str, output: str = "0", cached: str | None = None, image_input: str | None = None
) -> TokenRates:
    return TokenRates(
        Decimal(input),
        Decimal(output),
        None if cached is None else Decimal(cached),
        None if image_input is None else Decimal(image_input),
    )


#: Every name the sandbox bills under.  Snapshots are listed one by one: no family guessing.
TOKEN_PRICES: dict[str, TokenRates] = {
    "gpt-4o-mini-2024-07-18": _rates("0.15", "0.60", "0.075"),
    "gpt-4o-2024-08-06": _rates("2.50", "10.00", "1.25"),
    "gpt-4o-2024-05-13": _rates("5.00", "15.00"),
    "gpt-4.1-2025-04-14": _rates("2.00", "8.00", "0.50"),
    "gpt-4.1-mini-2025-04-14": _rates("0.40", "1.60", "0.10"),
    "gpt-4.1-nano-2025-04-14": _rates("0.10", "0.40", "0.025"),
    "gpt-4-turbo-2024-04-09": _rates("10.00", "30.00"),
    "gpt-4-0613": _rates("30.00", "60.00"),
    "gpt-3.5-turbo-0125": _rates("0.50", "1.50"),
    "o1-2024-12-17": _rates("15.00", "60.00", "7.50"),
    "o1-mini-2024-09-12": _rates("1.10", "4.40", "0.55"),
    "o3-2025-04-16": _rates("2.00", "8.00", "0.50"),
    "o3-mini-2025-01-31": _rates("1.10", "4.40", "0.55"),
    "o4-mini-2025-04-16": _rates("1.10", "4.40", "0.275"),
    "text-embedding-3-small": _rates("0.02"),
    "text-embedding-3-large": _rates("0.13"),
    "text-embedding-ada-002": _rates("0.10"),
    "gpt-image-1": _rates("5.00", "40.00", "1.25", image_input="10.00"),
    "gpt-5-2025-08-07": _rates("1.25", "10.00", "0.125"),
    "gpt-5-mini-2025-08-07": _rates("0.25", "2.00", "0.025"),
    "gpt-5-nano-2025-08-07": _rates("0.05", "0.40", "0.005"),
    "gpt-5.4-2026-03-05": _rates("2.50", "15.00", "0.25"),
    # after the 2026-08-21 cut ($5 / $30 before); genai-prices 0.2.3 has the same figures
    "gpt-5.6-sol": _rates("4.00", "20.00", "0.40"),
}

#: Long context: a prompt of more than N input tokens is billed at other rates for the whole
#: request ("prompts with >272K input tokens are priced at 2x input and 1.5x output for the
#: full session", https://developers.openai.com/api/docs/models/gpt-5.4, read 2026-12-01).
LONG_CONTEXT: dict[str, tuple[int, TokenRates]] = {
    "gpt-5.4-2026-03-05": (272_000, _rates("5.00", "22.50", "0.50")),
    "gpt-5.6-sol": (272_000, _rates("8.00", "30.00", "0.80")),
}

#: The flex and priority tiers, by served snapshot (standard tier above).  Flex is half the
#: standard price (https://platform.openai.com/docs/guides/flex-processing); priority from
#: https://openai.com/api-priority-processing/ (both read 2026-12-01).
PRIORITY_PAGE = "https://openai.com/api-priority-processing/"
TIER_PRICES: dict[tuple[str, str], TokenRates] = {
    ("gpt-5-2025-08-07", "flex"): _rates("0.625", "5.00", "0.0625"),
    ("gpt-5-mini-2025-08-07", "flex"): _rates("0.125", "1.00", "0.0125"),
    ("gpt-5-nano-2025-08-07", "flex"): _rates("0.025", "0.20", "0.0025"),
    ("gpt-5-2025-08-07", "priority"): _rates("2.50", "20.00", "0.25"),
    ("gpt-5-mini-2025-08-07", "priority"): _rates("0.45", "3.60", "0.045"),
    ("gpt-4.1-2025-04-14", "priority"): _rates("3.50", "14.00", "0.875"),
    ("gpt-5.6-sol", "flex"): _rates("2.00", "10.00", "0.20"),
    ("gpt-5.6-sol", "priority"): _rates("8.00", "40.00", "0.80"),
}
#: The Batch API: half the standard price of input and output tokens
#: (https://platform.openai.com/docs/guides/batch, read 2026-12-01), for the models the
#: sandbox runs batches of.
BATCH_PRICES: dict[str, TokenRates] = {
    "gpt-4o-mini-2024-07-18": _rates("0.075", "0.30"),
    "gpt-4.1-mini-2025-04-14": _rates("0.20", "0.80"),
    "gpt-5-mini-2025-08-07": _rates("0.125", "1.00"),
}
#: Cache writes: "Cache writes have no additional fee on models before the GPT-5.6 family. For
#: GPT-5.6 models and later model families, cache writes cost 1.25x the uncached input token
#: rate" (https://developers.openai.com/api/docs/guides/prompt-caching, read 2026-12-01).  The
#: rule, not a price per model: the sandbox derives the write rate from the input rate in force
#: (tier, batch, long context), where the meter reads the maintained data's own figure.
CACHE_WRITE_SURCHARGE = Decimal("1.25")
WRITE_SURCHARGED_FAMILIES = ("gpt-5.6", "gpt-6")


def writes_surcharged(model: str) -> bool:
    return model.startswith(WRITE_SURCHARGED_FAMILIES)


#: The web search tool: USD per call ($10 per 1,000 calls), on top of the model's tokens.
WEB_SEARCH_PER_CALL = Decimal("0.01")

#: (model, quality, size) -> USD per image.
IMAGE_PRICES: dict[tuple[str, str, str], Decimal] = {
    ("dall-e-3", "standard", "1024x1024"): Decimal("0.040"),
    ("dall-e-3", "standard", "1024x1792"): Decimal("0.080"),
    ("dall-e-3", "standard", "1792x1024"): Decimal("0.080"),
    ("dall-e-3", "hd", "1024x1024"): Decimal("0.080"),
    ("dall-e-3", "hd", "1024x1792"): Decimal("0.120"),
    ("dall-e-3", "hd", "1792x1024"): Decimal("0.120"),
    ("dall-e-2", "standard", "1024x1024"): Decimal("0.020"),
    ("dall-e-2", "standard", "512x512"): Decimal("0.018"),
    ("dall-e-2", "standard", "256x256"): Decimal("0.016"),
}


class Billable(Protocol):
    @property
    def model(self) -> str: ...
    @property
    def input_tokens(self) -> int: ...
    @property
    def cached_input_tokens(self) -> int: ...
    @property
    def cache_write_tokens(self) -> int: ...
    @property
    def input_image_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def image_count(self) -> int: ...
    @property
    def image_size(self) -> str | None: ...
    @property
    def image_quality(self) -> str | None: ...
    @property
    def service_tier(self) -> str: ...
    @property
    def web_search_calls(self) -> int: ...
    @property
    def batch(self) -> bool: ...


def amount_usd(row: Billable) -> Decimal | None:
    """The exact dollars the provider charges for ``row``; None if the model is not listed."""
    per_image = IMAGE_PRICES.get((row.model, row.image_quality or "", row.image_size or ""))
    if per_image is not None:
        return per_image * row.image_count
    if row.batch:
        rates = BATCH_PRICES.get(row.model)
    elif row.service_tier == "default":
        rates = TOKEN_PRICES.get(row.model)
    else:
        rates = TIER_PRICES.get((row.model, row.service_tier))
    if rates is None:
        return None
    long = LONG_CONTEXT.get(row.model)
    if long is not None and row.service_tier == "default" and not row.batch:
        threshold, long_rates = long
        if row.input_tokens > threshold:
            rates = long_rates
    # input_tokens counts every input token; cached and image tokens are parts of it.
    cached = row.cached_input_tokens if rates.cached_input is not None else 0
    image = row.input_image_tokens if rates.image_input is not None else 0
    written = row.cache_write_tokens if writes_surcharged(row.model) else 0
    plain = row.input_tokens - cached - image - written
    dollars = plain * rates.input + row.output_tokens * rates.output
    dollars += written * rates.input * CACHE_WRITE_SURCHARGE
    if rates.cached_input is not None:
        dollars += cached * rates.cached_input
    if rates.image_input is not None:
        dollars += image * rates.image_input
    return dollars / MILLION + row.web_search_calls * WEB_SEARCH_PER_CALL
