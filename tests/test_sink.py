"""The sink: one idempotent transaction per closed scope, rollups, spool and replay."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import fakeredis
import pytest
from sqlalchemy import func, select

from models import AgentScannedPost, PipelineRun, PipelineRunUsage, session_scope
from tasks.commission import run_usage_rollup
from tests.helpers import CollectingSink, clear_settings, collecting_sink
from tokenmeter import OpenAICall
from tokenmeter.context import (
    CallRecord,
    close_scope,
    open_scope,
    record_call,
    usage_scope,
)
from tokenmeter.ledger import PendingRollup
from tokenmeter.rollups import TableRollup
from tokenmeter.sink import (
    DatabaseSink,
    FileSpool,
    FlushBatch,
    RedisSpool,
    call_from_json,
    call_to_json,
)

UNREACHABLE_PG = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere?connect_timeout=1"


def chat(n_in: int, n_out: int, cost: str | None, rid: str | None = None, **kw) -> CallRecord:
    return CallRecord(
        operation="chat",
        requested_model="gpt-4o-mini",
        response_model="gpt-4o-mini-2024-07-18",
        request_id=rid,
        input_tokens=n_in,
        output_tokens=n_out,
        cost_usd=None if cost is None else Decimal(cost),
        **kw,
    )


def image(n: int, cost: str, rid: str) -> CallRecord:
    return CallRecord(
        operation="image",
        requested_model="dall-e-3",
        request_id=rid,
        image_count=n,
        image_size="1024x1024",
        image_quality="standard",
        cost_usd=Decimal(cost),
    )


def post_rollup(post_id: str) -> TableRollup:
    return TableRollup(
        AgentScannedPost,
        key={"post_id": post_id},
        sums={"prompt_tokens": "input_tokens", "completion_tokens": "output_tokens"},
        cost_column="total_cost_usd",
        values={"agent_model": "gpt-4o-mini", "subreddit": "crafts"},
    )


@pytest.fixture
def captured() -> Iterator[CollectingSink]:
    """The closed root scopes, kept so a test can flush them by hand."""
    with collecting_sink() as sink:
        yield sink


def make_run() -> int:
    with session_scope() as s:
        run = PipelineRun(status="running", config={"commission": True})
        s.add(run)
        s.flush()
        return run.id


def commission_attempt(run_id: int, attempt: int, tag: str, captured: CollectingSink) -> FlushBatch:
    task, token = open_scope("task", f"task-{tag}", task_id=f"task-{tag}", attempt=attempt)
    with usage_scope("pipeline_run", run_id) as scope:
        scope.bind_rollup(run_usage_rollup(run_id, "gpt-4o-mini", "dall-e-3"))
        record_call(chat(1000, 200, "0.00027", rid=f"req_{tag}_ideas", cached_input_tokens=512))
        record_call(image(2, "0.08", rid=f"req_{tag}_img"))
    close_scope(task, token)
    return FlushBatch.from_scope(captured.scopes[-1])


def test_flush_writes_calls_and_rollup_once(
    db_url: str, tmp_path, captured: CollectingSink
) -> None:
    run_id = make_run()
    batch = commission_attempt(run_id, 0, "a", captured)
    sink = DatabaseSink(spool=FileSpool(tmp_path / "spool"))
    assert sink.flush(batch)
    assert sink.flush(batch)  # redelivered flush / replay: changes nothing
    assert sink.flush(FlushBatch.from_json(batch.to_json()))
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(OpenAICall)) == 2
        usage = s.scalars(select(PipelineRunUsage)).one()
        calls = s.scalars(select(OpenAICall).order_by(OpenAICall.seq)).all()
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_prompt_tokens) == (
        1000,
        200,
        512,
    )
    assert usage.image_count == 2 and usage.total_cost_usd == Decimal("0.08027")
    assert [(c.scope_kind, c.scope_ref, c.seq) for c in calls] == [
        ("pipeline_run", str(run_id), 1),
        ("pipeline_run", str(run_id), 2),
    ]
    assert calls[0].model == "gpt-4o-mini-2024-07-18" and calls[0].task_id == "task-a"


def test_each_attempt_adds_its_own_calls(db_url: str, tmp_path, captured: CollectingSink) -> None:
    run_id = make_run()
    sink = DatabaseSink(spool=FileSpool(tmp_path / "spool"))
    first = commission_attempt(run_id, 0, "a", captured)
    second = commission_attempt(run_id, 1, "b", captured)
    for batch in (first, second, first):
        sink.flush(batch)
    with session_scope() as s:
        usage = s.scalars(select(PipelineRunUsage)).one()
        ledger_cost = s.scalar(select(func.sum(OpenAICall.cost_usd)))
        attempts = s.scalars(select(OpenAICall.attempt).order_by(OpenAICall.attempt)).all()
    assert usage.prompt_tokens == 2000 and usage.image_count == 4
    assert usage.total_cost_usd == ledger_cost == Decimal("0.16054")
    assert attempts == [0, 0, 1, 1]


def test_post_rollups_get_only_their_own_calls(db_url: str, tmp_path, captured) -> None:
    with usage_scope("task", "scan-1"):
        record_call(chat(5, 5, "0.000001", rid="req_list"))  # task-level call, no post
        for i, (n_in, n_out) in enumerate([(300, 40), (500, 0), (700, 90)]):
            with usage_scope("scanned_post", f"p{i}") as post:
                post.bind_rollup(post_rollup(f"p{i}"))
                record_call(chat(n_in, 0, "0.000045", rid=f"req_rate_{i}"))
                if n_out:
                    record_call(chat(0, n_out, "0.000024", rid=f"req_comment_{i}"))
    DatabaseSink(spool=FileSpool(tmp_path)).flush(FlushBatch.from_scope(captured.scopes[0]))
    with session_scope() as s:
        posts = {p.post_id: p for p in s.scalars(select(AgentScannedPost))}
        ledger_total = s.scalar(select(func.sum(OpenAICall.cost_usd)))
    assert {k: (p.prompt_tokens, p.completion_tokens) for k, p in posts.items()} == {
        "p0": (300, 40),
        "p1": (500, 0),
        "p2": (700, 90),
    }
    assert posts["p1"].total_cost_usd == Decimal("0.000045")
    assert posts["p0"].total_cost_usd == Decimal("0.000069")
    assert sum(p.total_cost_usd for p in posts.values()) + Decimal("0.000001") == ledger_total


def test_unpriced_call_makes_rollup_cost_unknown(db_url: str, tmp_path, captured) -> None:
    with usage_scope("task", "t"), usage_scope("scanned_post", "px") as post:
        post.bind_rollup(post_rollup("px"))
        record_call(chat(10, 10, "0.00001", rid="r1"))
        record_call(chat(10, 10, None, rid="r2"))  # model with no known price
    DatabaseSink(spool=FileSpool(tmp_path)).flush(FlushBatch.from_scope(captured.scopes[0]))
    with session_scope() as s:
        row = s.scalars(select(AgentScannedPost)).one()
    assert row.prompt_tokens == 20 and row.total_cost_usd is None


def test_unreachable_database_spools_then_replays_exactly_once(
    db_url: str, tmp_path, captured: CollectingSink
) -> None:
    run_id = make_run()
    batch = commission_attempt(run_id, 0, "a", captured)
    spool = FileSpool(tmp_path / "spool")
    down = DatabaseSink(database_url=UNREACHABLE_PG, spool=spool)
    assert down.flush(batch) is False  # never raises into the task
    assert len(spool) == 1
    assert down.replay() == 0 and len(spool) == 1  # still down: kept, in order

    up = DatabaseSink(spool=spool)
    assert up.replay() == 1 and len(spool) == 0
    assert up.replay() == 0
    up.flush(batch)  # the WAL recovery flushes the same execution again: no double count
    with session_scope() as s:
        usage = s.scalars(select(PipelineRunUsage)).one()
        assert s.scalar(select(func.count()).select_from(OpenAICall)) == 2
    assert usage.prompt_tokens == 1000 and usage.total_cost_usd == Decimal("0.08027")


def test_a_rollup_that_cannot_apply_never_takes_its_calls_down(
    db_url: str, tmp_path, captured
) -> None:
    run_id = 987654  # no such pipeline run (yet): the rollup's row fails its foreign key
    batch = commission_attempt(run_id, 0, "orphan", captured)
    spool = FileSpool(tmp_path / "spool")
    sink = DatabaseSink(spool=spool)
    assert sink.flush(batch) is True  # the calls reached the ledger
    assert len(spool) == 0 and spool.dead_letters() == []
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(OpenAICall)) == 2
        assert s.scalar(select(func.count()).select_from(PipelineRunUsage)) == 0
        [kept] = s.scalars(select(PendingRollup)).all()
    assert kept.attempts == 2 and "IntegrityError" in kept.last_error and not kept.dead

    with session_scope() as s:  # the application's row appears (its transaction committed late)
        s.add(PipelineRun(id=run_id, status="running", config={}))
    assert sink.retry_rollups().applied == 1
    assert sink.retry_rollups().applied == 0  # applied once, and gone
    sink.flush(batch)  # a redelivered flush adds nothing either
    with session_scope() as s:
        usage = s.scalars(select(PipelineRunUsage)).one()
        assert s.scalar(select(func.count()).select_from(PendingRollup)) == 0
    assert (usage.prompt_tokens, usage.image_count, usage.total_cost_usd) == (
        1000,
        2,
        Decimal("0.08027"),
    )


def test_a_kept_rollup_keeps_labels_no_database_can_hold_as_its_columns_can(
    db_url: str, tmp_path, captured
) -> None:
    """The batch's task id and name are kept with a rollup that cannot apply: a name too
    long for its column, with a lone surrogate, and an id with a NUL still keep it."""
    batch = commission_attempt(987655, 0, "orphan", captured)
    batch.task_id, batch.task_name = "id\x00", "demo.\ud800" + "n" * 300
    sink = DatabaseSink(spool=FileSpool(tmp_path / "spool"))
    assert sink.flush(batch) is True and len(sink.spool) == 0
    with session_scope() as s:
        [kept] = s.scalars(select(PendingRollup)).all()
        assert s.scalar(select(func.count()).select_from(OpenAICall)) == 2
    assert kept.task_id == "id\\x00" and len(kept.task_name) == 255
    assert kept.task_name.startswith("demo.\\ud800nnn") and not kept.dead


def test_a_spooled_batch_with_a_bad_rollup_lands_and_its_rollup_dies_alone(
    db_url: str, tmp_path, captured, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENMETER_ROLLUP_MAX_ATTEMPTS", "3")
    clear_settings()
    batch = commission_attempt(424242, 0, "late", captured)
    spool = FileSpool(tmp_path / "spool")
    spool.push(batch.to_json())  # spooled during an outage
    sink = DatabaseSink(spool=spool)
    assert sink.replay() == 1 and len(spool) == 0 and spool.dead_letters() == []
    assert sink.retry_rollups().failed == 1  # third failure: dead
    report = sink.retry_rollups()
    assert (report.applied, report.failed, report.left) == (0, 0, 0)  # dead ones wait
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(OpenAICall)) == 2
        [kept] = s.scalars(select(PendingRollup)).all()
    assert kept.dead and kept.attempts == 3
    with session_scope() as s:
        s.add(PipelineRun(id=424242, status="running", config={}))
    assert sink.retry_rollups(include_dead=True).applied == 1


def test_redis_spool_round_trip() -> None:
    spool = RedisSpool(fakeredis.FakeRedis())
    spool.push("a")
    spool.push("b")
    assert len(spool) == 2 and spool.peek() == "a"
    spool.remove("a")
    assert spool.peek() == "b"
    spool.dead_letter('{"x": 1}', "boom")
    assert spool.dead_letters() == [{"error": "boom", "batch": {"x": 1}}]


def test_call_json_round_trip_is_exact() -> None:
    call = chat(1, 2, "0.0000000001", rid="r", cached_input_tokens=1)
    back = call_from_json(call_to_json(call))
    assert back == call and isinstance(back.cost_usd, Decimal)


def test_rollup_refuses_unknown_columns_and_fields() -> None:
    with pytest.raises(ValueError, match="no column"):
        TableRollup(PipelineRunUsage, key={"pipeline_run_id": 1}, sums={"tokens": "input_tokens"})
    with pytest.raises(ValueError, match="CallRecord field"):
        TableRollup(PipelineRunUsage, key={"pipeline_run_id": 1}, sums={"prompt_tokens": "text"})


@pytest.mark.redis
def test_recovery_replays_a_real_redis_spool(
    db_url: str, captured: CollectingSink, redis_db: Any
) -> None:
    from tokenmeter.recovery import Recovery

    url = redis_db.url
    client = redis_db.client()
    run_id = make_run()
    batch = commission_attempt(run_id, 0, "r", captured)
    down = Recovery.connect(url)  # the ledger's identity is read while the database is up
    ledger = down.sink.ledger_id
    assert ledger and len(ledger) == 32
    down.sink.database_url = UNREACHABLE_PG  # then it goes away
    assert down.sink.flush(batch) is False
    assert client.llen(f"tokenmeter:{ledger}:spool") == 1  # named by the ledger
    assert client.llen("tokenmeter:spool") == 0
    assert down.run_once().still_spooled == 1

    report = Recovery.connect(url).run_once()
    assert (report.replayed, report.still_spooled) == (1, 0)
    with session_scope() as s:
        usage = s.scalars(select(PipelineRunUsage)).one()
    assert usage.prompt_tokens == 1000 and usage.total_cost_usd == Decimal("0.08027")


def test_long_labels_never_make_a_batch_unwritable(db_url: str, tmp_path) -> None:
    """A 300-character scope ref, a 71-character price version, a 200-character task name:
    the calls land (labels fitted, distinct ones kept distinct), nothing is spooled."""
    sink = DatabaseSink(spool=FileSpool(tmp_path / "spool"))
    long_ref = "r" * 300
    calls = []
    for i, ref in enumerate((long_ref, long_ref + "x")):
        call = chat(10, 2, "0.000003", rid=f"req_long_{i}")
        call.scope_kind, call.scope_ref = "k" * 80, ref
        call.task_name, call.price_version = "t" * 200, "v" * 71
        call.requested_model = "m" * 300
        call.execution_id, call.seq = "e-long", i
        calls.append(call)
    assert sink.flush(FlushBatch(calls=calls, execution_id=calls[0].execution_id)) is True
    assert len(sink.spool) == 0
    with session_scope() as s:
        rows = list(s.scalars(select(OpenAICall).order_by(OpenAICall.request_id)))
    assert [r.request_id for r in rows] == ["req_long_0", "req_long_1"]
    assert rows[0].scope_ref != rows[1].scope_ref  # the fitted labels stay distinct
    assert all(r.scope_ref.startswith("r" * 200) and len(r.scope_ref) == 255 for r in rows)
    # what priced it is kept whole (an unbounded column), whatever its length
    assert rows[0].price_version == "v" * 71 and rows[0].input_tokens == 10


def test_a_label_no_database_can_hold_is_escaped_and_any_other_kept() -> None:
    from tokenmeter.ledger import fitted, storable

    for plain in ("demo.scan", "caf\u00e9 \u2603", "", "back\\slash"):
        assert storable(plain) is plain  # the common case: the very same string
    assert storable("a\ud800b") == "a\\ud800b"  # a lone surrogate: no UTF-8 carries it
    assert storable("\udcff\u00e9") == "\\udcff\u00e9"  # the rest of the label kept
    assert storable("post\x00id") == "post\\x00id"  # no PostgreSQL text holds a NUL
    assert storable("\ud800\x00") == "\\ud800\\x00"
    for odd in ("a\ud800b", "post\x00id"):
        storable(odd).encode("utf-8")  # encodes now, and has no NUL left
        assert "\x00" not in storable(odd)
    long = fitted("\ud800" * 300, 255)  # escaped first (6 characters each), then fitted
    assert len(long) == 255 and long.startswith("\\ud800" * 40)
    assert fitted(None, 255) is None and fitted(7, 255) == 7 and fitted("x", None) == "x"


def test_labels_no_database_can_hold_never_make_a_batch_unwritable(db_url: str, tmp_path) -> None:
    """A task name with a lone surrogate (a name decoded from bytes), a scope ref with a NUL,
    a price file's path that is not UTF-8: the calls land, through the writer's batched
    commit and a single flush alike, and a batch spooled with them replays."""
    sink = DatabaseSink(spool=FileSpool(tmp_path / "spool"))

    def odd(rid: str, execution: str) -> FlushBatch:
        call = chat(10, 2, "0.000003", rid, execution_id=execution, seq=0)
        call.task_name, call.scope_kind, call.scope_ref = "demo.caf\u00e9-\ud800", "post", "p\x00"
        call.price_source = "file:/srv/\udcffprices.toml"
        return FlushBatch(calls=[call], execution_id=execution, task_name=call.task_name)

    sink.flush_many([odd("req_odd_many", "e-odd-1"), _batch("req_plain", "e-plain")])
    assert sink.flush(odd("req_odd_one", "e-odd-2")) is True
    sink.spool.push(odd("req_odd_spooled", "e-odd-3").to_json())  # by an earlier version
    assert sink.replay() == 1
    assert len(sink.spool) == 0 and sink.spool.dead_letters() == []
    with session_scope() as s:
        rows = {r.request_id: r for r in s.scalars(select(OpenAICall))}
    assert set(rows) == {"req_odd_many", "req_plain", "req_odd_one", "req_odd_spooled"}
    for rid in ("req_odd_many", "req_odd_one", "req_odd_spooled"):
        row = rows[rid]
        assert (row.task_name, row.scope_ref) == ("demo.caf\u00e9-\\ud800", "p\\x00")
        assert row.price_source == "file:/srv/\\udcffprices.toml" and row.input_tokens == 10


def test_a_label_that_fits_is_stored_unchanged() -> None:
    from tokenmeter.sink import fit

    assert fit("x" * 255, 255) == "x" * 255  # exactly the column's length: untouched
    fitted = fit("x" * 256, 255)
    assert len(fitted) == 255 and fitted != "x" * 255 and fitted.startswith("x" * 240)


def test_after_flush_hooks_never_break_the_caller_but_interrupts_go_through(
    db_url: str, tmp_path
) -> None:
    from billiard.exceptions import SoftTimeLimitExceeded

    def broken(batch, new_calls) -> None:
        raise ValueError("a hook's own bug")

    def interrupted(batch, new_calls) -> None:
        raise SoftTimeLimitExceeded()

    def batch_of(n: int) -> FlushBatch:
        call = chat(1, 1, "0.000001", rid=f"req_hook_{n}")
        call.execution_id = f"e-h{n}"
        return FlushBatch(calls=[call], execution_id=call.execution_id)

    sink = DatabaseSink(spool=FileSpool(tmp_path / "spool"), after_flush=[broken])
    assert sink.flush(batch_of(0)) is True  # the hook's bug is logged, not raised
    sink.after_flush = [interrupted]
    batch = batch_of(1)
    with pytest.raises(SoftTimeLimitExceeded):
        sink.flush(batch)
    with session_scope() as s:
        assert sorted(s.scalars(select(OpenAICall.request_id))) == ["req_hook_0", "req_hook_1"]


def test_a_blackholed_database_spools_within_the_timeout(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host that accepts the connection and never answers: the flush gives up at
    DATABASE_TIMEOUT_S and spools the batch, instead of hanging the task's postrun."""
    import socket
    import threading
    import time

    from tests.helpers import clear_settings

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def hold() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    threading.Thread(target=hold, daemon=True).start()
    monkeypatch.setenv("DATABASE_TIMEOUT_S", "1")
    clear_settings()
    port = listener.getsockname()[1]
    sink = DatabaseSink(
        f"postgresql+psycopg://nobody@127.0.0.1:{port}/ledger",
        spool=FileSpool(tmp_path / "spool"),
    )
    call = chat(5, 1, "0.000001", rid="req_blackholed")
    started = time.monotonic()
    try:
        assert sink.flush(FlushBatch(calls=[call], execution_id="e-bh")) is False
    finally:
        stop.set()
        for conn in held:
            conn.close()
        listener.close()
    assert time.monotonic() - started < 10
    assert len(sink.spool) == 1


