"""The daily totals (``tokenmeter_daily_usage``, migration tm0008) stay equal to the ledger
whatever writes it, and a summary read through them equals the summary read from every call,
for any window and grouping, on both backends."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from models import session_scope
from tokenmeter import OpenAICall
from tokenmeter.context import CallRecord
from tokenmeter.db import get_engine
from tokenmeter.ledger import DailyScope, DailyUsage
from tokenmeter.reporting import queries
from tokenmeter.sink import DatabaseSink, FileSpool, FlushBatch

GROUPS = ("model", "task", "kind", "day", "status", "tier", "project", "none")
BASE = datetime(2026, 11, 20, tzinfo=UTC)
MODELS = ("gpt-4o-mini-2024-07-18", "o3-mini", None, "dall-e-3")


def _record(i: int, at: datetime) -> CallRecord:
    return CallRecord(
        operation="chat",
        requested_model=MODELS[i % 4],
        response_model=MODELS[i % 4],
        request_id=f"req_daily_{i}",
        input_tokens=100 + i,
        cached_input_tokens=i % 3 * 10,
        output_tokens=7 * i % 50,
        reasoning_tokens=i % 2,
        image_count=int(i % 5 == 0),
        web_search_calls=int(i % 7 == 0),
        service_tier=("flex", None, "priority")[i % 3],
        status=("ok", "ok", "error", "billed_unknown")[i % 4],
        cost_usd=None if i % 6 == 0 else Decimal(i) / Decimal(10**7),
        task_name=("tasks.commission", None)[i % 2],
        scope_kind=("pipeline_run", None, "scanned_post")[i % 3],
        scope_ref=str(i),
        project=("proj_a", None)[i % 2 == 0 and i % 3 == 0],
        created_at=at,
        execution_id=f"exec-daily-{i // 10}",
        seq=i % 10,
    )


def _ledger_as_daily(session: Session) -> dict[tuple[object, ...], tuple[int, int, Decimal]]:
    totals: dict[tuple[object, ...], list[object]] = {}
    for call in session.scalars(select(OpenAICall)):
        at = call.created_at if call.created_at.tzinfo else call.created_at.replace(tzinfo=UTC)
        key = (
            at.astimezone(UTC).date(),
            call.model or "",
            call.task_name or "",
            call.scope_kind or "",
            call.status,
            call.service_tier or "",
            call.project or "",
        )
        t = totals.setdefault(key, [0, 0, Decimal(0)])
        t[0] += 1  # type: ignore[operator]
        t[1] += call.input_tokens  # type: ignore[operator]
        t[2] += call.cost_usd or 0  # type: ignore[operator]
    return {k: (int(v[0]), int(v[1]), Decimal(v[2])) for k, v in totals.items()}  # type: ignore[arg-type, call-overload]


def _daily(session: Session) -> dict[tuple[object, ...], tuple[int, int, Decimal]]:
    return {
        (d.day, d.model, d.task_name, d.scope_kind, d.status, d.service_tier, d.project): (
            d.calls,
            d.input_tokens,
            d.cost_usd,
        )
        for d in session.scalars(select(DailyUsage))
        if d.calls
    }


def _summary(
    start: datetime, end: datetime, group: str, daily: bool, **filters: str | None
) -> list[queries.UsageRow]:
    previous, queries.USE_DAILY_TOTALS = queries.USE_DAILY_TOTALS, daily
    try:
        with Session(get_engine()) as session:
            return queries.usage_summary(session, start, end, group, **filters)  # type: ignore[arg-type]
    finally:
        queries.USE_DAILY_TOTALS = previous


@pytest.fixture
def ledger(db_url: str, tmp_path) -> None:
    """Rows over six days, written every way a ledger is written."""
    sink = DatabaseSink(spool=FileSpool(tmp_path / "spool"))
    records = [_record(i, BASE + timedelta(hours=7 * i + i % 5)) for i in range(40)]
    for start in range(0, 30, 10):  # the sink (COPY on PostgreSQL), in batches
        batch = records[start : start + 10]
        assert sink.flush(FlushBatch(calls=batch, execution_id=batch[0].execution_id))
    assert sink.flush(FlushBatch(calls=records[:10], execution_id=records[0].execution_id))
    with session_scope() as s:  # an ORM insert, as an application or a test might
        for r in records[30:]:
            s.add(
                OpenAICall(
                    request_id=r.request_id,
                    operation=r.operation,
                    model=r.model,
                    requested_model=r.requested_model,
                    input_tokens=r.input_tokens,
                    output_tokens=r.output_tokens,
                    status=r.status,
                    service_tier=r.service_tier,
                    cost_usd=r.cost_usd,
                    task_name=r.task_name,
                    scope_kind=r.scope_kind,
                    project=r.project,
                    created_at=r.created_at,
                    execution_id=r.execution_id,
                    seq=r.seq,
                )
            )
    with session_scope() as s:  # a hand-written UPDATE and DELETE
        s.execute(
            update(OpenAICall)
            .where(OpenAICall.request_id.in_(["req_daily_3", "req_daily_4"]))
            .values(cost_usd=Decimal("0.5"), model="gpt-4o", created_at=BASE + timedelta(days=3))
        )
        s.execute(delete(OpenAICall).where(OpenAICall.request_id == "req_daily_8"))


def test_the_daily_totals_equal_the_ledger_after_every_kind_of_write(ledger) -> None:
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(OpenAICall)) == 39
        expected = _ledger_as_daily(s)
        assert _daily(s) == expected
        assert len({k[0] for k in expected}) >= 6  # the rows span six days and more


@given(
    start=st.integers(min_value=-2 * 24, max_value=14 * 24),
    hours=st.integers(min_value=1, max_value=16 * 24),
    minutes=st.integers(min_value=0, max_value=59),
    group=st.sampled_from(GROUPS),
    model=st.sampled_from([None, "o3-mini", "gpt-4o", "no-such-model"]),
    task=st.sampled_from([None, "tasks.commission"]),
)
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_a_summary_through_the_daily_totals_equals_one_over_every_call(
    ledger, start: int, hours: int, minutes: int, group: str, model, task
) -> None:
    begin = BASE + timedelta(hours=start, minutes=minutes)
    end = begin + timedelta(hours=hours)
    through_daily = _summary(begin, end, group, daily=True, model=model, task=task)
    assert through_daily == _summary(begin, end, group, daily=False, model=model, task=task)


@given(
    start=st.integers(min_value=-2 * 24, max_value=10 * 24),
    hours=st.integers(min_value=1, max_value=12 * 24),
    minutes=st.integers(min_value=0, max_value=59),
    group=st.sampled_from(GROUPS),
)
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_cost_by_day_is_each_days_summary(
    ledger, start: int, hours: int, minutes: int, group: str
) -> None:
    """The chart's figures (every whole day in one grouped query over the daily totals, the
    hours at the ends from the ledger) equal a summary of each day on its own."""
    begin = BASE + timedelta(hours=start, minutes=minutes)
    end = begin + timedelta(hours=hours)
    expected: dict[str, dict[str, Decimal]] = {}
    day = datetime(begin.year, begin.month, begin.day, tzinfo=UTC)
    while day < end:
        for row in _summary(max(day, begin), min(day + timedelta(days=1), end), group, False):
            if row.calls:
                expected.setdefault(f"{day:%Y-%m-%d}", {})[row.key] = row.priced_cost_usd
        day += timedelta(days=1)
    with Session(get_engine()) as session:
        assert queries.cost_by_day(session, begin, end, group) == expected  # type: ignore[arg-type]


def test_the_daily_scope_totals_equal_the_ledger_after_every_kind_of_write(ledger) -> None:
    with session_scope() as s:
        expected: dict[tuple[object, ...], list[object]] = {}
        for call in s.scalars(select(OpenAICall).where(OpenAICall.scope_kind.is_not(None))):
            at = call.created_at if call.created_at.tzinfo else call.created_at.replace(tzinfo=UTC)
            key = (at.astimezone(UTC).date(), call.scope_kind, call.scope_ref or "")
            t = expected.setdefault(key, [0, Decimal(0)])
            t[0] += 1  # type: ignore[operator]
            t[1] += call.cost_usd or 0  # type: ignore[operator]
        kept = {
            (d.day, d.scope_kind, d.scope_ref): [d.calls, d.cost_usd]
            for d in s.scalars(select(DailyScope))
            if d.calls
        }
    assert kept == expected
    assert len(expected) > 20


@given(
    start=st.integers(min_value=-2 * 24, max_value=10 * 24),
    hours=st.integers(min_value=1, max_value=12 * 24),
    minutes=st.integers(min_value=0, max_value=59),
    kind=st.sampled_from([None, "pipeline_run", "scanned_post", "no-such-kind"]),
    limit=st.integers(min_value=1, max_value=12),
)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_top_scopes_through_the_daily_scope_totals_equal_those_over_every_call(
    ledger, start: int, hours: int, minutes: int, kind, limit: int
) -> None:
    begin = BASE + timedelta(hours=start, minutes=minutes)
    end = begin + timedelta(hours=hours)
    found = {}
    for daily in (True, False):
        previous, queries.USE_DAILY_TOTALS = queries.USE_DAILY_TOTALS, daily
        try:
            with Session(get_engine()) as session:
                found[daily] = queries.top_scopes(session, begin, end, kind=kind, limit=limit)
        finally:
            queries.USE_DAILY_TOTALS = previous
    assert found[True] == found[False]


def test_concurrent_writers_of_the_same_days_neither_deadlock_nor_lose_a_call(db_url) -> None:
    """Writers as the sink writes: one multi-row statement per transaction, each listing the
    same daily rows in its own order.  The trigger takes the rows' locks sorted, so no writer
    waits on another in a cycle.  (A transaction writing the ledger in several statements
    can still deadlock with another such; PostgreSQL aborts one, and the sink spools and
    replays it.)"""
    engine = get_engine()
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        rng = random.Random(w)
        for b in range(15):
            ids = list(range(12))
            rng.shuffle(ids)
            rows = [
                {
                    "request_id": f"req_w{w}_{b}_{i}",
                    "operation": "chat",
                    "model": MODELS[i % 3],
                    "input_tokens": i,
                    "output_tokens": 1,
                    "status": "ok",
                    "cost_usd": Decimal("0.000001"),
                    "created_at": BASE + timedelta(days=i % 4),
                    "execution_id": f"exec-w{w}-{b}",
                    "seq": i,
                }
                for i in ids
            ]
            try:
                with engine.begin() as conn:  # one statement: the rows in a shuffled order
                    conn.execute(OpenAICall.__table__.insert().values(rows))
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:1]
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(OpenAICall)) == 4 * 15 * 12
        assert _daily(s) == _ledger_as_daily(s)
