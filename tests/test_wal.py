"""Write-ahead liveness: who is dead, who is only slow, and nothing lost in between.

Two logs on one Redis stand for two worker hosts: ``owner`` runs the task, ``other`` recovers.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from decimal import Decimal

import fakeredis
import pytest
from sqlalchemy import func, select

from models import AgentScannedPost, session_scope
from tests.helpers import chat_call, dead_pid, wait_for
from tokenmeter import OpenAICall
from tokenmeter.context import CallRecord, _current, open_scope, usage_scope
from tokenmeter.procs import process_started
from tokenmeter.rollups import TableRollup
from tokenmeter.sink import DatabaseSink, FileSpool, FlushBatch
from tokenmeter.wal import ENTRY_PREFIX, OPEN_KEY, WriteAheadLog


@pytest.fixture
def redis() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture
def owner(redis) -> Iterator[WriteAheadLog]:
    wal = WriteAheadLog(redis, lease_s=0.4, host="host-a")
    yield wal
    wal.stop()


@pytest.fixture
def sink(db_url: str, tmp_path) -> DatabaseSink:
    return DatabaseSink(spool=FileSpool(tmp_path / "spool"))


def other(redis, sink: DatabaseSink, lease_s: float = 0.4) -> WriteAheadLog:
    wal = WriteAheadLog(redis, lease_s=lease_s, host="host-b")
    sink.after_flush.append(wal.after_flush)
    return wal


def call(tag: str, n_in: int = 100) -> CallRecord:
    return chat_call(tag, n_in, 10, Decimal("0.00001"))


def post_rollup() -> TableRollup:
    return TableRollup(
        AgentScannedPost,
        key={"post_id": "p1"},
        sums={"prompt_tokens": "input_tokens"},
        cost_column="total_cost_usd",
        values={"subreddit": "crafts", "agent_model": "m"},
    )


def start_task(wal: WriteAheadLog, name: str):
    root, token = open_scope("task", name, task_id=name, task_name="demo.long")
    wal.attach(root)
    return root, token


def ledger_count() -> int:
    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(OpenAICall)) or 0


def test_a_long_task_renews_its_lease_and_is_never_taken_for_dead(redis, owner, sink) -> None:
    root, token = start_task(owner, "t-long")
    try:
        call("a")
        recoverer = other(redis, sink)
        deadline = time.monotonic() + 1.6  # four leases without a call
        while time.monotonic() < deadline:
            assert recoverer.recover(sink) == 0
            time.sleep(0.1)
        assert ledger_count() == 0
        owner.stop()  # the owner's host dies: nobody renews any more
        wait_for(lambda: recoverer.recover(sink) == 1, 5, "the lease to run out")
        assert ledger_count() == 1 and not redis.hexists(OPEN_KEY, root.execution_id)
    finally:
        _current.reset(token)


def test_a_reused_pid_on_the_same_host_is_not_the_owner(redis, sink, db_url) -> None:
    wal = WriteAheadLog(redis, lease_s=3600)
    root, token = start_task(wal, "t-restarted")
    call("r")
    _current.reset(token)
    wal.stop()
    meta = json.loads(redis.hget(OPEN_KEY, root.execution_id))
    assert meta["pid"] == os.getpid() and meta["started"] == process_started(os.getpid())
    assert wal.recover(sink) == 0  # the owner is alive: left alone
    # after a container restart this pid names another process, started at another time
    meta["started"] = meta["started"] - 1000
    redis.hset(OPEN_KEY, root.execution_id, json.dumps(meta))
    assert wal.recover(sink) == 1 and ledger_count() == 1


def test_recovery_never_forgets_what_a_live_owner_appended_meanwhile(
    redis, owner, sink, db_url
) -> None:
    root, token = start_task(owner, "t-busy")
    call("one")
    owner.stop()  # its lease will run out while it still works (a long pause)
    time.sleep(0.5)
    recoverer = other(redis, sink)
    flush = sink.flush

    def flush_while_the_owner_appends(batch):
        call("two")  # the owner is not dead after all
        return flush(batch)

    sink.flush = flush_while_the_owner_appends  # type: ignore[method-assign]
    assert recoverer.recover(sink) == 1
    sink.flush = flush  # type: ignore[method-assign]
    assert redis.llen(ENTRY_PREFIX + root.execution_id) == 2  # kept: it grew meanwhile
    _current.reset(token)  # then the owner really dies
    owner.stop()
    time.sleep(0.5)
    assert recoverer.recover(sink) == 1
    with session_scope() as s:
        ids = sorted(s.scalars(select(OpenAICall.request_id)))
    assert ids == ["req_one", "req_two"]  # each once


def test_an_owner_forgotten_while_alive_lists_itself_again_with_its_rollups(
    redis, owner, sink, db_url
) -> None:
    root, token = start_task(owner, "t-forgotten")
    with usage_scope("scanned_post", "p1") as post:
        post.bind_rollup(post_rollup())
        call("before", 300)
        owner.stop()
        time.sleep(0.5)
        recoverer = other(redis, sink)
        assert recoverer.recover(sink) == 1  # taken for dead, flushed, forgotten
        assert not redis.exists(ENTRY_PREFIX + root.execution_id)
        call("after", 40)  # it was alive: listed again, with its rollup
    _current.reset(token)  # then it really dies
    owner.stop()
    time.sleep(0.5)
    assert recoverer.recover(sink) == 1
    with session_scope() as s:
        row = s.scalars(select(AgentScannedPost)).one()
    assert row.prompt_tokens == 340 and ledger_count() == 2


def test_an_execution_whose_entries_expired_is_dropped_quietly(redis, sink, caplog) -> None:
    redis.hset(OPEN_KEY, "e-expired", json.dumps({"host": "gone", "pid": 1, "opened": 0}))
    recoverer = other(redis, sink)
    assert recoverer.recover(sink) == 0
    assert not redis.hexists(OPEN_KEY, "e-expired")
    assert recoverer.recover(sink) == 0
    assert "recovering" not in caplog.text


# -- the local write-ahead file: no broker needed -------------------------------------------------
def test_a_dead_writers_file_is_recovered_once_and_removed(tmp_path, sink, db_url) -> None:
    from tokenmeter.filewal import FileWriteAheadLog

    log = FileWriteAheadLog(tmp_path / "wal")
    root, token = open_scope("task", "t-file", task_id="t-file", task_name="demo.file")
    log.attach(root)
    with usage_scope("scanned_post", "p1") as post:
        post.bind_rollup(post_rollup())
        call("f1", 300)
        call("f2", 40)
    _current.reset(token)  # the process "dies" here: never closed, never flushed
    done_root, done_token = open_scope("task", "t-done", task_id="t-done")
    log.attach(done_root)
    call("flushed")
    _current.reset(done_token)
    log.after_flush(FlushBatch.from_scope(done_root), [])  # this one reached the database
    log.close()
    [written] = list((tmp_path / "wal").glob("*.jsonl"))
    with written.open("a") as fh:
        fh.write('{"e": "cut-by-the-kil')  # the line being written when the process died
    assert log.recover(sink) == 0  # its writer (this process) is alive: left alone
    dead = written.with_name(f"{log.host}-{dead_pid()}-12345.jsonl")
    written.rename(dead)
    assert log.recover(sink) == 1 and not dead.exists()
    assert log.recover(sink) == 0
    with session_scope() as s:
        ids = sorted(s.scalars(select(OpenAICall.request_id)))
        post_row = s.scalars(select(AgentScannedPost)).one()
    assert ids == ["req_f1", "req_f2"]  # the flushed execution is not written again
    assert post_row.prompt_tokens == 340


def test_a_file_an_earlier_version_wrote_is_recovered(tmp_path, sink, db_url, caplog) -> None:
    """Files without the field names on top, each call a JSON object (before 2026-12-02),
    beside one of this version's: a worker upgraded in place recovers both, exactly."""
    from tokenmeter.filewal import FileWriteAheadLog
    from tokenmeter.sink import call_to_json

    old = call("old-format", 321)
    old.execution_id, old.seq, old.task_id, old.scope_kind = "e-old", 1, "t-old", "task"
    old.cost_usd = Decimal("0.0000481500")
    lines = [
        {"e": "e-old", "t": "open", "meta": {"task_id": "t-old", "task_name": "demo.old"}},
        {"e": "e-old", "t": "call", "path": [0], "call": call_to_json(old)},
    ]
    directory = tmp_path / "wal"
    directory.mkdir()
    log = FileWriteAheadLog(directory)
    earlier = directory / f"{log.host}-{dead_pid()}-111.jsonl"
    earlier.write_text("".join(json.dumps(line) + "\n" for line in lines))
    root, token = open_scope("task", "t-new", task_id="t-new", task_name="demo.new")
    log.attach(root)
    call("new-format", 123)
    _current.reset(token)  # never closed: the process "dies"
    log.close()
    [mine] = [p for p in directory.glob("*.jsonl") if p != earlier]
    assert json.loads(mine.read_text().splitlines()[0])["t"] == "fields"
    mine.rename(directory / f"{log.host}-{dead_pid()}-222.jsonl")
    assert log.recover(sink) == 2
    with session_scope() as s:
        rows = {r.request_id: r for r in s.scalars(select(OpenAICall))}
    assert set(rows) == {"req_old-format", "req_new-format"}
    assert (rows["req_old-format"].input_tokens, rows["req_old-format"].task_id) == (321, "t-old")
    assert rows["req_old-format"].cost_usd == Decimal("0.0000481500")
    assert (rows["req_new-format"].input_tokens, rows["req_new-format"].task_id) == (123, "t-new")
    assert "before the field names" not in caplog.text
    assert not list(directory.glob("*.jsonl"))


