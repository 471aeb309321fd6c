"""Rich tables for the query layer's rows (CLI and demo print the same thing)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from rich import box
from rich.table import Table

from .queries import ScopeRow, UsageRow


def money(value: Decimal | None) -> str:
    """Exact dollars in plain notation (never ``2E-8``); ``unknown`` for a NULL cost."""
    if value is None:
        return "unknown"
    text = format(value.normalize(), "f")
    whole, _, frac = text.partition(".")
    return f"${whole}.{(frac + '00')[: max(2, len(frac))]}"


@dataclass(frozen=True)
class Col:
    """A column of a fitted table.  ``kind``: ``key`` (a name: never cut, folded only if
    nothing else fits), ``count`` (may be dropped: first when all zero, then by ``drop``
    order when the terminal is narrow), ``money`` (never cut or wrapped), ``text`` (free text:
    wraps between words, last)."""

    name: str
    kind: str = "count"
    short: str | None = None  # a shorter header for narrow terminals
    drop: int = 0  # the higher, the sooner dropped when too narrow (0: never)


def fitted_table(
    cols: list[Col], rows: list[list[str]], title: str | None, width: int | None
) -> Table:
    """A table that fits ``width`` columns without losing a figure or a name.

    Counts that are zero in every row are left out (and said so); headers shorten, then the
    least needed counts are left out (said so), before anything could be cut.  Money and
    names are never truncated; free text wraps.  ``width`` None: the console's at print time.
    """
    keep = list(range(len(cols)))
    notes: list[str] = []
    zero = [
        i
        for i in keep
        if cols[i].kind == "count"
        and cols[i].drop
        and rows
        and all(r[i] in ("0", "") for r in rows)
    ]
    if zero:
        notes.append("all zero: " + ", ".join(cols[i].name for i in zero))
        keep = [i for i in keep if i not in zero]

    def needed(indexes: list[int], short: bool) -> int:
        total = 0
        for i in indexes:
            header = (cols[i].short or cols[i].name) if short else cols[i].name
            cells = [len(r[i]) for r in rows]
            if cols[i].kind == "text":
                total += max(len(header), min(max(cells, default=0), 12))
            else:
                total += max([len(header), *cells])
        return total + 3 * (len(indexes) - 1)  # a space of padding, the rule, a space

    # two columns to spare: rich versions differ by a column or two in what they take
    width = None if width is None else width - 2
    short = False
    if width is not None and needed(keep, False) > width:
        short = True
        droppable = sorted((i for i in keep if cols[i].drop), key=lambda i: -cols[i].drop)
        dropped = []
        for i in droppable:
            if needed(keep, True) <= width:
                break
            keep.remove(i)
            dropped.append(cols[i].name)
        if dropped:
            notes.append(f"not shown at {width + 2} columns: " + ", ".join(dropped))
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        show_edge=False,  # (with pad_edge off: a line is the cells and 3 spaces between)
        pad_edge=False,
        caption="; ".join(notes) or None,
        caption_justify="left",
    )
    over = needed(keep, short) - width if width is not None else 0
    keys = [i for i in keep if cols[i].kind == "key"]
    for i in keep:
        c = cols[i]
        header = (c.short or c.name) if short else c.name
        longest = max([len(header), *(len(r[i]) for r in rows)])
        if c.kind == "text":
            table.add_column(header, justify="left", ratio=1, overflow="fold")
        elif c.kind == "key":
            # never cut: folded onto more lines only when nothing else is left to leave out
            fold = over > 0 and i == max(keys, key=lambda k: max(len(r[k]) for r in rows))
            room = max(8, longest - over) if fold else longest
            table.add_column(
                header, justify="left", min_width=room, max_width=room, overflow="fold"
            )
        else:
            table.add_column(header, justify="right", no_wrap=True, min_width=longest)
    for r in rows:
        table.add_row(*(r[i] for i in keep))
    return table


def usage_table(rows: list[UsageRow], title: str, key: str, width: int | None = None) -> Table:
    cols = [
        Col(key, "key"),
        Col("calls", drop=7),
        Col("errors", short="err", drop=6),
        Col("input", short="in", drop=2),
        Col("cached", short="cach", drop=4),
        Col("output", short="out", drop=1),
        Col("reasoning", short="reas", drop=5),
        Col("images", short="img", drop=3),
        Col("cost", "money"),
    ]
    cells = [
        [
            r.key,
            str(r.calls),
            str(r.errors),
            f"{r.input_tokens:,}",
            f"{r.cached_input_tokens:,}",
            f"{r.output_tokens:,}",
            f"{r.reasoning_tokens:,}",
            str(r.image_count),
            money(r.cost_usd),
        ]
        for r in rows
    ]
    return fitted_table(cols, cells, title, width)


def scopes_table(
    rows: list[ScopeRow], title: str = "most expensive scopes", width: int | None = None
) -> Table:
    cols = [
        Col("kind", "key"),
        Col("ref", "key"),
        Col("calls", drop=7),
        Col("input", short="in", drop=2),
        Col("output", short="out", drop=1),
        Col("images", short="img", drop=3),
        Col("cost", "money"),
    ]
    cells = [
        [
            s.kind,
            s.ref,
            str(s.calls),
            f"{s.input_tokens:,}",
            f"{s.output_tokens:,}",
            str(s.image_count),
            money(s.cost_usd),
        ]
        for s in rows
    ]
    return fitted_table(cols, cells, title, width)
