"""Two applications, two ledgers, one Redis database and one data dir: each ledger holds
exactly its own calls, whoever runs recovery first (write-ahead entries in Redis and in local
files, spooled batches during an outage)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import fakeredis
from sqlalchemy import create_engine, select

import tokenmeter.migrate as ledger_migrations
from tests.helpers import dead_pid
from tokenmeter import OpenAICall
from tokenmeter.context import CallRecord, _current, open_scope, record_call
from tokenmeter.filewal import FileWriteAheadLog
from tokenmeter.identity import ledger_identity, redis_namespace
from tokenmeter.recovery import Recovery
from tokenmeter.sink import DatabaseSink, FlushBatch, default_spool
from tokenmeter.wal import WriteAheadLog, attach_write_ahead

UNREACHABLE = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere?connect_timeout=1"


class App:
    """One application's metering, as a worker builds it (tokenmeter.install)."""

    def __init__(self, url: str, redis: fakeredis.FakeRedis, wal_dir: Path) -> None:
        self.url = url
        self.id = ledger_identity(url)
        namespace = redis_namespace(self.id)
        self.sink = DatabaseSink(
            url, spool=default_spool(redis, self.id, namespace), ledger_id=self.id
        )
        self.wal: WriteAheadLog = attach_write_ahead(self.sink, redis, 0.2, namespace)
        self.files = FileWriteAheadLog(wal_dir, self.id)
        self.sink.after_flush.append(self.files.after_flush)

    def killed_task(self, tag: str) -> None:
        """A task whose process dies after one call: never flushed."""
        root, token = open_scope("task", tag, task_id=tag, task_name="app.task")
        self.wal.attach(root)
        self.files.attach(root)
        record_call(
            CallRecord(
                operation="chat",
                requested_model="gpt-4o-mini",
                request_id=f"req_{tag}",
                input_tokens=10,
                output_tokens=2,
                cost_usd=Decimal("0.0000027"),
            )
        )
        _current.reset(token)
        self.wal.stop()  # its process is gone: no more lease renewals, nothing in memory
        with self.wal._lock:
            self.wal._open.clear()
        self.files._open.clear()

    def spooled_batch(self, tag: str) -> None:
        """A task flushed while this app's database was down: it waits in the spool."""
        call = CallRecord(
            operation="chat",
            requested_model="gpt-4o-mini",
            request_id=f"req_{tag}",
            input_tokens=5,
            output_tokens=1,
            cost_usd=Decimal("0.0000013"),
        )
        call.execution_id, call.seq = f"exec-{tag}", 1
        self.sink.database_url = UNREACHABLE
        assert self.sink.flush(FlushBatch(calls=[call], execution_id=call.execution_id)) is False
        self.sink.database_url = self.url

    def recover(self) -> None:
        Recovery(self.sink, self.wal, self.files).run_once()

    def request_ids(self) -> set[str]:
        engine = create_engine(self.url)
        try:
            with engine.connect() as conn:
                return set(conn.execute(select(OpenAICall.request_id)).scalars())
        finally:
            engine.dispose()


def test_two_ledgers_on_one_redis_and_one_data_dir_never_mix(tmp_path: Path) -> None:
    redis = fakeredis.FakeRedis()
    urls = [f"sqlite:///{tmp_path / name}.sqlite" for name in ("shop", "blog")]
    for url in urls:
        ledger_migrations.upgrade(url)
    shop, blog = (App(url, redis, tmp_path / "wal") for url in urls)
    assert shop.id != blog.id

    shop.killed_task("shop-killed")
    shop.spooled_batch("shop-spooled")
    blog.killed_task("blog-killed")
    shop.files.close()
    blog.files.close()
    # the processes that wrote the local files are gone too
    dead = dead_pid()
    for n, path in enumerate(sorted((tmp_path / "wal").glob("*.jsonl"))):
        path.rename(path.with_name(f"{shop.files.host}-{dead}-{n + 1}.jsonl"))
    for app in (shop, blog):  # each owner's Redis entries: their lease ran out
        for raw in redis.scan_iter(f"tokenmeter:{app.id}:wal:open"):
            for eid, meta in redis.hgetall(raw).items():
                redis.hset(raw, eid, json.dumps({**json.loads(meta), "host": "gone"}))

    import time

    time.sleep(0.3)
    blog.recover()  # the blog's worker recovers first: only its own
    assert blog.request_ids() == {"req_blog-killed"}
    assert list((tmp_path / "wal").glob("*.jsonl"))  # the shop's file is left for the shop
    shop.recover()
    assert shop.request_ids() == {"req_shop-killed", "req_shop-spooled"}
    blog.recover()
    assert blog.request_ids() == {"req_blog-killed"}  # still nothing of the shop's
    assert not list((tmp_path / "wal").glob("*.jsonl"))
    assert all(len(s.sink.spool) == 0 for s in (shop, blog))


def test_a_batch_stamped_by_another_ledger_is_never_written(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shop.sqlite'}"
    ledger_migrations.upgrade(url)
    sink = DatabaseSink(url, spool=default_spool(None, "x"), ledger_id=ledger_identity(url))
    call = CallRecord(operation="chat", request_id="req_foreign", input_tokens=1)
    call.execution_id, call.seq = "exec-foreign", 1
    foreign = FlushBatch(calls=[call], execution_id="exec-foreign", ledger="someone-else")
    sink.spool.push(foreign.to_json())  # say a shared folder holds another ledger's batch
    assert sink.replay() == 0 and len(sink.spool) == 1  # left for its own ledger
    engine = create_engine(url)
    with engine.connect() as conn:
        assert list(conn.execute(select(OpenAICall.request_id)).scalars()) == []
    engine.dispose()


def test_what_a_worker_spooled_before_it_knew_its_ledger_is_recovered(db_url: str) -> None:
    """A worker that started before the ledger was migrated used the provisional name
    (tokenmeter:url-<hash of DATABASE_URL>); once it knows the ledger, it recovers that too."""
    from celery import Celery

    import tokenmeter
    from tokenmeter.identity import fallback_identity
    from tokenmeter.sink import RedisSpool

    redis = fakeredis.FakeRedis()
    provisional = fallback_identity()
    call = CallRecord(operation="chat", request_id="req_early", input_tokens=3)
    call.execution_id, call.seq = "exec-early", 1
    batch = FlushBatch(calls=[call], execution_id="exec-early", ledger=provisional)
    RedisSpool(redis, f"tokenmeter:{provisional}:spool").push(batch.to_json())
    app = Celery("early", broker="memory://")
    tokenmeter.uninstall()  # one installation per process (the fixture puts it back after)
    handle = tokenmeter.install(app, redis_client=redis, recovery_interval_s=0)
    try:
        assert handle.namespace == f"tokenmeter:{ledger_identity()}"
        handle.recover_once()
    finally:
        tokenmeter.uninstall()
    engine = create_engine(db_url)
    with engine.connect() as conn:
        assert list(conn.execute(select(OpenAICall.request_id)).scalars()) == ["req_early"]
    engine.dispose()
    assert redis.llen(f"tokenmeter:{provisional}:spool") == 0
