"""Rich tables for the query layer's rows (CLI and demo print the same thing)."""

from __future__ import annotations

from decimal import Decimal

from rich.table import Table

from .queries import ScopeRow, UsageRow


def money(value: Decimal | None) -> str:
    """Exact dollars in plain notation (never ``2E-8``); ``unknown`` for a NULL cost."""
    if value is None:
        return "unknown"
    text = format(value.normalize(), "f")
    whole, _, frac = text.partition(".")
    return f"${whole}.{(frac + '00')[: max(2, len(frac))]}"


def usage_table(rows: list[UsageRow], title: str, key: str) -> Table:
    table = Table(title=title)
    for column in (
        key,
        "calls",
        "errors",
        "input",
        "cached",
        "output",
        "reasoning",
        "images",
        "cost",
    ):
        table.add_column(column, justify="left" if column == key else "right")
    for r in rows:
        table.add_row(
            r.key,
            str(r.calls),
            str(r.errors),
            f"{r.input_tokens:,}",
            f"{r.cached_input_tokens:,}",
            f"{r.output_tokens:,}",
            f"{r.reasoning_tokens:,}",
            str(r.image_count),
            money(r.cost_usd),
        )
    return table


def scopes_table(rows: list[ScopeRow], title: str = "most expensive scopes") -> Table:
    table = Table(title=title)
    for column in ("kind", "ref", "calls", "input", "output", "images", "cost"):
        table.add_column(column, justify="left" if column in ("kind", "ref") else "right")
    for s in rows:
        table.add_row(
            s.kind,
            s.ref,
            str(s.calls),
            f"{s.input_tokens:,}",
            f"{s.output_tokens:,}",
            str(s.image_count),
            money(s.cost_usd),
        )
    return table