def test_a_forget_that_fails_while_redis_is_down_is_retried(
    redis, owner, sink, monkeypatch
) -> None:
    """A live owner's execution, durable in the ledger, must not stay listed forever because
    Redis was down the moment it was to be forgotten (nobody else would ever drop it)."""
    sink.after_flush.append(owner.after_flush)
    root, token = start_task(owner, "t-forget")
    call("f")
    _current.reset(token)
    real_forget = owner.forget

    def down(execution_id):
        raise ConnectionError("Redis is down")

    monkeypatch.setattr(owner, "forget", down)
    assert sink.flush(FlushBatch.from_scope(root))  # in the ledger; the forget failed
    assert ledger_count() == 1 and redis.hexists(OPEN_KEY, root.execution_id)
    monkeypatch.setattr(owner, "forget", real_forget)
    owner.renew()  # Redis is back: the next renewal (or recovery pass) forgets it
    assert not redis.hexists(OPEN_KEY, root.execution_id)
    assert not redis.exists(owner.entry_prefix + root.execution_id)


def test_a_label_orjson_refuses_is_still_written_ahead(tmp_path) -> None:
    """The file's lines are orjson's; a lone surrogate in a label (which orjson refuses) takes
    the json module's path: every line is there, and reads back as the values written."""
    from tokenmeter.filewal import FileWriteAheadLog
    from tokenmeter.sink import CALL_FIELDS

    log = FileWriteAheadLog(tmp_path / "wal")
    name = "demo.caf\u00e9-\ud800"  # non-ASCII, and a surrogate no UTF-8 can carry
    root, token = open_scope("task", "t-odd", task_id="t-odd", task_name=name)
    log.attach(root)
    with usage_scope("scanned_post", "p\u00e9-\udfff"):
        call("odd", 77)
    call("plain", 5)
    _current.reset(token)
    log.close()
    [path] = list((tmp_path / "wal").glob("*.jsonl"))
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert log.unavailable == 0
    assert [entry["t"] for entry in lines] == ["fields", "open", "c", "c"]
    assert lines[0]["names"] == list(CALL_FIELDS)
    assert lines[1]["meta"]["task_name"] == name
    odd, plain = (dict(zip(CALL_FIELDS, entry["v"], strict=True)) for entry in lines[2:])
    assert (odd["request_id"], odd["input_tokens"], odd["scope_ref"]) == (
        "req_odd",
        77,
        "p\u00e9-\udfff",
    )
    assert (plain["request_id"], plain["task_name"]) == ("req_plain", name)