class _BrokenSpool(FileSpool):
    def push(self, payload: str) -> None:
        raise OSError("disk full")


def test_after_flush_hooks_run_only_once_the_batch_is_durable(tmp_path) -> None:
    """A batch neither written nor spooled must keep its write-ahead entries: the hooks that
    forget them run only when it is in the database or in the spool."""
    ran: list[int] = []
    unreachable = DatabaseSink(UNREACHABLE_PG, spool=FileSpool(tmp_path / "ok"))
    unreachable.after_flush = [lambda batch, new: ran.append(len(new))]
    call = chat(1, 1, "0.000001", rid="req_durable")
    call.execution_id = "e-durable"
    assert unreachable.flush(FlushBatch(calls=[call], execution_id="e-durable")) is False
    assert ran == [0]  # spooled: durable, the hook ran

    lost = DatabaseSink(UNREACHABLE_PG, spool=_BrokenSpool(tmp_path / "broken"))
    lost.after_flush = [lambda batch, new: ran.append(-1)]
    assert lost.flush(FlushBatch(calls=[call], execution_id="e-durable")) is False
    assert ran == [0]  # not durable anywhere: the hook must not run


def test_a_call_captured_unpriced_is_priced_as_it_is_written_or_spooled(
    db_url: str, tmp_path
) -> None:
    """The capture leaves pricing to the writer: a batch's unpriced calls are priced when
    they are written, and before a spool keeps them."""

    def captured(rid: str) -> CallRecord:
        call = chat(1000, 200, None, rid=rid, cached_input_tokens=512)
        call.unpriced, call.execution_id = True, f"e-{rid}"
        return call

    # gpt-4o-mini per million tokens: $0.15 input, $0.075 cached input, $0.60 output
    expected = (488 * Decimal("0.15") + 512 * Decimal("0.075") + 200 * Decimal("0.60")) / 10**6
    spool = FileSpool(tmp_path / "spool")
    down = DatabaseSink(database_url=UNREACHABLE_PG, spool=spool)
    spooled = FlushBatch(calls=[captured("req_spooled")], execution_id="e-req_spooled")
    assert down.flush(spooled) is False
    [kept] = FlushBatch.from_json(spool.peek_many(1)[0]).calls
    assert (kept.cost_usd, kept.unpriced) == (expected, False) and kept.price_source

    up = DatabaseSink(spool=spool)
    assert up.flush(FlushBatch(calls=[captured("req_written")], execution_id="e-req_written"))
    assert up.replay() == 1
    with session_scope() as s:
        rows = {r.request_id: r.cost_usd for r in s.scalars(select(OpenAICall))}
    assert rows == {"req_spooled": expected, "req_written": expected}


