"""The background writer: a task's end never touches the database, and nothing is lost.

Each guarantee the inline flush had is checked again with the writer between the task and the
ledger: many tasks per commit, off the task's thread; a process killed before the commit
(SIGKILL, for real) loses nothing and counts nothing twice; a database that is down sends the
writer's batches to the spool; ``tokenmeter.flush()`` and ``tokenmeter flush --wait`` wait for
the writer; a forked child never writes its parent's queue.
"""

from __future__ import annotations

import contextvars
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import select
from typer.testing import CliRunner

import tokenmeter
from models import AgentScannedPost, session_scope
from tests.helpers import chat_call, dead_pid, subprocess_env
from tokenmeter import OpenAICall
from tokenmeter.context import (
    CallRecord,
    _current,
    close_scope,
    open_scope,
    set_sink,
    usage_scope,
)
from tokenmeter.filewal import FileWriteAheadLog
from tokenmeter.reporting.cli import app as cli
from tokenmeter.rollups import TableRollup
from tokenmeter.settings import get_settings
from tokenmeter.sink import BoundRollup, DatabaseSink, FileSpool, FlushBatch
from tokenmeter.writer import BackgroundWriter

ROOT = Path(__file__).resolve().parent.parent
COST = Decimal("0.0000270000")


def call(tag: str) -> CallRecord:
    return chat_call(tag, cost=COST)


def ledger() -> list[OpenAICall]:
    with session_scope() as s:
        return list(s.scalars(select(OpenAICall).order_by(OpenAICall.id)))


