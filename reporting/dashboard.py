"""The dashboard's pages, server-rendered HTML (no script, no external asset: works offline).

- ``/``: a date range and grouping picker (a plain GET form), cost over time stacked by the
  chosen grouping (SVG), the total, the most expensive tasks, pipeline runs and scanned posts
  (each linking to its calls), a panel of unpriced, failed and billed-unknown calls, today's
  spend against the daily budget, and the last provider audit.
- ``/scopes/{kind}/{ref}``: one scope's calls, every attempt: model, tier, tokens by
  category, cost, status, latency.

Every figure comes from ``queries`` (the same numbers as the CLI and the API).
"""

from __future__ import annotations

import html
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import quote

from . import queries
from .render import money

GROUPINGS = ("model", "task", "kind", "tier", "project", "status")
PALETTE = ("#3b82f6", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#14b8a6", "#f472b6", "#64748b")
STYLE = (
    "body{font-family:sans-serif;margin:2em;color:#111;max-width:1100px}"
    "td,th{padding:4px 10px;text-align:right;white-space:nowrap}th{background:#eef}"
    "td.l,th.l{text-align:left}table{border-collapse:collapse;margin-bottom:1.5em}"
    "tr:nth-child(even){background:#f7f7fb}.panel{display:inline-block;vertical-align:top;"
    "border:1px solid #ccd;padding:.6em 1em;margin:0 1em 1em 0}.warn{color:#b45309}"
    "form{margin:1em 0}label{margin-right:1em}"
)


def e(value: object) -> str:
    return html.escape(str(value))


def page(title: str, body: str, sign_out: bool) -> str:
    out = (
        '<form method="post" action="/logout" style="float:right">'
        '<button type="submit">Sign out</button></form>'
        if sign_out
        else ""
    )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
        f"<style>{STYLE}</style></head><body>{out}{body}</body></html>"
    )


def table(headers: list[str], rows: list[list[str]], left: int = 1, html_id: str = "") -> str:
    """Cells are HTML already (escaped by the caller); the first ``left`` columns align left."""
    head = "".join(f'<th class="{"l" if i < left else ""}">{h}</th>' for i, h in enumerate(headers))
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    ident = f' id="{html_id}"' if html_id else ""
    return f"<table{ident}><tr>{head}</tr>{body or '<tr><td>none</td></tr>'}</table>"


