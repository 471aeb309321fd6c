"""Column types shared by the tables.

``Money`` keeps US dollars exactly.  PostgreSQL stores ``NUMERIC(20, 10)``.  SQLite has no
exact decimal type (its NUMERIC affinity turns ``0.000045`` into a float), so there the value
is stored as an INTEGER count of 1e-10 USD; SQL ``SUM`` over it stays exact on both backends
and SQLAlchemy hands back ``Decimal`` either way (``func.sum(col)`` keeps the column type).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, Dialect, Numeric
from sqlalchemy.types import TypeDecorator, TypeEngine

MONEY_SCALE = 10
"""Decimal places kept for every amount of money (1e-10 USD)."""
MONEY_QUANTUM = Decimal(1).scaleb(-MONEY_SCALE)
_SQLITE_FACTOR = 10**MONEY_SCALE


class InexactMoneyError(ValueError):
    """A value with more than ``MONEY_SCALE`` decimal places would be silently rounded."""


def to_money(value: Decimal | int | str) -> Decimal:
    """Coerce to a Decimal with exactly ``MONEY_SCALE`` places, refusing floats and rounding."""
    if isinstance(value, float):
        raise TypeError("money must not be a float; pass a Decimal, int or str")
    dec = Decimal(value)
    quantized = dec.quantize(MONEY_QUANTUM)
    if quantized != dec:
        raise InexactMoneyError(f"{value!r} has more than {MONEY_SCALE} decimal places")
    return quantized


class Money(TypeDecorator[Decimal]):
    """Exact USD amount: NUMERIC(20, 10) on PostgreSQL, scaled BIGINT on SQLite."""

    impl = Numeric(20, MONEY_SCALE, asdecimal=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(BigInteger())
        return dialect.type_descriptor(Numeric(20, MONEY_SCALE, asdecimal=True))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        money = to_money(value)
        if dialect.name == "sqlite":
            return int(money.scaleb(MONEY_SCALE))
        return money

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        if dialect.name == "sqlite":
            if isinstance(value, float):  # SUM() of an empty set or AVG(): not exact, refuse
                raise TypeError("float result for a Money column on SQLite")
            return (Decimal(int(value)) / _SQLITE_FACTOR).quantize(MONEY_QUANTUM)
        return Decimal(value).quantize(MONEY_QUANTUM)
