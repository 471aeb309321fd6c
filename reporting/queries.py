"""One query layer over the ledger (``openai_calls``), for the CLI, the API and applications.

Windows are half-open ``[start, end)`` on ``openai_calls.created_at`` (timezone-aware, UTC).
Money stays ``Decimal``: SQL ``SUM`` over the ``Money`` type is exact on both backends.  A row
with an unknown price is counted in ``unpriced_calls``; a group with any unpriced call has a
cost of ``None`` (unknown), never a partial figure presented as the total.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import String, and_, bindparam, case, func, literal_column, or_, select, union_all
from sqlalchemy.orm import Session

from tokenmeter.ledger import DailyScope, DailyUsage, OpenAICall

GroupBy = Literal["model", "task", "kind", "day", "status", "tier", "project", "none"]
GROUPS: dict[str, object] = {
    "model": OpenAICall.model,
    "task": OpenAICall.task_name,
    "kind": func.coalesce(OpenAICall.scope_kind, "none"),
    "status": OpenAICall.status,
    "tier": func.coalesce(OpenAICall.service_tier, "default"),  # the tier that served it
    "project": OpenAICall.project,  # the project the client named (None: its key's own)
}
#: Counts summed per group besides the five every table shows (the JSON and CSV carry them).
EXTRA_SUMS = (
    "cache_write_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
    "web_search_calls",
    "file_search_calls",
)


@dataclass(frozen=True)
class UsageRow:
    key: str
    calls: int
    errors: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    image_count: int
    priced_cost_usd: Decimal
    unpriced_calls: int
    cache_write_tokens: int = 0
    input_audio_tokens: int = 0
    output_audio_tokens: int = 0
    web_search_calls: int = 0
    file_search_calls: int = 0

    @property
    def cost_usd(self) -> Decimal | None:
        return None if self.unpriced_calls else self.priced_cost_usd


def _extra_sums() -> list[Any]:
    return [func.coalesce(func.sum(getattr(OpenAICall, name)), 0) for name in EXTRA_SUMS]


#: The moments a window may name: a ledger starts after 1970, and a bound beyond 9000 (or an
#: offset pushing 0001-01-01 before year 1) would overflow the date arithmetic.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)
_ISO_HELP = "an ISO date (2026-11-24) or datetime (2026-11-24T12:00:00Z, ...T17:00+05:00)"


def parse_moment(value: str, *, end: bool = False, name: str = "date") -> datetime:
    """An ISO 8601 date or datetime -> an aware datetime in UTC (naive means UTC; a bare end
    date includes that day).  ValueError saying what is wrong otherwise.

    Every bound is normalised to UTC here, at the edge: SQLite compares the stored UTC text,
    so a bound left at ``+05:00`` would select the wrong five hours.
    """
    text = value.strip()
    shown = text if len(text) <= 40 else text[:40] + "..."
    if not text or len(text) > 35 or not text.isascii():  # no ISO 8601 moment is longer
        raise ValueError(f"{name}={shown!r} is not {_ISO_HELP}")
    try:
        if len(text) == 10:
            moment = datetime.combine(date.fromisoformat(text), time(), UTC)
        else:
            moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{name}={shown!r} is not {_ISO_HELP}") from None
    if not 1970 <= moment.year < 9000:  # before any arithmetic that could overflow
        raise ValueError(f"{name}={shown!r} is out of range: 1970-01-01 to 9000-01-01 UTC")
    if len(text) == 10 and end:
        moment += timedelta(days=1)  # a bare end date includes its day
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    if not EARLIEST <= moment <= LATEST:
        raise ValueError(f"{name}={shown!r} is out of range: 1970-01-01 to 9000-01-01 UTC")
    return moment


def utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a naive one is refused (whose zone would it be?)."""
    if moment.tzinfo is None:
        raise ValueError("start and end must be timezone-aware")
    return moment.astimezone(UTC)


def _extras(r: Any, at: int) -> dict[str, int]:
    return {name: int(r[at + i]) for i, name in enumerate(EXTRA_SUMS)}


_SUMMARY_STATEMENTS: dict[tuple[str, ...], Any] = {}
#: The summary's filters: (the ledger's column, the daily totals' column).
FILTERS: dict[str, tuple[Any, Any]] = {
    "model": (OpenAICall.model, DailyUsage.model),
    "task": (OpenAICall.task_name, DailyUsage.task_name),
}


