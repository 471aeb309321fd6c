"""Prices are data: the exact cost of one call, and what priced it.

Three layers, the first that knows the model wins:

1. the user's file, ``TOKENMETER_PRICES_FILE`` (negotiated or custom rows, with effective
   dates): always first, the exact name, then its family;
2. tokenmeter's own dated table, ``prices.toml`` beside this file, for what the maintained
   data lacks (dall-e's per-image prices);
3. the maintained data, ``genai-prices`` (see ``maintained``), for every token-priced model,
   with its own curated names (a dated snapshot such as ``gpt-4o-2024-05-13`` has its own row).

Then, only for names no layer knows exactly, a dated name resolves to its family in the TOML
layers (``my-model-2026-01-01`` -> ``my-model``).  Nothing else is guessed: an unknown model
costs ``None`` with one warning per model per process, never 0 and never a neighbour's price.

Every billing dimension is priced at its own rate: the served service tier (from the response,
not the request), batch processing, cached and cache-write input, audio and image input tokens,
output (reasoning included: OpenAI counts it in the output), and per-call tool fees (web and
file search).  A dimension the call used but its price row lacks makes the cost unknown.
Amounts are Decimal and costs exact, quantized to 1e-10 USD (half-even), what the ledger keeps.
"""

from __future__ import annotations

import logging
import re
import threading
import tomllib
from bisect import bisect_right
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import maintained
from . import settings as _settings
from .context import CallRecord
from .money import MONEY_QUANTUM, MONEY_SCALE

logger = logging.getLogger("tokenmeter.pricing")

BUILTIN_PRICES = Path(__file__).with_name("prices.toml")
PER_MILLION = Decimal(1_000_000)
PER_THOUSAND = Decimal(1_000)
_DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})$")
#: Served service tiers as priced: "fast" is served (and billed) as priority.
_TIERS = {
    None: "default",
    "": "default",
    "auto": "default",
    "default": "default",
    "fast": "priority",
}


def served_tier(value: str | None) -> str:
    """The tier a response says served it, as priced (``default`` when it says nothing)."""
    return _TIERS.get(value, value or "default")


class PriceError(ValueError):
    """The price table could not be read; the message names the file and the row."""


class PriceRow(BaseModel):
    """One model's prices from ``effective`` on.  Token prices are USD per 1M tokens; tool
    calls USD per 1,000 calls; images USD per image."""

    model_config = ConfigDict(extra="forbid", frozen=True, ignored_types=(cached_property,))

    model: str
    effective: datetime | date  # a day (from its start, UTC), or an exact moment
    service_tier: Literal["default", "flex", "priority", "scale"] = "default"
    batch: bool = False
    input: Decimal | None = None
    cached_input: Decimal | None = None
    cache_write: Decimal | None = None
    output: Decimal | None = None
    image_input: Decimal | None = None
    input_audio: Decimal | None = None
    output_audio: Decimal | None = None
    web_search: Decimal | None = Field(default=None, description="USD per 1,000 calls")
    file_search: Decimal | None = Field(default=None, description="USD per 1,000 calls")
    images: dict[str, Decimal] | None = None  # "quality/size" -> USD per image

    @cached_property
    def starts(self) -> datetime:
        """The moment the row takes effect (a day: its first moment, UTC)."""
        if isinstance(self.effective, datetime):
            at = self.effective
            return at if at.tzinfo else at.replace(tzinfo=UTC)
        return datetime(self.effective.year, self.effective.month, self.effective.day, tzinfo=UTC)

    @cached_property
    def version(self) -> str:
        # (equivalent mutants: tiers are served_tier()'s "default", "flex", "priority",
        # "scale"..., none sorting before "default" nor a second "default" object)
        standard = self.service_tier == "default"  # pragma: no mutate
        variant = "" if standard else f" {self.service_tier}"
        return f"{self.model}@{self.effective.isoformat()}{variant}{' batch' if self.batch else ''}"