def test_a_bug_in_pricing_leaves_the_cost_unknown_and_the_call_written(
    db_url: str, tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The writer prices what it writes: a pricing failure must not take the batch down."""
    from tokenmeter import pricing

    class Broken:
        def cost_of(self, call: CallRecord) -> None:
            raise RuntimeError("a bug in a price table")

    monkeypatch.setattr(pricing, "prices", lambda: Broken())
    call = chat(1000, 200, None, rid="req_unpriceable")
    call.unpriced, call.execution_id = True, "e-unpriceable"
    assert DatabaseSink(spool=FileSpool(tmp_path)).flush(
        FlushBatch(calls=[call], execution_id="e-unpriceable")
    )
    with session_scope() as s:
        row = s.scalars(select(OpenAICall)).one()
    assert (row.request_id, row.cost_usd, row.price_source) == ("req_unpriceable", None, None)
    assert "could not price a chat call to gpt-4o-mini-2024-07-18" in caplog.text


def test_redis_spool_lists_every_dead_letter() -> None:
    import fakeredis

    from tokenmeter.sink import RedisSpool

    spool = RedisSpool(fakeredis.FakeRedis(), key="tokenmeter:test-spool")
    payloads = [FlushBatch(calls=[], execution_id=f"e{i}").to_json() for i in range(3)]
    for payload in payloads:
        spool.push(payload)
        spool.dead_letter(payload, "boom")
    assert [d["batch"]["execution_id"] for d in spool.dead_letters()] == ["e0", "e1", "e2"]
    assert len(spool) == 0


def test_two_replayers_on_one_file_spool_write_each_batch_once(db_url: str, tmp_path) -> None:
    """A batch taken by another replayer between listing and reading is skipped, not a stop."""
    folder = tmp_path / "spool"
    pusher = FileSpool(folder)
    for i in range(5):
        call = chat(1, 1, "0.000001", rid=f"req_two_{i}")
        call.execution_id = f"e-two-{i}"
        pusher.push(FlushBatch(calls=[call], execution_id=call.execution_id).to_json())
    first, second = FileSpool(folder), FileSpool(folder)
    assert len(first.peek_many(5)) == 5  # first lists all five...
    taken = second.peek_many(2)  # ...then another replayer takes the two oldest
    for payload in taken:
        second.remove(payload)
    remaining = first.peek_many(5)
    assert len(remaining) == 3 and not set(remaining) & set(taken)
    sink = DatabaseSink(spool=first)
    assert sink.replay() == 3 and len(first) == 0
    first.remove("a payload nobody spooled")  # not there: nothing happens


def test_fallback_spool_keeps_working_while_redis_is_down(tmp_path) -> None:
    from tokenmeter.sink import FallbackSpool

    class DownRedisSpool:
        def __getattr__(self, name):
            def down(*_, **__):
                raise ConnectionError("redis unreachable")

            return down

        def __len__(self) -> int:
            raise ConnectionError("redis unreachable")

    local = FileSpool(tmp_path / "local")
    spool = FallbackSpool(DownRedisSpool(), local)  # type: ignore[arg-type]
    payload = FlushBatch(calls=[], execution_id="e-fallback").to_json()
    spool.push(payload)  # Redis down: lands in the local file spool
    assert len(local) == 1 and len(spool) == 1
    assert spool.peek() == payload and spool.peek_many(5) == [payload]
    spool.dead_letter(payload, "boom")  # Redis down: dead-lettered locally
    assert len(spool) == 0 and [d["error"] for d in local.dead_letters()] == ["boom"]


def test_tokenmeter_rollups_reports_kept_rollups_and_retries_them(
    db_url: str, tmp_path, captured
) -> None:
    from typer.testing import CliRunner

    from tokenmeter.reporting.cli import app

    cli = CliRunner()
    assert cli.invoke(app, ["rollups"]).exit_code == 0  # nothing kept
    DatabaseSink(spool=FileSpool(tmp_path)).flush(commission_attempt(31337, 0, "cli", captured))
    listed = cli.invoke(app, ["rollups", "--format", "json"])
    assert listed.exit_code == 1  # something to look at
    [kept] = json.loads(listed.output)
    assert kept["rollup"]["key"] == {"pipeline_run_id": 31337} and kept["calls"] == 2
    assert kept["task_id"] == "task-cli" and "IntegrityError" in kept["last_error"]
    assert cli.invoke(app, ["rollups", "--dead"]).exit_code == 2  # --dead goes with --retry
    with session_scope() as s:
        s.add(PipelineRun(id=31337, status="running", config={}))
    retried = cli.invoke(app, ["rollups", "--retry"])
    assert retried.exit_code == 0 and "applied 1" in retried.output, retried.output
    with session_scope() as s:
        assert s.scalars(select(PipelineRunUsage)).one().prompt_tokens == 1000


def test_spools_take_out_exactly_the_batch_asked_for(tmp_path) -> None:
    """Found by mutation: removing a batch that was not just peeked, dead-lettering one of two
    identical payloads, reading past a spool that fails or past ``n``."""
    from tokenmeter.sink import FallbackSpool

    files = FileSpool(tmp_path / "files")
    first, second = (FlushBatch(calls=[], execution_id=f"e-{i}").to_json() for i in (1, 2))
    files.push(first)
    files.push(second)
    FileSpool(tmp_path / "files").remove(second)  # another process's spool object: no peek
    assert FileSpool(tmp_path / "files").peek_many(5) == [first]
    FileSpool(tmp_path / "files").remove(first)
    assert len(files) == 0

    redis_spool = RedisSpool(fakeredis.FakeRedis(), key="tokenmeter:test-twice")
    redis_spool.push(first)
    redis_spool.push(first)  # the same batch spooled twice (idempotent to write)
    redis_spool.dead_letter(first, "boom")
    assert len(redis_spool) == 1 and len(redis_spool.dead_letters()) == 1

    class Broken:
        def peek_many(self, n: int) -> list[str]:
            raise ConnectionError("the local spool's disk is gone")

    primary = RedisSpool(fakeredis.FakeRedis(), key="tokenmeter:test-primary")
    for payload in (first, second, FlushBatch(calls=[], execution_id="e-3").to_json()):
        primary.push(payload)
    assert FallbackSpool(primary, Broken()).peek_many(2) == [first, second]  # type: ignore[arg-type]
    local = FileSpool(tmp_path / "local")
    local.push(second)
    both = FallbackSpool(primary, local)
    assert both.peek_many(1) == [second]  # the local leftovers first, and no more than asked
    assert both.peek_many(2) == [second, first]


def test_a_sink_takes_its_own_ledgers_batches_without_asking_the_database(db_url) -> None:
    """A batch stamped with the sink's own ledger id is its own, whatever id the database
    holds (a sink named explicitly, as the provisional recovery does)."""
    sink = DatabaseSink(ledger_id="ledger-named-here")
    assert sink.accepts(FlushBatch(calls=[], ledger="ledger-named-here"))
    assert sink.accepts(FlushBatch(calls=[], ledger=None))
    assert not sink.accepts(FlushBatch(calls=[], ledger="somebody-else"))


def test_replay_writes_at_most_its_limit_oldest_first(db_url: str, tmp_path) -> None:
    spool = FileSpool(tmp_path / "spool")
    payloads = [
        FlushBatch(calls=[chat(10, 1, "0.001", rid=f"req_lim{i}")], execution_id=f"e-lim{i}")
        for i in range(5)
    ]
    for batch in payloads:
        for call in batch.calls:
            call.execution_id = batch.execution_id
        spool.push(batch.to_json())
    assert FileSpool(tmp_path / "spool").peek() == payloads[0].to_json()  # the oldest
    sink = DatabaseSink(spool=FileSpool(tmp_path / "spool"))
    assert sink.replay(limit=2) == 2
    assert len(spool) == 3
    with session_scope() as s:
        assert sorted(s.scalars(select(OpenAICall.request_id))) == ["req_lim0", "req_lim1"]
    assert sink.replay(limit=2, chunk=1) == 2 and len(spool) == 1
    assert sink.replay() == 1 and len(spool) == 0


# -- edges the mutation run showed untested ------------------------------------------------------
def _batch(rid: str, execution: str, ledger: str | None = None, **kw: Any) -> FlushBatch:
    call = chat(10, 2, "0.000003", rid, execution_id=execution, seq=0)
    return FlushBatch(calls=[call], execution_id=execution, ledger=ledger, **kw)


def test_a_label_that_fits_is_kept_whole_and_a_longer_one_fits_exactly() -> None:
    from hashlib import sha256

    from tokenmeter.sink import _column_value, fit

    assert fit("abc", 3) == "abc" and fit("ab", 3) == "ab" and fit("", 3) == ""
    long = "x" * 40
    cut = fit(long, 20)
    assert len(cut) == 20 and cut == "x" * 7 + "~" + sha256(long.encode()).hexdigest()[:12]
    assert fit("x" * 41, 20) != cut  # distinct values stay distinct
    exact = CallRecord(operation="chat", requested_model="m" * 128)
    assert _column_value(exact, "requested_model") == "m" * 128
    shorter = CallRecord(operation="chat", requested_model="m" * 127)
    assert _column_value(shorter, "requested_model") == "m" * 127
    over = CallRecord(operation="chat", requested_model="m" * 129)
    assert len(_column_value(over, "requested_model")) == 128


def test_a_copy_row_is_each_column_s_value_fitted_and_processed() -> None:
    """The COPY row (one attrgetter, then the bounded and processed columns) is exactly what
    the column-by-column path gives: every column, long labels fitted, booleans, money."""
    from sqlalchemy.dialects import postgresql

    from tokenmeter.sink import _COPY_COLUMNS, _column_value, _copy_plan, _copy_row

    dialect = postgresql.psycopg.dialect()  # type: ignore[attr-defined]
    plan = _copy_plan(dialect)
    long = "é" * 600
    calls = [
        chat(10, 2, "0.000003", "req-1", execution_id="e" * 32, seq=3, stream=True),
        CallRecord(
            operation=long,
            requested_model=long,
            response_model=None,
            request_id=long,
            client_request_id=long,
            task_id=long,
            task_name=long,
            scope_kind=long,
            scope_ref=long,
            hostname=long,
            project=long,
            api_key_hint=long,
            service_tier=long,
            image_size=long,
            image_quality=long,
            status=long,
            error_type=long,
            execution_id=long,
            usage_reported=False,
            batch=True,
        ),
        CallRecord(  # labels no database can hold as they are: the two paths agree too
            operation="chat",
            task_name="caf\u00e9-\ud800" * 40,
            scope_ref="post\x00id",
            price_source="file:/tmp/\udcff.toml",
            execution_id="e-odd",
        ),
    ]
    for call in calls:
        expected = []
        for column in _COPY_COLUMNS:
            process = column.type.dialect_impl(dialect).bind_processor(dialect)
            value = _column_value(call, column.name)
            expected.append(value if process is None else process(value))
        assert _copy_row(call, plan) == expected
    assert len(_copy_row(calls[1], plan)[[c.name for c in _COPY_COLUMNS].index("model")]) == 128


def test_every_statement_of_a_flush_is_bounded_by_database_timeout(
    db_url: str, tmp_path, monkeypatch
) -> None:
    from sqlalchemy import event

    from tokenmeter.db import get_engine

    monkeypatch.setenv("DATABASE_TIMEOUT_S", "2.5")
    clear_settings()
    sink = DatabaseSink(spool=FileSpool(tmp_path / "spool"))
    seen: list[str] = []

    def watch(_conn, _cursor, statement, *_args) -> None:
        seen.append(statement)

    engine = get_engine(sink.database_url)
    event.listen(engine, "before_cursor_execute", watch)
    try:
        assert sink.flush(_batch("req_timeout", "exec-timeout"))
    finally:
        event.remove(engine, "before_cursor_execute", watch)
    timeouts = [s for s in seen if "statement_timeout" in s]
    if engine.dialect.name == "postgresql":
        assert timeouts == ["SET LOCAL statement_timeout = 2500"]
    else:
        assert timeouts == []


def test_deliver_hands_a_batch_to_the_writer_when_there_is_one(db_url: str, tmp_path) -> None:
    sink = DatabaseSink(spool=FileSpool(tmp_path / "spool"))
    queued: list[FlushBatch] = []

    class Writer:
        def submit(self, batch: FlushBatch) -> None:
            queued.append(batch)

    sink.writer = Writer()  # type: ignore[assignment]
    first = _batch("req_deliver_1", "exec-deliver-1")
    sink.deliver(first)
    assert queued == [first] and ledger_ids() == []
    sink.writer = None
    sink.deliver(_batch("req_deliver_2", "exec-deliver-2"))
    assert queued == [first] and ledger_ids() == ["req_deliver_2"]


def ledger_ids() -> list[str | None]:
    with session_scope() as s:
        return sorted(s.scalars(select(OpenAICall.request_id)))


def test_replay_stops_at_its_limit_and_leaves_other_ledgers_batches(
    db_url: str, tmp_path, caplog
) -> None:
    spool = FileSpool(tmp_path / "spool")
    sink = DatabaseSink(spool=spool)
    for i in range(5):
        spool.push(_batch(f"req_replay_{i}", f"exec-replay-{i}").to_json())
    with caplog.at_level("INFO", logger="tokenmeter.sink"):
        assert sink.replay(limit=3, chunk=2) == 3
    assert len(spool) == 2 and len(ledger_ids()) == 3
    assert "another ledger" not in caplog.text and "replayed 3 spooled usage batches" in caplog.text
    for i in range(2):
        spool.push(_batch(f"req_foreign_{i}", f"exec-foreign-{i}", ledger="some-other").to_json())
    caplog.clear()
    sink = DatabaseSink(spool=FileSpool(tmp_path / "spool"))  # a fresh look at the folder
    with caplog.at_level("INFO", logger="tokenmeter.sink"):
        assert sink.replay() == 2  # the two of this ledger, read with the two of another
    foreign = [r.getMessage() for r in caplog.records if "another ledger" in r.getMessage()]
    assert foreign == ["2 spooled batches belong to another ledger: left"] * 2  # each pass
    assert len(sink.spool) == 2 and len(ledger_ids()) == 5


def test_the_flush_log_line_says_how_long_and_an_unknown_cost(
    db_url: str, tmp_path, caplog
) -> None:
    sink = DatabaseSink(spool=FileSpool(tmp_path / "spool"))
    unpriced = FlushBatch(
        calls=[chat(5, 1, None, "req_log", execution_id="exec-log", seq=0)],
        execution_id="exec-log",
        task_id="t-log",
    )
    with caplog.at_level("INFO", logger="tokenmeter.sink"):
        assert sink.flush(unpriced)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("flushed")]
    assert "flushed unscoped t-log" in line and "cost unknown USD" in line
    ms = float(line.rsplit(" in ", 1)[1].removesuffix(" ms"))
    assert 0 <= ms < 60_000


def test_file_spool_edges(tmp_path) -> None:
    nested = FileSpool(tmp_path / "a" / "b" / "c")  # its folders are made
    nested.push("one")
    nested.push("two")
    other = FileSpool(tmp_path / "a" / "b" / "c")  # another process on the same folder
    assert nested.peek_many(2) == ["one", "two"]
    other.remove("one")
    nested.remove("one")  # peeked here, removed there: already gone is no error
    assert nested.peek_many(2) == ["two"] and nested.peek() == "two"
    nested.remove("two")
    assert len(nested) == 0 and nested.peek() is None


def test_redis_spool_removes_one_copy_and_peeks_the_oldest() -> None:
    spool = RedisSpool(fakeredis.FakeRedis(), key="tokenmeter:test-spool")
    for payload in ("a", "a", "b"):
        spool.push(payload)
    assert spool.peek() == "a"
    spool.remove("a")
    assert len(spool) == 2 and spool.peek_many(5) == ["a", "b"]


def test_a_batch_round_trip_keeps_its_defaults() -> None:
    batch = _batch("req_rt", "exec-rt")
    assert batch.attempt == 0 and batch.batch_id
    data = json.loads(batch.to_json())
    del data["batch_id"], data["attempt"]
    again = FlushBatch.from_json(json.dumps(data))
    assert again.attempt == 0 and again.batch_id and again.batch_id != batch.batch_id
    with usage_scope("task", "state-label", state="retry") as scope:
        pass
    assert FlushBatch.from_scope(scope).state == "retry"
    assert FlushBatch.from_scope(scope, state="failure").state == "failure"


def test_a_commit_of_many_with_a_bad_rollup_writes_each_batch_alone(
    db_url: str, tmp_path, captured
) -> None:
    """The writer's commit fails for one batch's rollup (not the database): every batch is
    written on its own, the bad rollup kept, nothing spooled."""
    bad = commission_attempt(987655, 0, "orphan-many", captured)  # no such run: FK fails
    good = _batch("req_many_good", "exec-many-good")
    spool = FileSpool(tmp_path / "spool")
    sink = DatabaseSink(spool=spool)
    sink.flush_many([good, bad])
    assert len(spool) == 0
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(OpenAICall)) == 3
        assert s.scalar(select(func.count()).select_from(PendingRollup)) == 1


def test_replay_dead_letters_a_bad_batch_and_goes_on_with_the_rest(db_url: str, tmp_path) -> None:
    spool = FileSpool(tmp_path / "spool")
    sink = DatabaseSink(spool=spool)
    bad = _batch("req_replay_bad", "exec-replay-bad")
    bad.calls[0].input_tokens = 2**70  # fits no integer column: this batch can never land
    for batch in (_batch("req_replay_a", "exec-replay-a"), bad, _batch("req_replay_b", "e-b")):
        spool.push(batch.to_json())
    assert sink.replay(chunk=2) == 2  # the chunk with the bad one, one by one; then the rest
    assert ledger_ids() == ["req_replay_a", "req_replay_b"]
    assert len(spool) == 0
    [dead] = spool.dead_letters()
    assert dead["batch"]["calls"][0]["request_id"] == "req_replay_bad" and dead["error"]


def test_a_spooled_batch_carries_its_ledger_and_durable_means_durable(tmp_path) -> None:
    """A batch that could not be written is stamped with the sink's ledger before it is
    spooled (so another ledger never replays it), by flush and by the writer's flush_many;
    a batch the spool refused too is not called durable."""
    spool = FileSpool(tmp_path / "spool")
    down = DatabaseSink(UNREACHABLE_PG, spool=spool, ledger_id="ledger-a")
    assert down.persist(_batch("req_stamp_1", "exec-stamp-1")) is True  # in the spool
    down.flush_many([_batch("req_stamp_2", "exec-stamp-2"), _batch("req_stamp_3", "e-s3")])
    stamped = [json.loads(p)["ledger"] for p in spool.peek_many(10)]
    assert stamped == ["ledger-a"] * 3
    foreign = _batch("req_stamp_4", "exec-stamp-4", ledger="ledger-b")
    down.flush(foreign)
    last = FileSpool(tmp_path / "spool").peek_many(10)[-1]
    assert json.loads(last)["ledger"] == "ledger-b"  # kept, not taken over
    lost = DatabaseSink(UNREACHABLE_PG, spool=_BrokenSpool(tmp_path / "broken"))
    assert lost.persist(_batch("req_stamp_5", "exec-stamp-5")) is False


def test_the_log_lines_say_the_first_line_of_the_error(tmp_path, caplog) -> None:
    with caplog.at_level("WARNING", logger="tokenmeter.sink"):
        DatabaseSink(UNREACHABLE_PG, spool=FileSpool(tmp_path / "spool")).flush(
            _batch("req_log_err", "exec-log-err")
        )
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("flush failed")]
    assert line.startswith("flush failed (OperationalError: (psycopg.OperationalError) ")
    assert "Background on this error" not in line and "\n" not in line


def test_the_rollup_warning_says_the_first_line_of_its_error(
    db_url: str, tmp_path, captured, caplog
) -> None:
    batch = commission_attempt(987656, 0, "orphan-log", captured)  # no such run: FK fails
    with caplog.at_level("WARNING", logger="tokenmeter.sink"):
        assert DatabaseSink(spool=FileSpool(tmp_path / "spool")).flush(batch)
    [line] = [r.getMessage() for r in caplog.records if "could not apply" in r.getMessage()]
    assert "IntegrityError: (" in line and "[SQL:" not in line and "sqlalche.me" not in line


def test_an_interrupt_in_a_rollup_goes_on_to_the_task(db_url: str, tmp_path, captured) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    batch = commission_attempt(987657, 0, "interrupted", captured)
    sink = DatabaseSink(spool=FileSpool(tmp_path / "spool"))
    original = TableRollup.apply

    def interrupted(self, conn, calls):  # the task's time limit, mid-rollup
        raise SoftTimeLimitExceeded()

    TableRollup.apply = interrupted  # type: ignore[method-assign]
    try:
        with pytest.raises(SoftTimeLimitExceeded):
            sink.write(batch)
    finally:
        TableRollup.apply = original  # type: ignore[method-assign]
    with session_scope() as s:  # nothing half-written, nothing kept to retry
        assert s.scalar(select(func.count()).select_from(PendingRollup)) == 0


def test_file_spool_removes_exactly_the_payload_and_dead_letters_twice(tmp_path) -> None:
    writer = FileSpool(tmp_path / "spool")
    for payload in ("b", "a"):
        writer.push(payload)
    FileSpool(tmp_path / "spool").remove("a")  # a fresh instance: found by content
    assert FileSpool(tmp_path / "spool").peek_many(5) == ["b"]
    for payload in ('{"n": 1}', '{"n": 2}'):
        writer.push(payload)
        writer.dead_letter(payload, "bad")  # the dead-letter folder exists the second time
    assert [d["batch"] for d in writer.dead_letters()] == [{"n": 1}, {"n": 2}]


def test_a_fallback_spool_removes_from_both_when_one_fails(tmp_path) -> None:
    from tokenmeter.sink import FallbackSpool

    class Failing(FileSpool):
        def remove(self, payload: str) -> None:
            raise ConnectionError("redis is down")

    fallback = FileSpool(tmp_path / "file")
    spool = FallbackSpool(Failing(tmp_path / "primary"), fallback)
    fallback.push("p")
    spool.remove("p")
    assert len(fallback) == 0
    primary = FileSpool(tmp_path / "primary-ok")  # the local one failing, read first
    spool = FallbackSpool(primary, Failing(tmp_path / "file-2"))
    primary.push("q")
    spool.remove("q")
    assert len(primary) == 0


def test_an_invalidated_connection_is_a_connectivity_error() -> None:
    from sqlalchemy import exc as sa_exc

    from tokenmeter.sink import is_connectivity_error

    lost = sa_exc.DBAPIError(
        "SELECT 1", {}, Exception("server closed"), connection_invalidated=True
    )
    assert is_connectivity_error(lost) is True
    kept = sa_exc.DBAPIError("SELECT 1", {}, Exception("bad value"), connection_invalidated=False)
    assert is_connectivity_error(kept) is False


def test_a_calls_json_leaves_out_what_holds_its_default_and_round_trips() -> None:
    """The write-ahead line of a call carries what the call has (it is written per call, on
    the task's path), and reads back to the same record."""
    call = CallRecord(
        operation="chat",
        requested_model="gpt-4o-mini",
        input_tokens=12,
        cost_usd=Decimal("0.0000018"),
        stream=False,
        service_tier=None,
    )
    out = call_to_json(call)
    assert set(out) == {"operation", "requested_model", "input_tokens", "cost_usd", "created_at"}
    assert call_from_json(out) == call
    zeros = CallRecord(operation="chat", usage_reported=False, cost_usd=Decimal(0))
    assert call_from_json(call_to_json(zeros)) == zeros
    assert call_to_json(zeros)["usage_reported"] is False and call_to_json(zeros)["cost_usd"] == "0"


def test_every_value_of_a_call_reads_back_as_it_was_written(db_url: str, tmp_path) -> None:
    """Every column of the ledger, filled (PostgreSQL copies them in binary, each column with
    its own type; SQLite inserts them), through the writer's batched commit: each reads back
    as written, money to the last digit, and a moment without a zone as UTC."""
    from datetime import UTC, datetime

    from tokenmeter.sink import _COPY_COLUMNS

    sink = DatabaseSink(spool=FileSpool(tmp_path / "spool"))
    full = CallRecord(
        operation="responses",
        requested_model="gpt-5-mini",
        response_model="gpt-5-mini-2025-08-07",
        request_id="req_full",
        client_request_id="tm-full",
        service_tier="flex",
        batch=True,
        input_tokens=2_000_000_000,  # near the column's limit
        cached_input_tokens=1_024,
        cache_write_tokens=5,
        input_image_tokens=6,
        input_audio_tokens=7,
        output_tokens=1_234,
        reasoning_tokens=800,
        output_audio_tokens=9,
        image_count=2,
        image_size="1024x1536",
        image_quality="high",
        web_search_calls=3,
        file_search_calls=4,
        usage_reported=False,
        stream=True,
        cost_usd=Decimal("12345678.0123456789"),
        price_source="genai-prices 0.2.5",
        price_version="gpt-5-mini@listed flex",
        latency_ms=123.456,
        status="incomplete",
        error_type="StreamClosedEarly",
        http_status=200,
        created_at=datetime(2026, 1, 2, 3, 4, 5, 678_901),  # no zone: UTC
        task_id="t-1",
        task_name="demo.full",
        attempt=2,
        execution_id="e-full",
        seq=7,
        scope_kind="pipeline_run",
        scope_ref="42",
        hostname="host-1",
        project="proj_1",
        api_key_hint="sk-proj...abcd",
    )
    priced_nothing = chat(0, 0, "0", "req_zero", execution_id="e-full", seq=8)
    unknown = chat(3, 0, None, "req_unknown", execution_id="e-full", seq=9)
    sink.flush_many([FlushBatch(calls=[full, priced_nothing, unknown], execution_id="e-full")])
    assert len(sink.spool) == 0
    with session_scope() as s:
        rows = {r.request_id: r for r in s.scalars(select(OpenAICall))}
    row = rows["req_full"]
    for column in _COPY_COLUMNS:
        expected = getattr(full, column.name)
        if column.name == "created_at":
            expected = expected.replace(tzinfo=UTC)
            got = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
            assert got == expected
            continue
        assert getattr(row, column.name) == expected, column.name
    assert str(row.cost_usd) == "12345678.0123456789"
    assert rows["req_zero"].cost_usd == 0 and rows["req_unknown"].cost_usd is None


@pytest.mark.postgres
def test_postgresql_copies_every_column_in_binary() -> None:
    from sqlalchemy.dialects import postgresql, sqlite

    from tokenmeter.sink import _COPY_COLUMNS, _binary_types

    types = _binary_types(postgresql.psycopg.dialect())  # type: ignore[attr-defined]
    assert types is not None and len(types) == len(_COPY_COLUMNS)
    by_name = dict(zip((c.name for c in _COPY_COLUMNS), types, strict=True))
    assert by_name["created_at"] == "timestamptz" and by_name["cost_usd"] == "numeric"
    assert by_name["input_tokens"] == "int4" and by_name["stream"] == "bool"
    assert by_name["price_version"] == "text" and by_name["latency_ms"] == "float8"
    assert by_name["scope_ref"] == "text"  # VARCHAR(255): one binary form with text
    assert _binary_types(sqlite.dialect()) is None


@pytest.mark.postgres
def test_a_psycopg_without_a_binary_dumper_for_a_column_copies_in_text(
    db_url: str, tmp_path, monkeypatch
) -> None:
    from psycopg import ProgrammingError, adapters
    from sqlalchemy.dialects import postgresql

    from tokenmeter import sink as sink_module

    real = adapters.get_dumper_by_oid

    def no_binary_numeric(oid, format):
        if oid == adapters.types["numeric"].oid:
            raise ProgrammingError("cannot find a dumper for type numeric format BINARY")
        return real(oid, format)

    monkeypatch.setattr(adapters, "get_dumper_by_oid", no_binary_numeric)
    monkeypatch.setattr(sink_module, "_copy_plans", {})
    assert sink_module._copy_plan(postgresql.psycopg.dialect()).types is None  # type: ignore[attr-defined]
    sink = DatabaseSink(spool=FileSpool(tmp_path / "spool"))
    sink.flush_many([_batch("req_text_copy", "e-text")])
    assert len(sink.spool) == 0
    with session_scope() as s:
        assert s.scalar(select(OpenAICall.cost_usd)) == Decimal("0.000003")
