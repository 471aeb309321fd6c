"""Prices are data: model -> price rows with effective dates, and the exact cost of one call.

The built-in table is ``prices.toml`` beside this file; ``TOKENMETER_PRICES_FILE`` names a TOML
file of the same shape whose rows are added to it (a row with the same model and effective
date replaces the built-in one).  Amounts are parsed as ``Decimal`` and costs are exact, then
quantized to 1e-10 USD (half-even), the precision the ledger keeps; with list prices the
quantization never rounds anything (no list price has more than 3 decimals per 1M tokens).

A dated model name resolves to its family (``gpt-4o-mini-2024-07-18`` -> ``gpt-4o-mini``,
``gpt-4-0613`` -> ``gpt-4``).  Nothing else is guessed: ``gpt-4o-audio-preview`` or a
fine-tune is an unknown model, which costs ``None`` (with one warning per model per process),
never 0 and never a neighbour's price.
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

from pydantic import BaseModel, ConfigDict, ValidationError

from .context import CallRecord
from .money import MONEY_QUANTUM

logger = logging.getLogger("tokenmeter.pricing")

BUILTIN_PRICES = Path(__file__).with_name("prices.toml")
PER_MILLION = Decimal(1_000_000)
_DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})$")


class PriceError(ValueError):
    """The price table could not be read; the message names the file and the row."""


class PriceRow(BaseModel):
    """One model's prices from ``effective`` on.  Token prices are USD per 1M tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True, ignored_types=(cached_property,))

    model: str
    effective: date
    input: Decimal | None = None
    cached_input: Decimal | None = None
    output: Decimal | None = None
    image_input: Decimal | None = None
    images: dict[str, Decimal] | None = None  # "quality/size" -> USD per image

    @cached_property
    def version(self) -> str:
        return f"{self.model}@{self.effective.isoformat()}"


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


class PriceTable:
    """Price rows by model family, each family's rows sorted by effective date."""

    def __init__(self, rows: list[PriceRow]) -> None:
        by_key: dict[tuple[str, date], PriceRow] = {}
        for row in rows:  # later rows (overrides) replace earlier ones with the same key
            by_key[(row.model, row.effective)] = row
        self._rows: dict[str, list[PriceRow]] = {}
        for row in sorted(by_key.values(), key=lambda r: (r.model, r.effective)):
            self._rows.setdefault(row.model, []).append(row)
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._memo: dict[tuple[str, date], PriceRow | None] = {}  # bounded: models x days

    @classmethod
    def load(cls, override: Path | None = None) -> PriceTable:
        rows = _read_rows(BUILTIN_PRICES)
        if override is not None:
            rows += _read_rows(Path(override))
        return cls(rows)

    def rows(self, at: date | None = None) -> list[PriceRow]:
        """Every row, or the row in force at ``at`` for each model."""
        if at is None:
            return [r for rows in self._rows.values() for r in rows]
        found = [self.price_for(m, at) for m in self._rows]
        return [r for r in found if r is not None]

    def family(self, model: str) -> str | None:
        if model in self._rows:
            return model
        stripped = _DATE_SUFFIX.sub("", model)
        return stripped if stripped in self._rows else None

    def price_for(self, model: str | None, at: datetime | date | None = None) -> PriceRow | None:
        """The row for ``model`` in force at ``at`` (default now), or None if unknown."""
        if not model:
            return None
        day = at.date() if isinstance(at, datetime) else (at or datetime.now(UTC).date())
        key = (model, day)
        try:
            return self._memo[key]
        except KeyError:
            pass
        row = None
        family = self.family(model)
        if family is not None:
            rows = self._rows[family]
            index = bisect_right([r.effective for r in rows], day) - 1
            row = rows[index] if index >= 0 else None
        # The memo's memory bound: no price depends on it (its mutants are equivalent).
        if len(self._memo) > 10_000:  # pragma: no mutate
            self._memo.clear()
        self._memo[key] = row
        return row

    def warn_unknown(self, model: str | None) -> None:
        key = model or "<no model>"
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        logger.warning(
            "no price for model %r: its calls are recorded with cost NULL. Add it to a file "
            "named by TOKENMETER_PRICES_FILE.",
            key,
        )

    def cost_of(self, call: CallRecord) -> tuple[Decimal | None, str | None]:
        """Exact cost of ``call`` and the price version used; (None, None) if unknown."""
        if call.status == "billed_unknown":
            return None, None  # sent, never answered: what the provider billed is unknown
        if call.status in ("error", "blocked") and not (call.input_tokens or call.output_tokens):
            return Decimal(0), None  # a failed or refused request bills nothing
        row = self.price_for(call.model, call.created_at)
        if row is None:
            row = self.price_for(call.requested_model, call.created_at)
        if row is None:
            self.warn_unknown(call.model)
            return None, None
        if row.images is None and not call.usage_reported:
            return None, None  # the usage is unknown, not the price: no warning
        cost = _cost(row, call)
        if cost is None:
            self.warn_unknown(f"{call.model} ({call.image_quality}/{call.image_size})")
            return None, None
        return cost.quantize(MONEY_QUANTUM, rounding=ROUND_HALF_EVEN), row.version


def _cost(row: PriceRow, call: CallRecord) -> Decimal | None:
    if row.images is not None:  # dall-e: per image
        key = f"{call.image_quality or 'standard'}/{call.image_size or '1024x1024'}"
        per_image = row.images.get(key)
        return None if per_image is None else per_image * call.image_count
    # A category the call used but the row has no price for makes the cost unknown: pricing
    # it at $0 would be a guess.
    if (call.input_tokens and row.input is None) or (call.output_tokens and row.output is None):
        return None
    input_price = row.input if row.input is not None else Decimal(0)
    cached_price = row.cached_input if row.cached_input is not None else input_price
    image_input_price = row.image_input if row.image_input is not None else input_price
    cached = min(call.cached_input_tokens, call.input_tokens)
    image_in = call.input_image_tokens
    text_in = call.input_tokens - cached - image_in
    total = text_in * input_price + cached * cached_price + image_in * image_input_price
    if row.output is not None:  # (output tokens without an output price returned above)
        total += call.output_tokens * row.output
    return total / PER_MILLION


# A cache of loaded tables (its size and its presence change no price: equivalent mutants).
@lru_cache(maxsize=4)  # pragma: no mutate
def _table_for(override: str | None) -> PriceTable:
    return PriceTable.load(Path(override) if override else None)


def price_table() -> PriceTable:
    """The process's table: built-ins plus ``TOKENMETER_PRICES_FILE``, loaded once."""
    from .settings import get_settings

    override = get_settings().tokenmeter_prices_file
    return _table_for(str(override) if override else None)


def cost_of(call: CallRecord) -> tuple[Decimal | None, str | None]:
    """Exact cost of one call with the active price table (see :meth:`PriceTable.cost_of`)."""
    return price_table().cost_of(call)
