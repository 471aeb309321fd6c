"""Maintained price data: ``genai-prices`` (Pydantic's package) for token-priced OpenAI models.

Decimal prices with start dates, variants by the served service tier and by batch processing,
long-context tiers and per-call tool fees.  The package's data is bundled (no network call is
made: its updater is never started here); upgrading the package is how prices update.

What this adds to the package: nothing is guessed.  A tier or batch variant the data does not
have for that model on that day, or a billed dimension the model has no price for (web search
calls, audio tokens, cache writes on a model whose writes cost extra), makes the cost unknown
rather than the standard price or $0.  Cache writes on a model that bills them as plain input
(every OpenAI model before the GPT-5.6 family: see ``writes_surcharged``) are input tokens at
the input rate.
"""

from __future__ import annotations

import logging
import threading
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


_loaded = False
_load_lock = threading.Lock()


def load() -> None:
    """Import genai-prices whole, once, under a lock; idempotent, and a flag's read once done.

    Its modules import one another, some only inside functions (its data on the first lookup).
    Imported for the first time by two threads at once, or by one thread while another forks
    the process (a Celery pool replacing a lost child while the main process prices that
    child's recovered calls), a module can be seen half run, or inherited half run by the
    child for good: a call priced there got a NULL cost although its price is known.  Every
    use here goes through this first, and the worker runs it in its main process before its
    pool starts (``worker_init``), so that its children inherit the data whole."""
    global _loaded
    if _loaded:
        return
    with _load_lock:
        if _loaded:
            return
        import genai_prices  # noqa: F401
        from genai_prices import data_snapshot, data_units, decompose, types, units, validation

        del data_units, decompose, types, units, validation  # (imported: that was all)

        data_snapshot.get_snapshot()  # (imports its data module)
        _loaded = True


@lru_cache(maxsize=1)  # pragma: no mutate  (a cache only: the same answer without it)
def source() -> str:
    """``genai-prices <version>``: the data's version (the package carries no data date)."""
    load()
    import genai_prices

    return f"genai-prices {genai_prices.__version__}"


def _find(model: str) -> tuple[Any, Any] | None:
    """(provider, model) of the package for ``model`` (its own curated match rules), or None."""
    load()
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
    load()
    from genai_prices import Usage

    found = terms(model, tier, batch, call.created_at)
    if found is None:
        return None
    model_id, version, prices, reason, rates = found
    if prices is None:
        return Quote(None, model_id, version, reason)
    if not call.usage_reported:  # the usage is unknown, not the price
        return Quote(None, model_id, version)
    usage: dict[str, int] = {
        "input_tokens": call.input_tokens,
        "cache_read_tokens": min(call.cached_input_tokens, call.input_tokens),
        "output_tokens": call.output_tokens,
    }
    image = call.input_image_tokens
    if image and getattr(prices, "input_image_mtok", None) is not None:  # pragma: no mutate
        usage["input_image_tokens"] = call.input_image_tokens  # (else billed as input tokens)
    for field_name, (usage_key, price_key) in _PRICED_PARTS.items():
        used = getattr(call, field_name)
        if not used:
            continue
        if field_name == "cache_write_tokens" and not writes_surcharged(model):
            continue  # input tokens like any other, at the input rate (the module's docstring)
        if getattr(prices, price_key, None) is None:
            reason = f"{model_id} has no price for {field_name.replace('_', ' ')}"
            return Quote(None, model_id, version, reason)
        usage[usage_key] = used
    if len(usage) == len(_TOKENS) and rates is not None:  # input, cached, output tokens only
        cost = linear_cost(
            rates, usage["input_tokens"], usage["cache_read_tokens"], usage["output_tokens"]
        )
        return Quote(cost, model_id, version)
    try:  # the very rates checked above: no second lookup
        result = prices.calc_price(Usage(**usage))
    except (LookupError, ValueError) as exc:
        return Quote(None, model_id, version, f"{model_id}: {exc}")
    return Quote(Decimal(result["total_price"]), model_id, version)


@lru_cache(maxsize=4096)  # pragma: no mutate  (a cache only: the same answer without it)
def writes_surcharged(model: str) -> bool:
    """Does the data price cache writes of ``model`` apart from its input tokens?

    OpenAI charges nothing extra for writing a prompt to its cache on models before the
    GPT-5.6 family, and 1.25x the uncached input rate from GPT-5.6 on ("Cache writes have no
    additional fee on models before the GPT-5.6 family. For GPT-5.6 models and later model
    families, cache writes cost 1.25x the uncached input token rate",
    https://developers.openai.com/api/docs/guides/prompt-caching, read 2026-12-01).  The data
    says which is which: a model with a ``cache_write_mtok`` in any of its rows or variants
    has the surcharge (and a row of it without one cannot price its writes: unknown); a model
    with none bills its writes as the input tokens they are, as ``calc_price`` does.
    """
    found = _find(model)
    if found is None:
        return True  # not in the data: nothing known either way
    info = found[1]
    rows = info.prices if isinstance(info.prices, list) else [info.prices]
    prices = [getattr(r, "prices", r) for r in rows]
    prices += [v.prices for v in info.price_variants or ()]
    return any(getattr(p, "cache_write_mtok", None) is not None for p in prices)


Rates = tuple[Decimal, Decimal, Decimal, Decimal]
#: (model id, version, its prices or None, why they are None, their linear rates) of a model
#: on a tier that day
_Terms = tuple[str, str, Any, str | None, "Rates | None"]
_terms_by_day: dict[tuple[str, str, bool, date], _Terms | None] = {}


