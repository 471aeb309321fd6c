"""Rich tables for the query layer's rows (CLI and demo print the same thing)."""

from __future__ import annotations

from decimal import Decimal

from rich.table import Table

from reporting.queries import PostRow, RunRow, UsageRow


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


def runs_table(rows: list[RunRow], title: str = "pipeline runs") -> Table:
    table = Table(title=title)
    for column in ("run", "status", "prompt", "completion", "images", "cost", "summary"):
        table.add_column(column, justify="right" if column not in ("status", "summary") else "left")
    for r in rows:
        table.add_row(
            str(r.pipeline_run_id),
            r.status,
            f"{r.prompt_tokens:,}",
            f"{r.completion_tokens:,}",
            str(r.image_count),
            money(r.total_cost_usd),
            (r.summary or "")[:60],
        )
    return table


def posts_table(rows: list[PostRow], title: str = "scanned posts") -> Table:
    table = Table(title=title)
    for column in ("post", "subreddit", "promoted", "prompt", "completion", "cost", "title"):
        table.add_column(
            column, justify="right" if column in ("prompt", "completion", "cost") else "left"
        )
    for r in rows:
        table.add_row(
            r.post_id,
            r.subreddit,
            "yes" if r.promoted else "no",
            f"{r.prompt_tokens:,}",
            f"{r.completion_tokens:,}",
            money(r.total_cost_usd),
            (r.title or "")[:50],
        )
    return table