def stacked_bars(
    days: dict[str, dict[str, Decimal]], title: str, every_day: list[str] | None = None
) -> str:
    """Cost per day, one bar per day stacked by group (the largest groups keep a colour, the
    rest are "other"), with a legend.  SVG only."""
    if not days:
        return f"<h2>{e(title)}</h2><p>no data</p>"
    totals: dict[str, Decimal] = {}
    for groups in days.values():
        for key, cost in groups.items():
            totals[key] = totals.get(key, Decimal(0)) + cost
    named = [k for k, _ in sorted(totals.items(), key=lambda kv: -kv[1])][: len(PALETTE) - 1]
    colour = {k: PALETTE[i] for i, k in enumerate(named)}
    top = max((sum(g.values(), Decimal(0)) for g in days.values()), default=Decimal(0))
    top = top or Decimal(1)
    ordered = every_day or sorted(days)  # every day of the window: a day without cost is a gap
    step = max(8, min(28, 900 // max(len(ordered), 1)))
    bar, gap, height = step - max(2, step // 5), max(2, step // 5), 220
    label_every = max(1, -(-40 // step))  # a label needs about 40 px
    parts = []
    for i, day in enumerate(ordered):
        x, y = 40 + i * (bar + gap), height
        stacks = sorted(days.get(day, {}).items(), key=lambda kv: (kv[0] not in colour, -kv[1]))
        for key, cost in stacks:
            h = int(Decimal(height - 20) * cost / top)
            if h <= 0:
                continue
            y -= h
            fill = colour.get(key, PALETTE[-1])
            parts.append(
                f'<rect x="{x}" y="{y}" width="{bar}" height="{h}" fill="{fill}">'
                f"<title>{e(day)} {e(key)}: {e(money(cost))}</title></rect>"
            )
        if i % label_every == 0:
            parts.append(f'<text x="{x}" y="{height + 14}" font-size="10">{e(day[5:])}</text>')
    width = 60 + len(ordered) * (bar + gap)
    legend = " ".join(f'<span style="color:{colour[k]}">&#9632;</span> {e(k)}' for k in named) + (
        f' <span style="color:{PALETTE[-1]}">&#9632;</span> other'
        if len(totals) > len(named)
        else ""
    )
    return (
        f'<h2>{e(title)}</h2><svg width="{width}" height="{height + 20}" role="img" '
        f'aria-label="{e(title)}">{"".join(parts)}</svg><p>{legend}</p>'
    )


def _days(start: datetime, end: datetime) -> list[str]:
    out, day = [], start.date()
    while datetime(day.year, day.month, day.day, tzinfo=start.tzinfo) < end:
        out.append(day.isoformat())
        day += timedelta(days=1)
    return out


def scope_link(kind: str, ref: str) -> str:
    return f'<a href="/scopes/{quote(kind, safe="")}/{quote(ref, safe="")}">{e(ref)}</a>'


def overview(
    session: Any,
    start: datetime,
    end: datetime,
    group_by: str,
    audit_html: str,
    budget_usd: Decimal | None,
    today_usd: Decimal | None,
    sign_out: bool,
    days_text: str,
) -> str:
    rows = queries.usage_summary(session, start, end, group_by)  # type: ignore[arg-type]
    total = queries.total_of(rows)
    by_status = {r.key: r for r in queries.usage_summary(session, start, end, "status")}
    tasks = queries.usage_summary(session, start, end, "task")[:10]
    runs = queries.top_scopes(session, start, end, kind="pipeline_run", limit=10)
    posts = queries.top_scopes(session, start, end, kind="scanned_post", limit=10)
    picker = (
        '<form method="get" action="/" id="range">'
        f'<label>from <input type="date" name="start_date" value="{start:%Y-%m-%d}"></label>'
        f'<label>to <input type="date" name="end_date" value="{end:%Y-%m-%d}"></label>'
        '<label>group by <select name="group_by">'
        + "".join(
            f'<option value="{g}"{" selected" if g == group_by else ""}>{g}</option>'
            for g in GROUPINGS
        )
        + '</select></label><button type="submit">Show</button></form>'
    )
    unpriced = total.unpriced_calls
    billed_unknown = by_status.get("billed_unknown")
    health = (
        '<div class="panel" id="health"><h3>Needs a look</h3>'
        f'<p><b id="unpriced">{unpriced}</b> calls with no known price'
        + (' <span class="warn">(their cost is unknown, not $0)</span>' if unpriced else "")
        + f'</p><p><b id="errors">{total.errors}</b> failed calls</p>'
        f'<p><b id="billed-unknown">{billed_unknown.calls if billed_unknown else 0}</b> '
        "calls billed but never answered (cost unknown)</p></div>"
    )
    if budget_usd is None:
        budget = '<div class="panel" id="budget"><h3>Daily budget</h3><p>no cap set '
        budget += "(TOKENMETER_DAILY_BUDGET_USD)</p></div>"
    else:
        spent = today_usd or Decimal(0)
        share = f"{spent / budget_usd:.0%}" if budget_usd else "-"
        budget = (
            '<div class="panel" id="budget"><h3>Daily budget (UTC today)</h3>'
            f'<p><b id="budget-spent">{money(spent)}</b> of {money(budget_usd)} ({share})</p></div>'
        )
    group_rows = [
        [
            e(r.key),
            str(r.calls),
            f"{r.input_tokens:,}",
            f"{r.cached_input_tokens:,}",
            f"{r.output_tokens:,}",
            str(r.image_count),
            e(money(r.cost_usd)),
        ]
        for r in rows
    ]
    headers = [e(group_by), "calls", "input", "cached", "output", "images", "cost"]
    body = "".join(
        [
            f"<h1>OpenAI usage, {e(days_text)}</h1>",
            picker,
            f'<p id="total">Total: <b id="total-cost">{money(total.cost_usd)}</b> over '
            f"{total.calls} calls, {total.input_tokens:,} input ({total.cached_input_tokens:,} "
            f"cached), {total.output_tokens:,} output tokens, {total.image_count} images.</p>",
            health,
            budget,
            audit_html,
            stacked_bars(
                queries.cost_by_day(session, start, end, group_by),  # type: ignore[arg-type]
                f"Cost per day (UTC) by {group_by}",
                _days(start, end),
            ),
            f"<h2>By {e(group_by)}</h2>",
            table(headers, group_rows, html_id="groups"),
            "<h2>Most expensive tasks</h2>",
            table(
                ["task", "calls", "cost"],
                [[e(r.key), str(r.calls), e(money(r.cost_usd))] for r in tasks],
                html_id="tasks",
            ),
            "<h2>Most expensive pipeline runs</h2>",
            _scopes(runs, "runs"),
            "<h2>Most expensive scanned posts</h2>",
            _scopes(posts, "posts"),
        ]
    )
    return page("tokenmeter usage", body, sign_out)


def _scopes(rows: list[queries.ScopeRow], html_id: str) -> str:
    return table(
        ["ref", "calls", "input", "output", "images", "cost"],
        [
            [
                scope_link(s.kind, s.ref),
                str(s.calls),
                f"{s.input_tokens:,}",
                f"{s.output_tokens:,}",
                str(s.image_count),
                e(money(s.cost_usd)),
            ]
            for s in rows
        ],
        html_id=html_id,
    )


def scope_page(kind: str, ref: str, calls: list[Any], sign_out: bool) -> str:
    """Every call of one scope, all attempts, oldest first, and their exact total."""
    priced = [c.cost_usd for c in calls if c.cost_usd is not None]
    unknown = sum(1 for c in calls if c.cost_usd is None and c.status not in ("error", "blocked"))
    total = None if unknown else sum(priced, Decimal(0))
    rows = [
        [
            f"{c.created_at:%Y-%m-%d %H:%M:%S}",
            e(c.model or "-"),
            e(c.operation),
            e(c.service_tier or "default"),
            e(c.status),
            f"{c.input_tokens:,}",
            f"{c.cached_input_tokens:,}",
            f"{c.output_tokens:,}",
            f"{c.reasoning_tokens:,}",
            str(c.image_count),
            e(money(c.cost_usd)),
            f"{c.latency_ms:.0f} ms" if c.latency_ms is not None else "-",
        ]
        for c in calls
    ]
    body = (
        f'<p><a href="/">&larr; overview</a></p><h1>{e(kind)} {e(ref)}</h1>'
        f'<p id="scope-total">{len(calls)} calls, total <b id="scope-cost">{money(total)}</b>'
        + (f" ({unknown} with no known price)" if unknown else "")
        + "</p>"
        + table(
            [
                "when (UTC)",
                "model",
                "operation",
                "tier",
                "status",
                "input",
                "cached",
                "output",
                "reasoning",
                "images",
                "cost",
                "latency",
            ],
            rows,
            left=5,
            html_id="calls",
        )
    )
    return page(f"tokenmeter: {kind} {ref}", body, sign_out)
