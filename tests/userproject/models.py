"""The user's own models: a module named `models` at the project's root, as most projects have."""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import tokenmeter


class Base(DeclarativeBase):
    pass


class Report(Base):
    """One generated report and what its OpenAI calls cost (kept by tokenmeter's rollup)."""

    __tablename__ = "reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    tokens_in: Mapped[int] = mapped_column(Integer, default=0)
    tokens_out: Mapped[int] = mapped_column(Integer, default=0)
    # tokenmeter.Money: exact on PostgreSQL (NUMERIC) and SQLite (scaled integer), where a plain
    # NUMERIC column would turn 0.000036 into a float.
    cost_usd: Mapped[Decimal] = mapped_column(tokenmeter.Money(), default=Decimal(0))