class Gate:
    """Holds the writer's first commit until released (tasks queue up meanwhile)."""

    def __init__(self, sink: DatabaseSink, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()
        self.sizes: list[int] = []
        self.threads: set[str] = set()
        original = sink.flush_many
        gate = self

        def held(batches: list[FlushBatch]) -> None:
            gate.sizes.append(len(batches))
            gate.threads.add(threading.current_thread().name)
            gate.entered.set()
            gate.open.wait(30)
            original(batches)

        monkeypatch.setattr(sink, "flush_many", held)


def watch_transactions(sink: DatabaseSink, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of the thread of each transaction ``sink`` opens from now on."""
    transactions: list[str] = []
    original = sink._transaction

    def watched():
        transactions.append(threading.current_thread().name)
        return original()

    monkeypatch.setattr(sink, "_transaction", watched)
    return transactions


@pytest.fixture
def app(no_installation: None) -> Celery:
    app = Celery("writer_test")
    app.conf.update(task_always_eager=True, broker_url="memory://")
    return app


@pytest.fixture
def sink(tmp_path: Path) -> DatabaseSink:
    return DatabaseSink(spool=FileSpool(tmp_path / "spool"))


@pytest.fixture
def metering(app: Celery, db_url: str, sink: DatabaseSink) -> Iterator[tokenmeter.CeleryMetering]:
    handle = tokenmeter.install(app, sink=sink, recovery_interval_s=0, instrument_openai=False)
    yield handle
    handle.uninstall()


def test_tasks_end_without_the_database_and_the_writer_commits_many_at_once(
    app, metering, sink, monkeypatch
) -> None:
    transactions = watch_transactions(sink, monkeypatch)
    gate = Gate(sink, monkeypatch)

    @app.task(name="demo.two_calls")
    def two_calls(i: int) -> None:
        call(f"{i}-a")
        call(f"{i}-b")

    two_calls.apply(args=(0,))
    assert gate.entered.wait(10)  # the writer holds the first task's batch
    for i in range(1, 20):
        two_calls.apply(args=(i,))
    assert tokenmeter.flush(timeout=0.2) is False  # still held: flush says so, never hangs
    assert transactions == []  # 20 tasks ended; none of them opened a transaction
    gate.open.set()
    assert tokenmeter.flush(timeout=30) is True

    rows = ledger()
    assert len(rows) == 40 and len({r.request_id for r in rows}) == 40
    assert gate.sizes == [1, 19]  # the 19 that queued behind the first: one commit
    assert gate.threads == {"tokenmeter-writer"}
    assert set(transactions) == {"tokenmeter-writer"} and len(transactions) == 2


def test_a_task_that_calls_nothing_writes_nothing(app, metering, sink, monkeypatch) -> None:
    """Most tasks of a Celery app make no OpenAI call: their end queues no batch and opens no
    transaction; a scope that bound a rollup is still written (its row is kept equal, at 0)."""
    transactions = watch_transactions(sink, monkeypatch)

    @app.task(name="demo.no_calls")
    def no_calls() -> int:
        return 1

    queued_before = metering.writer._queued
    for _ in range(20):
        no_calls.apply()
    assert tokenmeter.flush(timeout=10) is True
    assert metering.writer._queued == queued_before and transactions == [] and ledger() == []

    from tokenmeter.sink import FlushBatch as Batch

    delivered: list[Batch] = []
    monkeypatch.setattr(sink, "deliver", delivered.append)
    with usage_scope("pipeline_run", "empty") as scope:  # closed into the installed sink
        scope.bind_rollup(TableRollup(AgentScannedPost, key={"id": 1}, sums={}))
    with usage_scope("pipeline_run", "nothing"):
        pass
    assert [len(b.rollups) for b in delivered] == [1]


def test_uninstall_writes_what_is_queued(app, db_url, sink, monkeypatch) -> None:
    handle = tokenmeter.install(app, sink=sink, recovery_interval_s=0, instrument_openai=False)
    gate = Gate(sink, monkeypatch)

    @app.task(name="demo.one_call")
    def one_call(i: int) -> None:
        call(f"u{i}")

    for i in range(3):
        one_call.apply(args=(i,))
    gate.open.set()
    handle.uninstall()
    assert sorted(r.request_id for r in ledger()) == ["req_u0", "req_u1", "req_u2"]


CHILD = """
import os, signal, sys, threading
from celery import Celery
import tokenmeter
from models import AgentScannedPost
from tokenmeter.context import CallRecord, record_call, usage_scope
from tokenmeter.rollups import TableRollup
from tokenmeter.sink import DatabaseSink

DatabaseSink.flush_many = lambda self, batches: threading.Event().wait()  # never commits

app = Celery("killed", broker="memory://")
app.conf.task_always_eager = True
tokenmeter.install(app, recovery_interval_s=0, instrument_openai=False)

@app.task(name="demo.scan")
def scan(i):
    with usage_scope("scanned_post", f"p{i}") as post:
        post.bind_rollup(TableRollup(
            AgentScannedPost, key={"post_id": f"p{i}"},
            sums={"prompt_tokens": "input_tokens", "completion_tokens": "output_tokens"},
            cost_column="total_cost_usd",
            values={"agent_model": "m"}))
        for part in ("rate", "reply"):
            record_call(CallRecord(operation="chat", requested_model="gpt-4o-mini",
                request_id=f"req_{i}_{part}", input_tokens=300, output_tokens=40,
                cost_usd=__import__("decimal").Decimal("0.0000690000")))

for i in range(5):
    scan.apply(args=(i,))
print("ended", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_process_killed_before_the_writer_commits_loses_nothing(db_url, tmp_path) -> None:
    """SIGKILL after five tasks ended, their batches queued and not committed: ``tokenmeter
    flush`` (the recovery every worker also runs) writes them from the write-ahead file, once."""
    with session_scope() as s:  # the application writes its rows; the rollups add to them
        s.add_all(AgentScannedPost(post_id=f"p{i}", subreddit="crafts") for i in range(5))
    env = subprocess_env(
        PYTHONPATH=str(ROOT),
        DATABASE_URL=db_url,
        TOKENMETER_DATA_DIR=str(tmp_path / "data"),
    )
    child = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120
    )
    assert child.returncode == -9, child.stderr
    assert child.stdout.strip() == "ended"
    assert ledger() == []  # nothing reached the database: recovery must do it all

    for _ in range(2):  # twice: the second finds nothing left and changes nothing
        done = subprocess.run(
            [sys.executable, "-m", "tokenmeter.reporting.cli", "flush"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    rows = ledger()
    assert sorted(r.request_id for r in rows) == sorted(
        f"req_{i}_{part}" for i in range(5) for part in ("rate", "reply")
    )
    with session_scope() as s:
        posts = list(s.scalars(select(AgentScannedPost).order_by(AgentScannedPost.post_id)))
    assert [(p.post_id, p.prompt_tokens, p.completion_tokens) for p in posts] == [
        (f"p{i}", 600, 80) for i in range(5)
    ]
    assert all(p.total_cost_usd == Decimal("0.0001380000") for p in posts)


def test_the_writer_spools_when_the_database_is_down(db_url, tmp_path) -> None:
    spool = FileSpool(tmp_path / "spool")
    down = DatabaseSink(f"sqlite:///{tmp_path / 'missing' / 'dir' / 'x.sqlite'}", spool=spool)
    writer = BackgroundWriter(down)
    for i in range(4):
        writer.submit(FlushBatch(calls=[_record(f"down{i}", i)], execution_id=f"e{i}"))
    assert writer.flush(timeout=30)
    assert len(spool) == 4 and ledger() == []
    assert DatabaseSink(spool=spool).replay() == 4
    assert sorted(r.request_id for r in ledger()) == [f"req_down{i}" for i in range(4)]
    writer.close()


def _record(tag: str, seq: int) -> CallRecord:
    return CallRecord(
        operation="chat",
        requested_model="gpt-4o-mini",
        request_id=f"req_{tag}",
        input_tokens=10,
        output_tokens=2,
        cost_usd=COST,
        execution_id=f"e{seq}",
        seq=0,
    )


def test_flush_wait_waits_for_the_live_writers_of_this_host(
    no_installation, db_url, sink, monkeypatch, tmp_path
) -> None:
    wal = FileWriteAheadLog(get_settings().wal_dir)
    sink.after_flush.append(wal.after_flush)
    writer = BackgroundWriter(sink, on_queued=[wal.closed])
    sink.writer = writer
    gate = Gate(sink, monkeypatch)
    previous = set_sink(sink)
    try:
        root, token = open_scope("task", "t1", task_id="t1", task_name="demo.wait")
        wal.attach(root)
        call("wait")
        close_scope(root, token)
    finally:
        set_sink(previous)
    assert gate.entered.wait(10)
    assert wal.pending() == 1

    runner = CliRunner()
    held = runner.invoke(cli, ["flush", "--wait", "--timeout", "0.3"])
    assert held.exit_code == 1, held.output
    assert "1 ended tasks not yet written" in held.output

    threading.Timer(0.3, gate.open.set).start()
    started = time.monotonic()
    done = runner.invoke(cli, ["flush", "--wait", "--timeout", "30"])
    assert done.exit_code == 0, done.output
    assert time.monotonic() - started < 20
    assert [r.request_id for r in ledger()] == ["req_wait"]
    assert wal.pending() == 0
    writer.close()
    wal.close()


def test_the_write_ahead_file_compacts_while_an_execution_stays_open(
    no_installation, db_url, sink, monkeypatch, tmp_path
) -> None:
    """Under load some task is always open; the file must still shrink, keeping its lines."""
    import tokenmeter.filewal as filewal

    monkeypatch.setattr(filewal, "COMPACT_BYTES", 4000)
    wal = FileWriteAheadLog(tmp_path / "wal")
    sink.after_flush.append(wal.after_flush)
    previous = set_sink(sink)
    long_task = contextvars.Context()  # a task of its own (another thread, in a worker)
    try:
        long_root, long_token = long_task.run(
            open_scope, "task", "long", task_id="long", task_name="demo.long"
        )
        wal.attach(long_root)
        long_task.run(call, "long-1")
        for i in range(60):
            with usage_scope("task", f"short{i}", task_id=f"short{i}") as short:
                assert short.parent is None
                wal.attach(short)
                call(f"short{i}")
    finally:
        set_sink(previous)
    [path] = (tmp_path / "wal").glob("*.jsonl")
    assert path.stat().st_size < 8000  # the 60 executions written: over 30 kB
    text = path.read_text()
    assert "req_long-1" in text and "req_short0" not in text
    assert json.loads(text.splitlines()[0])["t"] == "fields"  # the names stay on top

    # the process "dies" with the long task open: its calls are recovered, the others not again
    dead = path.with_name(f"{wal.host}-{dead_pid()}-1.jsonl")
    shutil.copy(path, dead)
    assert FileWriteAheadLog(tmp_path / "wal").recover(DatabaseSink(spool=sink.spool)) == 1
    rows = [r.request_id for r in ledger()]
    assert rows.count("req_long-1") == 1 and len(rows) == 61
    [long_row] = [r for r in ledger() if r.request_id == "req_long-1"]
    assert (long_row.task_id, long_row.input_tokens) == ("long", 100)
    long_task.run(close_scope, long_root, long_token)
    wal.close()


def test_a_call_s_line_holds_its_money_and_moment_as_their_text() -> None:
    """A call's line is written from its values as they are (the encoder makes their text):
    byte for byte the line of its JSON values (the money as ``str``, the moment as
    ``isoformat``, which the reader takes), money and moments of every shape, through orjson
    and through the json module's fallback (a lone surrogate)."""
    from datetime import UTC, datetime, timedelta, timezone

    from tokenmeter.context import CallRecord
    from tokenmeter.filewal import _line
    from tokenmeter.sink import CALL_FIELDS, call_values

    def json_values(call: CallRecord) -> list[object]:
        row = list(call_values(call))
        cost_at, created_at = CALL_FIELDS.index("cost_usd"), CALL_FIELDS.index("created_at")
        if row[cost_at] is not None:
            row[cost_at] = str(row[cost_at])
        row[created_at] = row[created_at].isoformat()
        return row

    moments = [
        datetime(2026, 1, 1, tzinfo=UTC),
        datetime(2026, 1, 1, 1, 2, 3, 4, tzinfo=UTC),
        datetime(2026, 1, 1, 1, 2, 3),  # no zone
        datetime(2026, 6, 1, 1, 2, 3, 500_000, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    ]
    costs = [None, Decimal(0), Decimal("0E-10"), Decimal("1.500E-7"), Decimal("12.3456789012")]
    for label in ("demo.scan", "caf\u00e9-\udc80"):
        for at in moments:
            for cost in costs:
                call = CallRecord("chat", task_name=label, cost_usd=cost, latency_ms=1.25)
                call.created_at = at
                line = _line({"e": "x", "t": "c", "path": (0, 2), "v": list(call_values(call))})
                assert line == _line({"e": "x", "t": "c", "path": (0, 2), "v": json_values(call)})
                values = json.loads(line)["v"]
                assert at.isoformat() in values and (cost is None or str(cost) in values)
    with pytest.raises(TypeError):
        _line({"v": [object()]})


def test_compaction_reads_each_lines_execution_as_the_file_holds_it() -> None:
    """Compaction reads a line's execution from its first characters (no parse a line): the
    same answer as parsing it, for every kind of line a file holds, whole or cut by a kill."""
    from tokenmeter.filewal import _execution_of, _line
    from tokenmeter.ids import new_id

    eid = new_id()
    lines = [
        _line({"e": eid, "t": "open", "meta": {"task_id": "t1"}}),
        _line({"e": eid, "t": "c", "path": [0], "v": ["chat", "gpt-4o-mini", "\udc80"]}),
        _line({"e": eid, "t": "call", "call": {"operation": "chat"}}),  # an older version's
        _line({"e": eid, "t": "done"}),
    ]
    for raw in lines:
        line = raw.decode()
        assert _execution_of(line) == json.loads(line)["e"] == eid
    assert _execution_of(_line({"t": "fields", "names": ["operation"]}).decode()) is None
    assert _execution_of('{"t":"c","e":"' + eid + '"}') == eid  # another order: parsed
    assert _execution_of('{"e":"ab\\"cd","t":"done"}') == 'ab"cd'  # an escape: parsed
    assert _execution_of('{"e":"' + eid[:5]) is None  # cut inside the id by a kill
    assert _execution_of("") is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_a_forked_child_never_writes_its_parents_queue(db_url, sink, monkeypatch) -> None:
    writer = BackgroundWriter(sink)
    gate = Gate(sink, monkeypatch)
    writer.submit(FlushBatch(calls=[_record("parent0", 0)], execution_id="e0"))
    assert gate.entered.wait(10)
    writer.submit(FlushBatch(calls=[_record("parent1", 1)], execution_id="e1"))
    assert writer.pending == 2
    pid = os.fork()
    if pid == 0:  # the child: an empty queue, no thread, flush() returns at once
        ok = writer.pending == 0 and writer._thread is None and writer.flush(timeout=1)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    gate.open.set()
    assert writer.flush(timeout=30)
    assert sorted(r.request_id for r in ledger()) == ["req_parent0", "req_parent1"]
    writer.close()


def test_write_ahead_setting_reads_booleans_and_modes(monkeypatch) -> None:
    from tokenmeter.settings import TokenmeterSettings

    for given, mode in [("true", "local"), ("0", "off"), ("redis", "redis"), ("local", "local")]:
        monkeypatch.setenv("TOKENMETER_WRITE_AHEAD", given)
        assert TokenmeterSettings().tokenmeter_write_ahead == mode
    assert TokenmeterSettings().tokenmeter_flush == "background"
    monkeypatch.setenv("TOKENMETER_WRITE_AHEAD", "sometimes")
    with pytest.raises(ValueError, match="local, redis or off"):
        TokenmeterSettings()


def test_one_commit_of_many_batches_counts_a_redelivered_call_once(db_url, sink) -> None:
    """The writer's statement (COPY + INSERT ... SELECT on PostgreSQL): a batch redelivered
    into the same commit, an exact tenth-of-a-nano-dollar cost and an oversized label."""
    batches = [FlushBatch(calls=[_record(f"many{i}", i)], execution_id=f"e{i}") for i in range(300)]
    again = FlushBatch(calls=[_record("many7", 7)], execution_id="e7")
    odd = _record("odd", 999)
    odd.cost_usd = Decimal("0.0000000001")
    odd.scope_ref = "r" * 5000  # a label a user controls, far over its column
    sink.flush_many([*batches, again, FlushBatch(calls=[odd], execution_id="e999")])
    rows = ledger()
    assert len(rows) == 301
    assert [r.request_id for r in rows].count("req_many7") == 1
    [stored] = [r for r in rows if r.request_id == "req_odd"]
    assert stored.cost_usd == Decimal("0.0000000001")
    assert stored.scope_ref is not None and len(stored.scope_ref) == 255
    assert sum((r.cost_usd for r in rows), Decimal(0)) == 300 * COST + Decimal("0.0000000001")
    sink.flush_many(batches)  # the whole commit again: nothing new
    assert len(ledger()) == 301


def _scan_batch(post: str, execution: str) -> FlushBatch:
    rollup = TableRollup(
        AgentScannedPost,
        key={"post_id": post},
        sums={"prompt_tokens": "input_tokens", "completion_tokens": "output_tokens"},
        cost_column="total_cost_usd",
    )
    calls = [
        CallRecord(
            operation="chat",
            requested_model="gpt-4o-mini",
            request_id=f"req_{execution}_{seq}",
            input_tokens=100,
            output_tokens=20,
            cost_usd=COST,
            execution_id=execution,
            seq=seq,
        )
        for seq in range(2)
    ]
    return FlushBatch(
        calls=calls, rollups=[BoundRollup(rollup.to_json(), [0, 1])], execution_id=execution
    )


def _post(post: str) -> AgentScannedPost:
    with session_scope() as s:
        return s.scalars(select(AgentScannedPost).where(AgentScannedPost.post_id == post)).one()


def test_the_same_batch_twice_in_one_commit_adds_its_calls_once(db_url, sink) -> None:
    """A recovery pass that spooled a batch again while the database was down, then a replay
    of both copies in one transaction: the rollup grows by the calls once (found by
    ``make reconcile --faults``: a run's row at 15 times its calls)."""
    with session_scope() as s:
        s.add(AgentScannedPost(post_id="dup", subreddit="crafts"))
    batch = _scan_batch("dup", "e-dup")
    twice = [FlushBatch.from_json(batch.to_json()) for _ in range(2)]
    sink.flush_many(twice)
    post = _post("dup")
    assert (post.prompt_tokens, post.completion_tokens) == (200, 40)
    assert post.total_cost_usd == 2 * COST
    for _ in range(3):
        sink.spool.push(batch.to_json())
    assert sink.replay() == 3  # three copies in one chunk: nothing more
    post = _post("dup")
    assert (post.prompt_tokens, post.completion_tokens) == (200, 40)
    assert len(ledger()) == 2


def test_a_commit_mixing_written_and_new_batches_adds_only_the_new(db_url, sink) -> None:
    """A replay whose chunk holds a batch the ledger already has and one it has not: the
    copy straight into the ledger meets the written calls and is undone, the staged insert
    adds the new batch's calls and applies only its rollup."""
    with session_scope() as s:
        s.add_all(AgentScannedPost(post_id=p, subreddit="crafts") for p in ("old", "new"))
    written, fresh = _scan_batch("old", "e-old"), _scan_batch("new", "e-new")
    sink.flush_many([FlushBatch.from_json(written.to_json())])
    sink.flush_many([FlushBatch.from_json(b.to_json()) for b in (written, fresh)])
    assert sorted(r.execution_id for r in ledger()) == ["e-new", "e-new", "e-old", "e-old"]
    for post in ("old", "new"):
        stored = _post(post)
        assert (stored.prompt_tokens, stored.completion_tokens) == (200, 40)
        assert stored.total_cost_usd == 2 * COST
    assert len(sink.spool) == 0


def test_a_dead_writers_file_is_spooled_once_while_the_database_is_down(db_url, tmp_path) -> None:
    """Recovery passes during an outage: the first spools the dead process's calls and marks
    them done in its file, the next ones find nothing to spool again."""
    spool = FileSpool(tmp_path / "spool")
    down = DatabaseSink(f"sqlite:///{tmp_path / 'missing' / 'x.sqlite'}", spool=spool)
    wal = FileWriteAheadLog(tmp_path / "wal")
    root, token = open_scope("task", "t-dead", task_id="t-dead", task_name="demo.dead")
    try:
        wal.attach(root)
        call("dead-1")
    finally:
        _current.reset(token)
    [path] = (tmp_path / "wal").glob("*.jsonl")
    shutil.move(path, path.with_name(f"{wal.host}-{dead_pid()}-1.jsonl"))
    recovery = FileWriteAheadLog(tmp_path / "wal")
    assert recovery.recover(down) == 1
    assert recovery.recover(down) == 0 and len(spool) == 1
    assert DatabaseSink(spool=spool).replay() == 1
    assert [r.request_id for r in ledger()] == ["req_dead-1"]


def test_a_commit_runs_each_batchs_hooks_once_durable_written_or_spooled(
    db_url, sink, tmp_path
) -> None:
    """The write-ahead file's done lines hang on these hooks: after the writer's commit each
    batch's hooks run with its new calls; with the database down, once it is spooled."""
    seen: list[tuple[str | None, list[str | None]]] = []
    sink.after_flush.append(
        lambda b, new: seen.append((b.execution_id, [c.request_id for c in new]))
    )
    batches = [FlushBatch(calls=[_record(f"hook{i}", i)], execution_id=f"e{i}") for i in range(3)]
    sink.flush_many(batches)
    assert seen == [(f"e{i}", [f"req_hook{i}"]) for i in range(3)]

    seen.clear()
    down = DatabaseSink(
        f"sqlite:///{tmp_path / 'missing' / 'x.sqlite'}", spool=FileSpool(tmp_path / "s2")
    )
    down.after_flush.append(
        lambda b, new: seen.append((b.execution_id, [c.request_id for c in new]))
    )
    down.flush_many([FlushBatch(calls=[_record("down", 7)], execution_id="e7")])
    assert seen == [("e7", [])] and len(down.spool) == 1  # durable in the spool: hooks, no calls