def _summary_statement(
    dialect: str, group_by: str, filters: tuple[str, ...] = (), edges: bool = False
) -> Any:
    """The summary's SELECT for a grouping, built once (with ``:start`` / ``:end`` and a
    parameter per filter): building a statement costs more than running it on a small
    ledger."""
    cached = _SUMMARY_STATEMENTS.get((dialect, group_by, str(edges), *filters))
    if cached is not None:
        return cached
    key: Any
    if group_by == "day":  # the UTC calendar day, as YYYY-MM-DD
        moment: Any = OpenAICall.created_at
        if dialect == "postgresql":
            moment = func.timezone("UTC", moment)
        key = func.date(moment, type_=String())
    elif group_by == "none":
        key = literal_column("'total'")
    elif group_by in GROUPS:
        key = GROUPS[group_by]
    else:
        raise ValueError(f"group_by must be one of {sorted([*GROUPS, 'day', 'none'])}")
    billable = OpenAICall.status.notin_(("error", "blocked"))
    stmt = select(
        key.label("key"),
        func.count().label("calls"),
        func.sum(case((OpenAICall.status == "error", 1), else_=0)).label("errors"),
        func.coalesce(func.sum(OpenAICall.input_tokens), 0),
        func.coalesce(func.sum(OpenAICall.cached_input_tokens), 0),
        func.coalesce(func.sum(OpenAICall.output_tokens), 0),
        func.coalesce(func.sum(OpenAICall.reasoning_tokens), 0),
        func.coalesce(func.sum(OpenAICall.image_count), 0),
        func.sum(OpenAICall.cost_usd),
        func.sum(case((billable & OpenAICall.cost_usd.is_(None), 1), else_=0)),
        *_extra_sums(),
        func.count(OpenAICall.cost_usd),  # priced calls: a group with none sorts last
    )
    moment = OpenAICall.created_at
    window = (moment >= bindparam("start", type_=moment.type)) & (
        moment < bindparam("end", type_=moment.type)
    )
    if edges:  # the partial days at both ends of a window, in one statement
        window = window | (
            (moment >= bindparam("start2", type_=moment.type))
            & (moment < bindparam("end2", type_=moment.type))
        )
    stmt = stmt.where(window)
    for name in filters:
        stmt = stmt.where(FILTERS[name][0] == bindparam(name))
    if group_by != "none":
        stmt = stmt.group_by(key).order_by(func.sum(OpenAICall.cost_usd).desc().nulls_last(), key)
    _SUMMARY_STATEMENTS[(dialect, group_by, str(edges), *filters)] = stmt
    return stmt


def _daily_key(group_by: str) -> Any:
    """The column of ``tokenmeter_daily_usage`` a summary groups by, as the ledger's reads."""
    d = DailyUsage
    keys: dict[str, Any] = {
        "model": func.nullif(d.model, ""),
        "task": func.nullif(d.task_name, ""),
        "kind": case((d.scope_kind == "", "none"), else_=d.scope_kind),
        "status": d.status,
        "tier": case((d.service_tier == "", "default"), else_=d.service_tier),
        "day": d.day,
        "project": func.nullif(d.project, ""),
        "none": literal_column("'total'"),
    }
    if group_by not in keys:
        raise ValueError(f"group_by must be one of {sorted(keys)}")
    return keys[group_by]


def _daily_statement(group_by: str, filters: tuple[str, ...] = ()) -> Any:
    """The summary's SELECT over ``tokenmeter_daily_usage`` (whole UTC days ``[:d0, :d1)``)."""
    cached = _SUMMARY_STATEMENTS.get(("daily", group_by, *filters))
    if cached is not None:
        return cached
    d = DailyUsage
    key = _daily_key(group_by)
    stmt = select(
        key.label("key"),
        func.sum(d.calls),
        func.sum(d.errors),
        func.sum(d.input_tokens),
        func.sum(d.cached_input_tokens),
        func.sum(d.output_tokens),
        func.sum(d.reasoning_tokens),
        func.sum(d.image_count),
        func.sum(d.cost_usd),
        func.sum(d.unpriced_calls),
        *(func.sum(getattr(d, name)) for name in EXTRA_SUMS),
        func.sum(d.priced_calls),
    ).where(
        d.day >= bindparam("d0", type_=d.day.type),
        d.day < bindparam("d1", type_=d.day.type),
        d.calls > 0,  # a group emptied by deletes
    )
    for name in filters:
        stmt = stmt.where(FILTERS[name][1] == bindparam(name))
    if group_by != "none":
        stmt = stmt.group_by(key)
    _SUMMARY_STATEMENTS[("daily", group_by, *filters)] = stmt
    return stmt