def _read_rows(path: Path) -> list[PriceRow]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh, parse_float=Decimal)
    except FileNotFoundError:
        raise PriceError(f"price file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise PriceError(f"price file {path} is not valid TOML: {exc}") from None
    rows = []
    for index, raw in enumerate(data.get("price", []), start=1):
        try:
            rows.append(PriceRow.model_validate(raw))
        except ValidationError as exc:
            name = raw.get("model", "?") if isinstance(raw, dict) else "?"
            raise PriceError(f"{path}: [[price]] row {index} ({name}): {exc}") from None
    if not rows:
        raise PriceError(f"price file {path} has no [[price]] rows")
    return rows


_Key = tuple[str, str, bool]  # (model, service tier, batch)


class PriceTable:
    """One TOML layer: rows by (model, tier, batch), each sorted by effective date."""

    def __init__(self, rows: list[PriceRow], source: str = "tokenmeter") -> None:
        self.source = source
        by_key: dict[tuple[_Key, datetime], PriceRow] = {}
        for row in rows:  # a later row with the same key and start replaces an earlier one
            by_key[((row.model, row.service_tier, row.batch), row.starts)] = row
        self._rows: dict[_Key, list[PriceRow]] = {}
        for (key, _), row in sorted(by_key.items(), key=lambda kv: kv[1].starts):
            self._rows.setdefault(key, []).append(row)
        self._models = {key[0] for key in self._rows}

    @classmethod
    def load(cls, path: Path, source: str) -> PriceTable:
        return cls(_read_rows(path), source)

    def rows(self, at: date | None = None) -> list[PriceRow]:
        """Every row, or the row in force at the end of day ``at`` for each model and variant."""
        if at is None:
            return [r for rows in self._rows.values() for r in rows]
        end = datetime(at.year, at.month, at.day, 23, 59, 59, tzinfo=UTC)
        found = [self._at(key, end) for key in self._rows]
        return [r for r in found if r is not None]

    def knows(self, model: str) -> bool:
        return model in self._models

    def family(self, model: str) -> str | None:
        """``model`` if listed, else its name without a date suffix if that is listed."""
        if model in self._models:
            return model
        stripped = _DATE_SUFFIX.sub("", model)
        return stripped if stripped in self._models else None

    def _at(self, key: _Key, at: datetime) -> PriceRow | None:
        rows = self._rows.get(key)
        if not rows:
            return None
        index = bisect_right([r.starts for r in rows], at) - 1
        return rows[index] if index >= 0 else None

    def price_for(
        self, model: str, at: datetime | date, tier: str = "default", batch: bool = False
    ) -> PriceRow | None:
        """The row for exactly ``model`` (and that tier and batch) in force at ``at``."""
        return self._at((model, tier, batch), _moment(at))


class Price(NamedTuple):
    """The cost of one call (None: unknown) and what priced it (a tuple: one is made for every
    call, in half the time of a frozen dataclass)."""

    cost: Decimal | None
    source: str | None = None  # "genai-prices 0.2.3", "tokenmeter", "file:/path/to/prices.toml"
    version: str | None = None  # the row: "gpt-5-mini@listed flex", "dall-e-3@2023-11-06"


#: What prices a plain call: (source, row version, its linear rates, those in money units
#: when each is a whole number of them (:func:`in_units`), else None).
_PlainTerms = tuple[str, str, "maintained.Rates", "tuple[int, int, int, int] | None"]
UNKNOWN = Price(None)
UNANSWERED = frozenset({"billed_unknown"})
NOTHING = Price(Decimal(0))  # a failed or refused request bills nothing


class Prices:
    """The layers, resolved per call (see the module's docstring)."""

    def __init__(self, user: PriceTable | None, builtin: PriceTable) -> None:
        self.user, self.builtin = user, builtin
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        #: (response model, requested model, tier, batch, UTC day) of a plain call -> what
        #: prices it that day as a linear function, or None where only the full path can
        self._plain: dict[tuple[object, ...], _PlainTerms | None] = {}

    @classmethod
    def load(cls, override: Path | None = None) -> Prices:
        builtin = PriceTable.load(BUILTIN_PRICES, "tokenmeter")
        user = PriceTable.load(Path(override), f"file:{override}") if override else None
        return cls(user, builtin)

    @property
    def tables(self) -> list[PriceTable]:
        return [t for t in (self.user, self.builtin) if t is not None]

    def cost_of(self, call: CallRecord) -> Price:
        """Exact cost of ``call`` and what priced it; ``Price(None)`` when unknown."""
        if call.status in UNANSWERED:
            return UNKNOWN  # sent, never answered: what the provider billed is unknown
        if call.status in ("error", "blocked") and not (call.input_tokens or call.output_tokens):
            return NOTHING
        plain = self._plain_cost(call)
        if plain is not None:
            return plain
        tier = served_tier(call.service_tier)
        names = [n for n in dict.fromkeys((call.model, call.requested_model)) if n]
        at = _moment(call.created_at)
        for name in names:
            found = self._resolve(call, name, at, tier)
            if found is not None:
                return found
        self.warn_unknown(call.model, "no price for this model")
        return UNKNOWN

    def _plain_cost(self, call: CallRecord) -> Price | None:
        """The cost of a plain call (answered, billed in input, cached input and output tokens
        only, as most are) from terms kept per model, tier and day; None: the full path.

        The terms are the maintained data's own linear rates for that day (the same numbers
        ``maintained.quote`` computes with), found once by the same layer order as
        :meth:`_resolve`; a model a TOML layer prices, or whose prices are not linear or may
        change within a day, always takes the full path.
        """
        if call.status != "ok" or not call.usage_reported or call.operation == "image":
            return None
        if (  # a dimension of its own (one test per field: the fastest way to say it)
            call.cache_write_tokens
            or call.input_image_tokens
            or call.input_audio_tokens
            or call.output_audio_tokens
            or call.web_search_calls
            or call.file_search_calls
            or call.image_count
        ):
            return None
        created = call.created_at
        if created.tzinfo is not UTC:
            return None
        key = (
            call.response_model,
            call.requested_model,
            call.service_tier,
            call.batch,
            created.date(),
        )
        try:
            terms = self._plain[key]
        except KeyError:
            terms = self._plain_terms(call)
            if len(self._plain) < 65536:  # pragma: no mutate  (a bound on the cache only)
                self._plain[key] = terms
        if terms is None:
            return None
        source, version, rates, units = terms
        tokens = call.input_tokens
        cached = call.cached_input_tokens
        if cached > tokens:
            cached = tokens
        if units is not None:  # rates in whole money units: the exact sum is an integer
            base, per_input, per_cached, per_output = units
            total = (
                base + per_input * tokens + per_cached * cached + per_output * call.output_tokens
            )
            return Price(Decimal(total).scaleb(-MONEY_SCALE), source, version)
        cost = maintained.linear_cost(rates, tokens, cached, call.output_tokens)
        return Price(_exact(cost), source, version)

    def _plain_terms(self, call: CallRecord) -> _PlainTerms | None:
        tier = served_tier(call.service_tier)
        for name in dict.fromkeys((call.model, call.requested_model)):
            if not name:
                continue
            if self._table_layer(name) is not None or not maintained.daily(name):
                return None
            terms = maintained.terms(name, tier, call.batch, call.created_at)
            if terms is None:  # not in the data: the family in a TOML layer, or the next name
                if self.builtin.family(name) is not None:
                    return None
                continue
            _, version, found, _, rates = terms
            if found is None or rates is None:
                return None
            return maintained.source(), version, rates, in_units(rates)
        return None

    def _table_layer(self, name: str) -> tuple[PriceTable, str] | None:
        """The TOML layer that prices ``name`` first (the user's rows always win: the exact
        name, then its family; then tokenmeter's own table), or None."""
        layers: list[tuple[PriceTable, str | None]] = []
        if self.user is not None:
            layers += [(self.user, name), (self.user, self.user.family(name))]
        layers.append((self.builtin, name))
        for table, model in layers:
            if model and table.knows(model):
                return table, model
        return None

    def _resolve(self, call: CallRecord, name: str, at: datetime, tier: str) -> Price | None:
        """The price of ``call`` as model ``name``; None when no layer knows the name."""
        layer = self._table_layer(name)
        if layer is not None:
            return self._from_row(call, layer[0], layer[1], at, tier)
        quote = maintained.quote(call, name, tier, call.batch)
        if quote is not None:
            if quote.cost is None:
                if quote.reason is not None:
                    self.warn_unknown(f"{quote.model_id} ({quote.version})", quote.reason)
                return Price(None, maintained.source(), quote.version)
            return Price(_exact(quote.cost), maintained.source(), quote.version)
        family = self.builtin.family(name)
        if family is not None:
            return self._from_row(call, self.builtin, family, at, tier)
        return None

    def _from_row(
        self, call: CallRecord, table: PriceTable, model: str, at: datetime, tier: str
    ) -> Price:
        row = table.price_for(model, at, tier, call.batch)
        if row is None:
            # (the warning's words only: its mutants change no price)
            batch = " batch" if call.batch else ""  # pragma: no mutate
            what = f"{model} ({tier}{batch}) on {at.date()}"
            self.warn_unknown(what, f"{table.source} has no row in force")
            return Price(None, table.source)
        if row.images is None and not call.usage_reported:
            return Price(None, table.source, row.version)  # the usage is unknown, not the price
        cost = _cost(row, call)
        if cost is None:
            self.warn_unknown(f"{row.version}", "the row lacks a price for a dimension used")
            return Price(None, table.source, row.version)
        return Price(_exact(cost), table.source, row.version)

    def quote(
        self, model: str, tier: str = "default", batch: bool = False, at: date | None = None
    ) -> tuple[Price, CallRecord]:
        """What a 1M-input, 1M-output call to ``model`` would cost (``tokenmeter prices``)."""
        call = CallRecord(
            operation="chat",
            requested_model=model,
            input_tokens=1_000_000,
            output_tokens=1_000_000,
            service_tier=tier,
            batch=batch,
        )
        if at is not None:
            # midday of the day asked for (an arbitrary hour of it, hence no mutation)
            noon = 12  # pragma: no mutate
            call.created_at = datetime(at.year, at.month, at.day, noon, tzinfo=UTC)
        return self.cost_of(call), call

    def warn_unknown(self, what: str | None, why: str) -> None:
        key = what or "<no model>"
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        logger.warning(
            "no price for %s (%s): its calls are recorded with cost NULL. Add a row to a file "
            "named by TOKENMETER_PRICES_FILE.",
            key,
            why,
        )


def _moment(at: datetime | date) -> datetime:
    """A call's moment, timezone-aware (a bare day: its first moment, UTC)."""
    if isinstance(at, datetime):
        return at if at.tzinfo else at.replace(tzinfo=UTC)
    return datetime(at.year, at.month, at.day, tzinfo=UTC)


def in_units(rates: maintained.Rates) -> tuple[int, int, int, int] | None:
    """``rates`` as whole numbers of the money quantum (1e-10 USD) a token, when every one is
    one (most are: $0.15 / MTok is 1,500 units a token), else None.  A cost is then summed
    in integers, exactly the value the Decimal sum rounds to (there is nothing to round), in
    a fraction of its time."""
    units = []
    for rate in rates:
        scaled = rate.scaleb(MONEY_SCALE)
        if scaled != scaled.to_integral_value():
            return None
        units.append(int(scaled))
    return units[0], units[1], units[2], units[3]


def _exact(cost: Decimal) -> Decimal:
    return cost.quantize(MONEY_QUANTUM, rounding=ROUND_HALF_EVEN)


def _cost(row: PriceRow, call: CallRecord) -> Decimal | None:
    if row.images is not None:  # dall-e: per image
        key = f"{call.image_quality or 'standard'}/{call.image_size or '1024x1024'}"
        per_image = row.images.get(key)
        return None if per_image is None else per_image * call.image_count
    # A category the call used but the row has no price for makes the cost unknown: pricing
    # it at $0 would be a guess.  Cache writes are the exception where OpenAI says what they
    # cost without a price of their own: plain input, on every model whose writes carry no
    # surcharge (maintained.writes_surcharged).
    writes = call.cache_write_tokens
    if writes and row.cache_write is None and not maintained.writes_surcharged(row.model):
        writes = 0  # left in the plain input below
    needed = (
        (call.input_tokens, row.input),
        (call.output_tokens, row.output),
        (writes, row.cache_write),
        (call.input_audio_tokens, row.input_audio),
        (call.output_audio_tokens, row.output_audio),
        (call.web_search_calls, row.web_search),
        (call.file_search_calls, row.file_search),
    )
    if any(used and price is None for used, price in needed):
        return None
    input_price = row.input
    cached_price = row.cached_input if row.cached_input is not None else input_price
    image_input_price = row.image_input if row.image_input is not None else input_price
    # (count, USD per 1M): input tokens by kind (the plain rest last), then output tokens by
    # kind; every price used is known (checked above), so only counts of 0 meet a None price
    input_parts = [
        (min(call.cached_input_tokens, call.input_tokens), cached_price),
        (call.input_image_tokens, image_input_price),
        (writes, row.cache_write),
        (call.input_audio_tokens, row.input_audio),
    ]
    text_in = call.input_tokens - sum(n for n, _ in input_parts)
    parts = [
        *input_parts,
        (text_in, input_price),
        (call.output_tokens - call.output_audio_tokens, row.output),
        (call.output_audio_tokens, row.output_audio),
    ]
    fees = [(call.web_search_calls, row.web_search), (call.file_search_calls, row.file_search)]
    return _sum(parts) / PER_MILLION + _sum(fees) / PER_THOUSAND


def _sum(parts: list[tuple[int, Decimal | None]]) -> Decimal:
    """Sum of count x price; a None price only ever meets a count of 0 (checked before), so
    `and` -> `or` here is an equivalent mutant."""
    return sum((n * p for n, p in parts if n and p is not None), Decimal(0))  # pragma: no mutate


# A cache of loaded tables (its size and its presence change no price: equivalent mutants).
@lru_cache(maxsize=4)  # pragma: no mutate
def _prices_for(override: str | None) -> Prices:
    return Prices.load(Path(override) if override else None)


_last: tuple[object, Prices] | None = None


def prices() -> Prices:
    """The process's prices: the user's file, tokenmeter's table, the maintained data."""
    global _last
    settings = _settings.get_settings()  # the module's: a test may replace the function
    last = _last
    if last is not None and last[0] is settings:  # the same settings: the same file
        return last[1]
    override = settings.tokenmeter_prices_file
    found = _prices_for(str(override) if override else None)
    _last = (settings, found)
    return found


def cost_of(call: CallRecord) -> Price:
    """Exact cost of one call with the active prices (see :meth:`Prices.cost_of`)."""
    return prices().cost_of(call)
