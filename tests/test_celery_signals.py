"""Celery signal handlers in-process (eager tasks), with fakeredis and real SQLite/PostgreSQL.

The OpenAI call path is the one the hooks use: ``before_call`` (budget guards) then
``record_call``.  The real client over HTTP, in a real worker, is in tests/test_worker_e2e.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal

import fakeredis
import pytest
from celery import Celery
from sqlalchemy import func, select

import tokenmeter
from models import AgentScannedPost, session_scope
from tests.helpers import chat_call, dead_pid
from tokenmeter import OpenAICall
from tokenmeter.budgets import BudgetExceeded, Budgets
from tokenmeter.celery_signals import CeleryMetering, install
from tokenmeter.context import (
    CallRecord,
    _current,
    before_call,
    close_scope,
    current_scope,
    open_scope,
    record_call,
    usage_scope,
)
from tokenmeter.rollups import TableRollup
from tokenmeter.sink import DatabaseSink, FileSpool, FlushBatch
from tokenmeter.wal import OPEN_KEY, WriteAheadLog

COST = Decimal("0.000045")


def fake_openai_call(tag: str, n_in: int = 100, n_out: int = 20) -> CallRecord:
    before_call("chat", "gpt-4o-mini")
    return chat_call(tag, n_in, n_out, COST)


@pytest.fixture
def redis_client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture
def app(no_installation: None) -> Celery:
    app = Celery("signals_test")
    app.conf.update(task_always_eager=True, task_eager_propagates=False, broker_url="memory://")
    return app


@pytest.fixture
def metering(app: Celery, db_url: str, redis_client, tmp_path) -> Iterator[CeleryMetering]:
    handle = install(
        app,
        sink=DatabaseSink(spool=FileSpool(tmp_path / "spool")),
        redis_client=redis_client,
        write_ahead="redis",  # the per-call Redis log too: the tests below look at it
        recovery_interval_s=0,
        instrument_openai=False,
    )
    yield handle
    handle.uninstall()


def ledger() -> list[OpenAICall]:
    """The ledger, once the background writer has written every task that ended."""
    assert tokenmeter.flush(timeout=30)
    with session_scope() as s:
        return list(s.scalars(select(OpenAICall).order_by(OpenAICall.id)))


def test_successful_task_is_one_scope_flushed_with_its_calls(app, metering, redis_client) -> None:
    @app.task(name="demo.ok")
    def ok() -> str:
        scope = current_scope()
        assert scope is not None and scope.kind == "task"
        fake_openai_call("a")
        fake_openai_call("b")
        return "done"

    result = ok.apply()
    assert result.get() == "done"
    rows = ledger()
    assert [r.request_id for r in rows] == ["req_a", "req_b"]
    assert {r.task_id for r in rows} == {result.id} and rows[0].task_name == "demo.ok"
    assert current_scope() is None  # nothing leaks into the next task on this thread
    assert redis_client.hlen(OPEN_KEY) == 0  # write-ahead entries forgotten after the flush


def test_retry_keeps_each_attempts_usage(app, metering) -> None:
    @app.task(name="demo.flaky", bind=True, max_retries=3, default_retry_delay=0)
    def flaky(self) -> int:
        fake_openai_call(f"try{self.request.retries}")
        if self.request.retries < 1:
            raise self.retry(exc=RuntimeError("rate limited"))
        return self.request.retries

    assert flaky.apply().get() == 1
    rows = ledger()
    assert [(r.request_id, r.attempt) for r in rows] == [("req_try0", 0), ("req_try1", 1)]


def test_failed_task_keeps_the_usage_it_made(app, metering) -> None:
    @app.task(name="demo.fails")
    def fails() -> None:
        fake_openai_call("before_crash", 500, 50)
        raise ValueError("bad JSON from the model")

    result = fails.apply()
    assert result.failed()
    [row] = ledger()
    assert (row.request_id, row.input_tokens, row.output_tokens) == ("req_before_crash", 500, 50)


def test_redelivered_flush_counts_once(app, metering, redis_client) -> None:
    """The same execution reaching the sink twice (ack lost, WAL recovery) is counted once."""
    seen = []

    @app.task(name="demo.once")
    def once() -> None:
        fake_openai_call("only")
        seen.append(current_scope())

    once.apply()
    scope = seen[0]
    # a second flush of the same execution reaches the database (nothing spooled, nothing
    # dead-lettered) and inserts nothing
    assert metering.sink.flush(FlushBatch.from_scope(scope)) is True
    assert len(metering.sink.spool) == 0 and metering.sink.spool.dead_letters() == []
    assert [r.request_id for r in ledger()] == ["req_only"]


def test_task_filter_leaves_other_tasks_unscoped(app, db_url, redis_client, tmp_path) -> None:
    handle = install(
        app,
        tasks=["shop.*"],
        sink=DatabaseSink(spool=FileSpool(tmp_path)),
        redis_client=redis_client,
        instrument_openai=False,
        recovery_interval_s=0,
    )
    try:

        @app.task(name="other.job")
        def job() -> bool:
            return current_scope() is None

        assert job.apply().get() is True
    finally:
        handle.uninstall()


def test_write_ahead_log_recovers_a_killed_execution_once(db_url, redis_client, tmp_path) -> None:
    """A worker killed mid-task never flushes; recovery finds its calls in Redis, once."""
    wal = WriteAheadLog(redis_client)
    sink = DatabaseSink(spool=FileSpool(tmp_path / "spool"))
    sink.after_flush.append(wal.after_flush)
    root, token = open_scope("task", "t-killed", task_id="t-killed", task_name="demo.scan")
    wal.attach(root)
    with usage_scope("scanned_post", "p1") as post:
        post.bind_rollup(
            TableRollup(
                AgentScannedPost,
                key={"post_id": "p1"},
                sums={"prompt_tokens": "input_tokens", "completion_tokens": "output_tokens"},
                cost_column="total_cost_usd",
                values={"subreddit": "crafts", "agent_model": "m"},
            )
        )
        fake_openai_call("k1", 300, 0)
        fake_openai_call("k2", 0, 40)
    # The process "dies" here: no close_scope, no flush.  Pretend its pid is gone.
    _current.reset(token)
    meta = json.loads(redis_client.hget(OPEN_KEY, root.execution_id))
    meta["pid"] = dead_pid()
    redis_client.hset(OPEN_KEY, root.execution_id, json.dumps(meta))

    assert wal.recover(sink) == 1
    assert wal.recover(sink) == 0  # forgotten after the flush
    rows = ledger()
    assert [r.request_id for r in rows] == ["req_k1", "req_k2"]
    with session_scope() as s:
        post_row = s.scalars(select(AgentScannedPost)).one()
    assert (post_row.prompt_tokens, post_row.completion_tokens) == (300, 40)
    assert post_row.total_cost_usd == 2 * COST


def test_live_executions_are_not_recovered(db_url, redis_client, tmp_path) -> None:
    wal = WriteAheadLog(redis_client)
    root, token = open_scope("task", "t-live", task_id="t-live")
    try:
        wal.attach(root)
        fake_openai_call("live")
        assert wal.recover(DatabaseSink(spool=FileSpool(tmp_path))) == 0  # our pid is alive
    finally:
        close_scope(root, token)


def test_task_budget_stops_before_the_call_that_would_exceed_it(
    app, db_url, redis_client, tmp_path
) -> None:
    handle = install(
        app,
        sink=DatabaseSink(spool=FileSpool(tmp_path)),
        redis_client=redis_client,
        budgets=Budgets(),
        instrument_openai=False,
        recovery_interval_s=0,
    )
    made = []
    try:

        @app.task(name="demo.spender", tokenmeter_budget_usd="0.0001")
        def spender() -> None:
            for i in range(5):
                fake_openai_call(f"s{i}")
                made.append(i)

        result = spender.apply()
    finally:
        handle.uninstall()
    # 0.000045 per call: two calls spend 0.00009; a third would reach 0.000135 > 0.0001.
    assert made == [0, 1]
    assert isinstance(result.result, BudgetExceeded)
    assert "task budget of $0.0001" in str(result.result)
    rows = ledger()
    assert [(r.request_id, r.status) for r in rows] == [
        ("req_s0", "ok"),
        ("req_s1", "ok"),
        (None, "blocked"),
    ]
    assert rows[2].error_type == "BudgetExceeded" and rows[2].cost_usd is None
    with session_scope() as s:
        assert s.scalar(select(func.sum(OpenAICall.cost_usd))) == 2 * COST


def test_daily_budget_is_shared_across_tasks(app, db_url, redis_client, tmp_path) -> None:
    budgets = Budgets(daily_budget_usd=Decimal("0.0002"), redis_client=redis_client)
    handle = install(
        app,
        sink=DatabaseSink(spool=FileSpool(tmp_path)),
        redis_client=redis_client,
        budgets=budgets,
        instrument_openai=False,
        recovery_interval_s=0,
    )
    try:

        @app.task(name="demo.one_call")
        def one_call(tag: str) -> None:
            fake_openai_call(tag)

        outcomes = [one_call.apply(args=(f"d{i}",)) for i in range(6)]
    finally:
        handle.uninstall()
    assert [o.successful() for o in outcomes] == [True] * 4 + [False] * 2
    assert budgets.spent_today() == 4 * COST  # exact integer counter, no float drift


# -- loss paths: eager subtasks, interrupts, budgets that cannot be checked -------------------
def test_an_eager_subtask_does_not_register_the_listeners_again(app, metering, monkeypatch) -> None:
    """``.apply()`` inside a task: every call once in the write-ahead log, listeners unchanged."""
    assert metering.wal is not None
    pushed: list[str] = []
    original_push = metering.wal._push

    def counting_push(scope, entry):
        pushed.append(scope.execution_id)
        return original_push(scope, entry)

    monkeypatch.setattr(metering.wal, "_push", counting_push)

    @app.task(name="demo.eager_inner")
    def inner() -> None:
        fake_openai_call("inner")

    @app.task(name="demo.eager_outer")
    def outer() -> list[int]:
        fake_openai_call("outer-1")
        sizes = [len(current_scope().root.listeners)]
        inner.apply()
        sizes.append(len(current_scope().root.listeners))
        fake_openai_call("outer-2")
        return sizes

    before, after = outer.apply().get()
    assert before == after
    assert len(pushed) == 3  # one write-ahead entry per call, not one per listener copy
    assert sorted(r.request_id for r in ledger()) == ["req_inner", "req_outer-1", "req_outer-2"]


def test_a_soft_time_limit_reaches_the_task_through_metering(db_url, tmp_path) -> None:
    from billiard.exceptions import SoftTimeLimitExceeded

    def listener(scope, call) -> None:
        raise SoftTimeLimitExceeded()

    root, token = open_scope("task", "t-limit", task_id="t-limit")
    try:
        root.listeners.append(listener)
        with pytest.raises(SoftTimeLimitExceeded):
            fake_openai_call("limited")
    finally:
        root.listeners.remove(listener)
        close_scope(root, token)

    class InterruptedSink(DatabaseSink):
        def write(self, batch):
            raise SoftTimeLimitExceeded()

    sink = InterruptedSink(spool=FileSpool(tmp_path / "spool"))
    with pytest.raises(SoftTimeLimitExceeded):
        sink.flush(FlushBatch(calls=[CallRecord(operation="chat", request_id="req_x")]))
    assert len(sink.spool) == 1  # spooled first: nothing lost


class _RedisDown:
    def get(self, *_):
        raise ConnectionError("redis unreachable")

    def pipeline(self, *_, **__):
        raise ConnectionError("redis unreachable")


@pytest.mark.parametrize("fail_open", [True, False])
def test_a_daily_budget_that_cannot_be_checked_follows_its_setting(
    db_url, tmp_path, fail_open: bool, caplog
) -> None:
    budgets = Budgets(daily_budget_usd=Decimal("1"), redis_client=_RedisDown(), fail_open=fail_open)
    budgets.install()
    try:
        with usage_scope("task", "redis-down"):
            if fail_open:
                fake_openai_call("goes-ahead")
            else:
                with pytest.raises(BudgetExceeded):
                    fake_openai_call("refused")
    finally:
        budgets.uninstall()
    assert budgets.unchecked >= 1
    assert any("daily budget not checked" in r.getMessage() for r in caplog.records)


def test_a_malformed_task_budget_is_reported_and_does_not_fail_the_task(
    app, metering, caplog
) -> None:
    @app.task(name="demo.bad_budget", tokenmeter_budget_usd="$5")
    def spend() -> int:
        for i in range(3):
            fake_openai_call(f"b{i}")
        return 3

    assert spend.apply().get() == 3
    assert any("is not an amount of dollars" in r.getMessage() for r in caplog.records)
    assert len(ledger()) == 3


def test_calls_of_unknown_price_count_zero_toward_a_budget(db_url) -> None:
    budgets = Budgets(task_budget_usd=Decimal("0.000001"))
    budgets.install()
    try:
        with usage_scope("task", "unpriced") as scope:
            for i in range(3):
                before_call("chat", "mystery")
                record_call(CallRecord(operation="chat", request_id=f"u{i}", cost_usd=None))
    finally:
        budgets.uninstall()
    assert scope.totals.calls == 3 and scope.totals.cost_usd is None


def test_the_worker_loads_the_price_data_whole_before_its_pool_forks() -> None:
    """A pool child forked while the main process was importing genai-prices (to price a lost
    child's recovered calls) inherited a half-run module and priced three calls as NULL though
    their prices are known (a faulted reconcile on 12-06).  The worker's main process now loads
    the data whole before its pool starts; a fresh interpreter shows it (the test process has
    long imported it)."""
    code = (
        "import sys\n"
        "from celery import Celery\n"
        "from tokenmeter.celery_signals import CeleryMetering\n"
        "metering = CeleryMetering(Celery('t'))\n"
        "before = 'genai_prices.data' in sys.modules\n"
        "metering.on_worker_init(sender=None)\n"
        "from tokenmeter import maintained\n"
        "print(before, 'genai_prices.data' in sys.modules, maintained._loaded)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    assert out == ["False", "True", "True"]