def _daily_cost_by_day(group_by: str) -> Any:
    """(day, key, priced cost) per whole UTC day of ``[:d0, :d1)`` and group."""
    d = DailyUsage
    key = _daily_key(group_by)
    return (
        select(d.day, key.label("key"), func.sum(d.cost_usd))
        .where(
            d.day >= bindparam("d0", type_=d.day.type),
            d.day < bindparam("d1", type_=d.day.type),
            d.calls > 0,
        )
        .group_by(d.day, *(() if group_by == "none" else (key,)))
        .having(func.sum(d.calls) > 0)
    )


def whole_days(start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """(first, last): the first UTC midnight at or after ``start`` and the last at or before
    ``end`` (UTC moments): ``[first, last)`` are the whole days of the window, when
    ``first < last``, read from the daily totals; the rest from the ledger."""
    first = datetime.combine(start.date(), time(), UTC)
    if first < start:
        first += timedelta(days=1)
    return first, datetime.combine(end.date(), time(), UTC)


#: The summary reads ``tokenmeter_daily_usage`` for the whole UTC days of a window (and the
#: ledger for the hours at its ends); False reads only the ledger (tests compare the two).
USE_DAILY_TOTALS = True


def usage_summary(
    session: Session,
    start: datetime,
    end: datetime,
    group_by: GroupBy = "model",
    *,
    model: str | None = None,
    task: str | None = None,
) -> list[UsageRow]:
    """Totals per group over ``[start, end)``; ``group_by="none"`` gives one total row.

    Whole UTC days are read from the daily totals the database keeps (``DailyUsage``), the
    partial days at either end from the ledger itself: the same figures, exactly, at the cost
    of a few hundred rows instead of every call.
    """
    start, end = utc(start), utc(end)
    if end <= start:
        raise ValueError("end must be after start")
    dialect = session.get_bind().dialect.name
    given = {"model": model, "task": task}
    filters = tuple(name for name, value in given.items() if value is not None)
    params = {name: given[name] for name in filters}
    first, last = whole_days(start, end)
    results: list[Any] = []
    if USE_DAILY_TOTALS and first < last:
        daily = _daily_statement(group_by, filters)
        results += session.execute(daily, {"d0": first.date(), "d1": last.date(), **params}).all()
        if start < first or last < end:  # the hours before the first and after the last day
            both = _summary_statement(dialect, group_by, filters, edges=True)
            ranges = {"start": start, "end": first, "start2": last, "end2": end}
            results += session.execute(both, {**ranges, **params}).all()
    else:
        raw = _summary_statement(dialect, group_by, filters)
        results += session.execute(raw, {"start": start, "end": end, **params}).all()
    width = 10 + len(EXTRA_SUMS)  # calls .. unpriced, the extra sums, the priced count
    merged: dict[Any, list[Any]] = {}
    for r in results:
        if group_by != "none" and not r[1]:
            continue  # (an empty group: none in SQL, possible in the daily totals)
        key = str(r[0]) if r[0] is not None else "(none)"
        sums = merged.setdefault(key, [0] * width)
        for i in range(1, width + 1):
            sums[i - 1] += r[i] if r[i] is not None else 0
    if group_by == "none" and not merged:
        merged["total"] = [0] * width
    rows = [
        (key, v)
        for key, v in sorted(
            merged.items(),
            key=lambda kv: (kv[1][-1] == 0, -Decimal(kv[1][7]), kv[0] == "(none)", kv[0]),
        )
    ]
    return [
        UsageRow(
            key=key,
            calls=int(v[0]),
            errors=int(v[1]),
            input_tokens=int(v[2]),
            cached_input_tokens=int(v[3]),
            output_tokens=int(v[4]),
            reasoning_tokens=int(v[5]),
            image_count=int(v[6]),
            priced_cost_usd=v[7] if isinstance(v[7], Decimal) else Decimal(v[7]),
            unpriced_calls=int(v[8]),
            **{name: int(v[9 + i]) for i, name in enumerate(EXTRA_SUMS)},
        )
        for key, v in rows
    ]


def cost_by_day(
    session: Session, start: datetime, end: datetime, group_by: GroupBy = "model"
) -> dict[str, dict[str, Decimal]]:
    """Priced cost per UTC day (``YYYY-MM-DD``) and group over ``[start, end)``, for charts:
    whole days from the daily totals, the partial days at the ends from the ledger."""
    start, end = utc(start), utc(end)
    out: dict[str, dict[str, Decimal]] = {}
    first, last = whole_days(start, end)
    last = max(first, last)

    def partial(lo: datetime, hi: datetime) -> None:
        for row in usage_summary(session, lo, hi, group_by):
            if row.calls:
                out.setdefault(f"{lo:%Y-%m-%d}", {})[row.key] = row.priced_cost_usd

    if start < min(first, end):  # the hours of the first day, from the ledger
        partial(start, min(first, end))
    if USE_DAILY_TOTALS and first < last:  # every whole day in one grouped query
        params = {"d0": first.date(), "d1": last.date()}
        for day, key, cost in session.execute(_daily_cost_by_day(group_by), params):
            label = str(key) if key is not None else "(none)"
            spent = cost if isinstance(cost, Decimal) else Decimal(cost or 0)
            out.setdefault(f"{day:%Y-%m-%d}", {})[label] = spent
    else:
        day = first
        while day < last:
            partial(day, day + timedelta(days=1))
            day += timedelta(days=1)
    if first <= last < end:  # the hours of the last day
        partial(max(last, start), end)
    return dict(sorted(out.items()))


def total_of(rows: list[UsageRow]) -> UsageRow:
    """The one total row of a grouped summary, summed exactly from its groups (the same as
    ``usage_summary(..., "none")[0]``, without a second query)."""
    sums = {
        name: sum((getattr(r, name) for r in rows), 0)
        for name in (
            "calls",
            "errors",
            "input_tokens",
            "cached_input_tokens",
            "output_tokens",
            "reasoning_tokens",
            "image_count",
            "unpriced_calls",
            *EXTRA_SUMS,
        )
    }
    priced = sum((r.priced_cost_usd for r in rows), Decimal(0))
    return UsageRow(key="total", priced_cost_usd=priced, **sums)


@dataclass(frozen=True)
class CallPage:
    items: list[OpenAICall]
    total: int
    page: int
    page_size: int


def list_calls(
    session: Session,
    start: datetime,
    end: datetime,
    *,
    model: str | None = None,
    task: str | None = None,
    status: str | None = None,
    scope_kind: str | None = None,
    page: int = 1,
    page_size: int = 50,
) -> CallPage:
    """Ledger rows in ``[start, end)``, newest first, filtered and paginated."""
    start, end = utc(start), utc(end)
    where = [OpenAICall.created_at >= start, OpenAICall.created_at < end]
    if model:
        where.append(OpenAICall.model == model)
    if task:
        where.append(OpenAICall.task_name == task)
    if status:
        where.append(OpenAICall.status == status)
    if scope_kind:
        where.append(
            OpenAICall.scope_kind.is_(None)
            if scope_kind == "none"
            else OpenAICall.scope_kind == scope_kind
        )
    total = session.scalar(select(func.count()).select_from(OpenAICall).where(*where)) or 0
    items = list(
        session.scalars(
            select(OpenAICall)
            .where(*where)
            .order_by(OpenAICall.created_at.desc(), OpenAICall.id.desc())
            .offset((page - 1) * page_size)
            .limit(page_size)
        )
    )
    return CallPage(items, int(total), page, page_size)


@dataclass(frozen=True)
class ScopeRow:
    """The usage of one scope (kind + ref: a pipeline run, a scanned post, a report...)."""

    kind: str
    ref: str
    calls: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    image_count: int
    priced_cost_usd: Decimal
    unpriced_calls: int
    first_call_at: datetime
    last_call_at: datetime
    cache_write_tokens: int = 0
    input_audio_tokens: int = 0
    output_audio_tokens: int = 0
    web_search_calls: int = 0
    file_search_calls: int = 0

    @property
    def cost_usd(self) -> Decimal | None:
        return None if self.unpriced_calls else self.priced_cost_usd


def top_scopes(
    session: Session,
    start: datetime,
    end: datetime,
    *,
    kind: str | None = None,
    limit: int = 10,
) -> list[ScopeRow]:
    """The most expensive scopes with calls in ``[start, end)`` (innermost scope of each call).

    A scope with any unpriced call sorts by its priced part and shows an unknown cost.
    """
    start, end = utc(start), utc(end)
    billable = OpenAICall.status.notin_(("error", "blocked"))
    priced = func.coalesce(func.sum(OpenAICall.cost_usd), 0)
    where = [
        OpenAICall.created_at >= start,
        OpenAICall.created_at < end,
        OpenAICall.scope_kind.is_not(None),
    ]
    if kind:
        where.append(OpenAICall.scope_kind == kind)
    if USE_DAILY_TOTALS:
        keys = _top_scope_keys(session, start, end, kind, limit)
        if keys is not None:  # the window has whole days: only these scopes' calls are read
            if not keys:
                return []
            where.append(
                or_(
                    *(
                        and_(
                            OpenAICall.scope_kind == k,
                            OpenAICall.scope_ref == r
                            if r
                            else or_(OpenAICall.scope_ref.is_(None), OpenAICall.scope_ref == ""),
                        )
                        for k, r in keys
                    )
                )
            )
    stmt = (
        select(
            OpenAICall.scope_kind,
            OpenAICall.scope_ref,
            func.count(),
            func.coalesce(func.sum(OpenAICall.input_tokens), 0),
            func.coalesce(func.sum(OpenAICall.cached_input_tokens), 0),
            func.coalesce(func.sum(OpenAICall.output_tokens), 0),
            func.coalesce(func.sum(OpenAICall.reasoning_tokens), 0),
            func.coalesce(func.sum(OpenAICall.image_count), 0),
            func.sum(OpenAICall.cost_usd),
            func.sum(case((billable & OpenAICall.cost_usd.is_(None), 1), else_=0)),
            func.min(OpenAICall.created_at),
            func.max(OpenAICall.created_at),
            *_extra_sums(),
        )
        .where(*where)
        .group_by(OpenAICall.scope_kind, OpenAICall.scope_ref)
        .order_by(priced.desc(), OpenAICall.scope_kind, func.coalesce(OpenAICall.scope_ref, ""))
        .limit(limit)
    )
    return [
        ScopeRow(
            kind=str(r[0]),
            ref="" if r[1] is None else str(r[1]),
            calls=int(r[2]),
            input_tokens=int(r[3]),
            cached_input_tokens=int(r[4]),
            output_tokens=int(r[5]),
            reasoning_tokens=int(r[6]),
            image_count=int(r[7]),
            priced_cost_usd=r[8] if r[8] is not None else Decimal(0),
            unpriced_calls=int(r[9] or 0),
            first_call_at=r[10],
            last_call_at=r[11],
            **_extras(r, 12),
        )
        for r in session.execute(stmt)
    ]


def _top_scope_keys(
    session: Session, start: datetime, end: datetime, kind: str | None, limit: int
) -> list[tuple[str, str]] | None:
    """The ``limit`` most expensive scopes of ``[start, end)`` ranked as ``top_scopes`` ranks
    them (priced cost, then kind and ref), read from the daily scope totals for the window's
    whole UTC days and from the ledger for the hours at its ends; None when the window has no
    whole day (the ledger alone is as cheap)."""
    first, last = whole_days(start, end)
    if first >= last:
        return None
    d, c = DailyScope, OpenAICall
    days = select(d.scope_kind.label("k"), d.scope_ref.label("r"), d.cost_usd.label("usd")).where(
        d.day >= first.date(), d.day < last.date(), d.calls > 0
    )
    edges = select(
        c.scope_kind.label("k"),
        func.coalesce(c.scope_ref, "").label("r"),
        func.coalesce(c.cost_usd, 0).label("usd"),
    ).where(
        c.scope_kind.is_not(None),
        or_(
            and_(c.created_at >= start, c.created_at < first),
            and_(c.created_at >= last, c.created_at < end),
        ),
    )
    if kind:
        days = days.where(d.scope_kind == kind)
        edges = edges.where(c.scope_kind == kind)
    both = union_all(days, edges).subquery()
    ranked = (
        select(both.c.k, both.c.r)
        .group_by(both.c.k, both.c.r)
        .order_by(func.sum(both.c.usd).desc(), both.c.k, both.c.r)
        .limit(limit)
    )
    return [(str(k), str(r)) for k, r in session.execute(ranked)]


def scope_calls(session: Session, kind: str, ref: str, limit: int = 1000) -> list[OpenAICall]:
    """Every call recorded in scope ``kind``/``ref`` (all attempts), oldest first."""
    return list(
        session.scalars(
            select(OpenAICall)
            .where(OpenAICall.scope_kind == kind, OpenAICall.scope_ref == ref)
            .order_by(OpenAICall.created_at, OpenAICall.id)
            .limit(limit)
        )
    )
