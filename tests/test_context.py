"""The usage context: nesting, roll-up, unscoped calls, threads and asyncio."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Iterator
from decimal import Decimal

import pytest

from tests.helpers import CollectingSink, collecting_sink
from tokenmeter.context import (
    CallRecord,
    UsageScope,
    close_scope,
    current_scope,
    open_scope,
    record_call,
    run_in_scope_thread,
    usage_scope,
)


@pytest.fixture
def sink() -> Iterator[CollectingSink]:
    with collecting_sink() as s:
        yield s


def call(n_in: int, n_out: int, cost: str | None = "0.000001", **kw) -> CallRecord:
    return CallRecord(
        operation="chat",
        requested_model="gpt-4o-mini",
        input_tokens=n_in,
        output_tokens=n_out,
        cost_usd=None if cost is None else Decimal(cost),
        **kw,
    )


def test_nested_scopes_roll_up_and_root_goes_to_sink(sink: CollectingSink) -> None:
    with usage_scope("task", "t1") as task:
        record_call(call(10, 1))
        with usage_scope("scanned_post", "p1") as p1:
            record_call(call(100, 10))
        with usage_scope("scanned_post", "p2") as p2:
            record_call(call(200, 20))
            record_call(call(300, 30))
        assert current_scope() is task
    assert current_scope() is None
    assert (p1.totals.input_tokens, p2.totals.input_tokens) == (100, 500)
    assert task.totals.input_tokens == 610 and task.totals.output_tokens == 61
    assert task.totals.cost_usd == Decimal("0.000004")
    assert sink.scopes == [task]  # only the root is flushed, once
    assert [c.seq for c in task.all_calls()] == [1, 2, 3, 4]
    assert [(c.scope_kind, c.scope_ref) for c in task.all_calls()] == [
        ("task", "t1"),
        ("scanned_post", "p1"),
        ("scanned_post", "p2"),
        ("scanned_post", "p2"),
    ]


def test_unknown_price_makes_total_unknown_not_zero(sink: CollectingSink) -> None:
    with usage_scope("task") as s:
        record_call(call(10, 1, cost=None))
        record_call(call(10, 1))
    assert s.totals.cost_usd is None
    assert s.totals.priced_cost_usd == Decimal("0.000001") and s.totals.uncosted_calls == 1


def test_call_outside_any_scope_is_recorded(sink: CollectingSink) -> None:
    c = record_call(call(5, 5))
    assert sink.unscoped == [c] and c.scope_kind is None


def test_scope_closed_on_error_keeps_usage(sink: CollectingSink) -> None:
    with pytest.raises(RuntimeError), usage_scope("task", "t") as s:
        record_call(call(7, 3))
        raise RuntimeError("boom")
    assert s.closed and isinstance(s.error, RuntimeError)
    assert sink.scopes[0].totals.input_tokens == 7


def test_threads_see_only_their_own_scope(sink: CollectingSink) -> None:
    results: dict[int, UsageScope] = {}
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        with usage_scope("task", f"t{i}") as s:
            barrier.wait()
            for _ in range(25):
                record_call(call(i, 1))
            results[i] = s

    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(work, i)) for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert sorted(results) == list(range(8))  # every thread ran to its end
    for i, s in results.items():
        assert s.totals.calls == 25 and s.totals.input_tokens == 25 * i


def test_thread_started_inside_a_scope_records_into_it(sink: CollectingSink) -> None:
    with usage_scope("task", "t") as s:
        run_in_scope_thread(record_call, call(3, 3)).join()
    assert s.totals.input_tokens == 3


async def test_asyncio_tasks_each_in_own_scope(sink: CollectingSink) -> None:
    async def work(i: int) -> UsageScope:
        async with usage_scope("task", f"a{i}") as s:
            for _ in range(4):
                await asyncio.sleep(0)
                record_call(call(i, 0))
            return s

    scopes = await asyncio.gather(*(work(i) for i in range(50)))
    assert all(s.totals.input_tokens == 4 * i for i, s in enumerate(scopes))
    assert current_scope() is None


def test_a_thread_that_outlives_its_task_is_flushed_on_its_own(sink: CollectingSink) -> None:
    """A call made after the task's root scope was flushed keeps its task and scope and goes
    to the sink as an execution of its own: never dropped, never counted in the old flush."""
    release = threading.Event()

    def late_work() -> None:
        release.wait(10)
        with usage_scope("post", "p-late"):
            record_call(call(7, 3))

    root, token = open_scope("task", "t-late", task_id="t-late", task_name="demo.late")
    try:
        record_call(call(1, 1))
        thread = run_in_scope_thread(late_work)
    finally:
        close_scope(root, token)
    release.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
    [flushed] = sink.scopes
    assert [c.input_tokens for c in flushed.all_calls()] == [1]  # the flush it missed
    [late] = sink.unscoped
    assert (late.input_tokens, late.task_id, late.task_name) == (7, "t-late", "demo.late")
    assert (late.scope_kind, late.scope_ref) == ("post", "p-late")
    assert late.execution_id and late.execution_id != root.execution_id


def test_totals_add_every_summed_count_of_a_call() -> None:
    """UsageTotals.add spells SUMMED_FIELDS out: each count a call reports is added, once,
    and the list of counts and the totals' fields are the same."""
    from dataclasses import fields

    from tokenmeter.context import SUMMED_FIELDS, CallRecord, UsageTotals

    totals_fields = {f.name for f in fields(UsageTotals)}
    assert set(SUMMED_FIELDS) == totals_fields - {
        "calls",
        "errors",
        "priced_cost_usd",
        "uncosted_calls",
    }
    call = CallRecord("chat", **{name: n for n, name in enumerate(SUMMED_FIELDS, start=1)})
    totals = UsageTotals()
    totals.add(call)
    totals.add(call)
    assert {name: getattr(totals, name) for name in SUMMED_FIELDS} == {
        name: 2 * n for n, name in enumerate(SUMMED_FIELDS, start=1)
    }