def terms(model: str, tier: str, batch: bool, created: datetime) -> _Terms | None:
    """What prices ``model`` for a call made at ``created`` (a naive moment is UTC): (model
    id, row version, its prices or None, why they are None, their linear rates or None);
    None when the data has no such model."""
    at = created.astimezone(UTC) if created.tzinfo else created.replace(tzinfo=UTC)
    return _terms(model, tier, batch, at)


@lru_cache(maxsize=4096)  # pragma: no mutate  (a cache only: the same answer without it)
def daily(model: str) -> bool:
    """Do the prices of ``model`` change only at the start of a UTC day (or is it not in the
    data at all)?  Then what prices it on a day holds for the whole day."""
    found = _find(model)
    return found is None or _daily(found[1])


def _terms(model: str, tier: str, batch: bool, at: datetime) -> _Terms | None:
    """What prices ``model`` at ``at`` (UTC), or None when the data has no such model.

    The same for a whole UTC day when every constraint of the model is a start date (all of
    OpenAI's in the data): kept by day, so a call pays a dictionary lookup, not the search.
    """
    key = (model, tier, batch, at.date())
    if key in _terms_by_day:
        return _terms_by_day[key]
    found = _find(model)
    terms = None if found is None else _terms_at(*found, tier, batch, at)
    if found is None or _daily(found[1]):
        _remember(_terms_by_day, key, terms)
    return terms


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) < 65536:  # pragma: no mutate  (a bound on the cache only)
        cache[key] = value


def _daily(info: Any) -> bool:
    """Does the price of ``info`` change only at the start of a (UTC) day?"""
    load()
    from genai_prices.types import StartDateConstraint

    rows = info.prices if isinstance(info.prices, list) else []
    constraints = [r.constraint for r in rows] + [v.constraint for v in info.price_variants or ()]
    return all(c is None or isinstance(c, StartDateConstraint) for c in constraints)


def _terms_at(provider: Any, info: Any, tier: str, batch: bool, at: datetime) -> _Terms:
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
        return info.id, version, None, f"{info.id} has no price for {what} on {at.date()}", None
    prices = info.get_prices(at, context)
    return info.id, version, prices, None, linear_rates(prices)


def linear_cost(rates: Rates, input_tokens: int, cached_tokens: int, output_tokens: int) -> Decimal:
    """The cost of a call from the linear ``rates`` (:func:`linear_rates`); ``cached_tokens``
    are the cached part of ``input_tokens``."""
    base, per_input, per_cached, per_output = rates
    return base + per_input * input_tokens + per_cached * cached_tokens + per_output * output_tokens


_TOKENS = ("input_tokens", "cache_read_tokens", "output_tokens")
_rates: dict[tuple[Any, ...], Rates | None] = {}


def linear_rates(prices: Any) -> Rates | None:
    """The package's own price of (input, cached, output) tokens as a linear function:
    (per call, per input token, per cached token on top, per output token), or None.

    ``calc_price`` spends about 50 us a call resolving units and decomposing usage, the same
    work for every call of a model.  Where the rates are flat (no tiers), a cost is linear in
    the three counts, so the coefficients are read once from ``calc_price`` itself (unit
    probes) and checked against it at a point off the probes; tiered prices (long context)
    and any price that fails the check keep going through ``calc_price``.  Exact: Decimal
    throughout, the per-token rates are the listed ones divided by a million.
    """
    try:
        key = tuple(sorted((k, v) for k, v in vars(prices).items() if v is not None))
        found = _rates.get(key, _MISSING)
    except TypeError:  # an unhashable (tiered) price
        return None
    if found is not _MISSING:
        return found  # type: ignore[return-value]
    rates = _probe(prices)
    _remember(_rates, key, rates)
    return rates


_MISSING = object()


def _probe(prices: Any) -> Rates | None:
    load()
    from genai_prices import Usage
    from genai_prices.types import TieredPrices

    if any(isinstance(v, TieredPrices) for v in vars(prices).values()):
        return None
    million = 1_000_000  # pragma: no mutate  (any probe size gives the same exact rates)

    def cost(n_in: int, cached: int, n_out: int) -> Decimal:
        usage = Usage(input_tokens=n_in, cache_read_tokens=cached, output_tokens=n_out)
        return Decimal(prices.calc_price(usage)["total_price"])

    try:
        base = cost(0, 0, 0)
        uncached = cost(million, 0, 0)
        per_input = (uncached - base) / million
        per_cached = (cost(million, million, 0) - uncached) / million
        per_output = (cost(0, 0, million) - base) / million
        n_in, cached, n_out = 1_234_567, 345_679, 76_543  # pragma: no mutate  (any point)
        rates = (base, per_input, per_cached, per_output)
        if linear_cost(rates, n_in, cached, n_out) != cost(n_in, cached, n_out):
            return None
    except (LookupError, ValueError):
        return None
    return rates


def openai_models() -> list[str]:
    """Every OpenAI model id in the maintained data."""
    load()
    from genai_prices.data_snapshot import get_snapshot

    for provider in get_snapshot().providers:
        if provider.id == PROVIDER:  # pragma: no mutate  (ids are unique; openai precedes >=)
            return [m.id for m in provider.models]
    return []


def newest_date() -> date | None:
    """The newest day the data's notes say a figure was verified (how old the data is)."""
    import re

    load()
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
