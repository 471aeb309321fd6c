"""Write-ahead log: every captured call reaches Redis as it happens.

A worker killed with SIGKILL mid-task never runs ``task_postrun``, so its scope is never
flushed.  With the write-ahead log on, each call (and each rollup binding) of a task is also
appended to ``tokenmeter:wal:<execution_id>`` the moment it is recorded, and the execution is
listed in the ``tokenmeter:wal:open`` hash with its owner (host and pid).  A normal flush deletes
both.  :meth:`WriteAheadLog.recover` (run at worker start and periodically) finds executions
whose owner process is gone, rebuilds their batch and flushes it; writes are idempotent, so a
batch that was in fact flushed before its owner died is not counted twice.

Cost: one ``RPUSH`` per call (bench/throughput.py measures it); switch off with
``TOKENMETER_WRITE_AHEAD=false``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

from .context import CallRecord, Rollup, UsageScope
from .sink import BoundRollup, DatabaseSink, FlushBatch, call_from_json, call_to_json

logger = logging.getLogger("tokenmeter.wal")

OPEN_KEY = "tokenmeter:wal:open"
ENTRY_PREFIX = "tokenmeter:wal:"
#: An execution owned by another host is presumed dead after this long without news.
DEFAULT_FOREIGN_LEASE_S = 6 * 3600
#: Entries outlive a lost ``DEL`` by at most this long.
ENTRY_TTL_S = 7 * 24 * 3600


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WriteAheadLog:
    """Per-execution Redis lists of captured calls, for recovery after a hard crash."""

    def __init__(self, client: Any, foreign_lease_s: float = DEFAULT_FOREIGN_LEASE_S) -> None:
        self.client = client
        self.host = socket.gethostname()
        self.foreign_lease_s = foreign_lease_s

    # -- writing (in the task's process) ---------------------------------------------------
    def attach(self, scope: UsageScope) -> None:
        """Start logging ``scope``'s execution (a root scope).  Costs nothing until a call."""
        root = scope.root
        root.listeners.append(self._on_call)
        root.rollup_listeners.append(self._on_rollup)

    def _push(self, scope: UsageScope, entry: dict[str, Any]) -> None:
        root = scope.root
        key = ENTRY_PREFIX + root.execution_id
        pipe = self.client.pipeline(transaction=False)
        if not root.labels.get("_wal_open"):  # first entry: list the execution as open
            meta = {
                "task_id": root.task_id,
                "task_name": root.task_name,
                "attempt": root.attempt,
                "host": self.host,
                "pid": os.getpid(),
                "opened": time.time(),
            }
            pipe.hset(OPEN_KEY, root.execution_id, json.dumps(meta))
        pipe.rpush(key, json.dumps(entry, separators=(",", ":")))
        pipe.expire(key, ENTRY_TTL_S)
        pipe.execute()
        root.labels["_wal_open"] = "1"

    def _on_call(self, scope: UsageScope, call: CallRecord) -> None:
        self._push(scope, {"t": "call", "path": scope.path, "call": call_to_json(call)})

    def _on_rollup(self, scope: UsageScope, rollup: Rollup) -> None:
        self._push(scope, {"t": "rollup", "path": scope.path, "rollup": rollup.to_json()})

    def forget(self, execution_id: str | None) -> None:
        """The execution is durable elsewhere (database or spool): drop its log."""
        if not execution_id:
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(ENTRY_PREFIX + execution_id)
        pipe.hdel(OPEN_KEY, execution_id)
        pipe.execute()

    def after_flush(self, batch: FlushBatch, _new_calls: list[CallRecord]) -> None:
        """Sink hook: forget the execution once its batch is durable (if it logged anything)."""
        if batch.calls or batch.rollups:
            self.forget(batch.execution_id)

    # -- recovery (any process) ------------------------------------------------------------
    def batch_for(self, execution_id: str, meta: dict[str, Any]) -> FlushBatch:
        """Rebuild the flush batch of ``execution_id`` from its log entries."""
        raw = self.client.lrange(ENTRY_PREFIX + execution_id, 0, -1)
        calls: list[tuple[tuple[int, ...], CallRecord]] = []
        rollups: list[tuple[tuple[int, ...], dict[str, Any]]] = []
        for item in raw:
            entry = json.loads(item)
            path = tuple(entry["path"])
            if entry["t"] == "call":
                calls.append((path, call_from_json(entry["call"])))
            elif entry["t"] == "rollup":
                rollups.append((path, entry["rollup"]))
        bound = [
            BoundRollup(spec, [c.seq for p, c in calls if p[: len(path)] == path])
            for path, spec in rollups
        ]
        return FlushBatch(
            calls=[c for _, c in calls],
            rollups=bound,
            execution_id=execution_id,
            task_id=meta.get("task_id"),
            task_name=meta.get("task_name"),
            attempt=meta.get("attempt") or 0,
            state="LOST",
        )

    def is_orphan(self, meta: dict[str, Any], now: float | None = None) -> bool:
        if meta.get("host") == self.host:
            return not _pid_alive(int(meta.get("pid", 0)))
        return (now or time.time()) - float(meta.get("opened", 0)) > self.foreign_lease_s

    def recover(self, sink: DatabaseSink) -> int:
        """Flush every orphaned execution; returns how many were recovered."""
        recovered = 0
        for raw_id, raw_meta in self.client.hgetall(OPEN_KEY).items():
            execution_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            meta = json.loads(raw_meta)
            if not self.is_orphan(meta):
                continue
            batch = self.batch_for(execution_id, meta)
            logger.warning(
                "recovering %d calls of task %s (%s) whose worker process %s:%s died",
                len(batch.calls),
                meta.get("task_id"),
                meta.get("task_name"),
                meta.get("host"),
                meta.get("pid"),
            )
            if sink.flush(batch):  # the sink's after_flush hook forgets it
                recovered += 1
            elif not len(batch.calls):
                self.forget(execution_id)
        return recovered


def attach_write_ahead(sink: DatabaseSink, client: Any) -> WriteAheadLog:
    """A write-ahead log on ``client`` that ``sink`` forgets once a batch is durable."""
    wal = WriteAheadLog(client)
    sink.after_flush.append(wal.after_flush)
    return wal
