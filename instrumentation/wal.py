"""Write-ahead log: every captured call reaches Redis as it happens.

A worker killed with SIGKILL mid-task never runs ``task_postrun``, so its scope is never
flushed.  With the write-ahead log on, each call (and each rollup binding) of a task is also
appended to ``tokenmeter:wal:<execution_id>`` the moment it is recorded, and the execution is
listed in the ``tokenmeter:wal:open`` hash with its owner: host, pid, the process's start time
and a lease the owner renews.  A normal flush deletes both.  :meth:`WriteAheadLog.recover`
(worker start and periodically) flushes executions whose owner is gone; writes are idempotent,
so a batch that was in fact flushed before its owner died is not counted twice.

Whose owner is gone:
- on the owner's host, its process is gone, or its pid now names another process (it started
  at another time: a container restarted with the same hostname reuses pids);
- anywhere else (or where a process's start time cannot be read), its lease ran out: the owner
  renews it with every entry and from a heartbeat thread while the task runs, so a long task is
  never taken for dead.

A recovery forgets an execution only if nothing was appended meanwhile; an owner that finds
itself forgotten while it still runs lists itself again with its rollups, so later calls stay
recoverable.  An execution listed with no entries left (its list expired) is dropped quietly.

Cost: one pipelined round trip per call (bench/throughput.py measures it); switch off with
``TOKENMETER_WRITE_AHEAD=false``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

from .context import CallRecord, Rollup, UsageScope, is_interrupt, takes_unpriced
from .procs import pid_alive, process_started
from .sink import BoundRollup, DatabaseSink, FlushBatch, call_from_json, call_to_json

logger = logging.getLogger("tokenmeter.wal")

OPEN_KEY = "tokenmeter:wal:open"
ENTRY_PREFIX = "tokenmeter:wal:"
#: An execution whose lease was not renewed for this long is presumed dead.
DEFAULT_LEASE_S = 120.0
#: Entries outlive a lost ``DEL`` by at most this long.
ENTRY_TTL_S = 7 * 24 * 3600


class WriteAheadLog:
    """Per-execution Redis lists of captured calls, for recovery after a hard crash."""

    def __init__(
        self,
        client: Any,
        lease_s: float = DEFAULT_LEASE_S,
        *,
        host: str | None = None,
        namespace: str = "tokenmeter",
        ledger: str | None = None,
    ) -> None:
        self.client = client
        self.open_key = f"{namespace}:wal:open"
        self.entry_prefix = f"{namespace}:wal:"
        self.ledger = ledger
        self.host = host or socket.gethostname()
        self.lease_s = lease_s
        self._lock = threading.Lock()
        self._open: dict[str, tuple[UsageScope, dict[str, Any]]] = {}  # this process's
        self._heartbeat: threading.Thread | None = None
        self._heartbeat_pid = 0
        self._stop = threading.Event()
        self._recovering: dict[str, int] = {}  # execution -> entries read by recover()
        self._unforgotten: set[str] = set()  # durable, but Redis was down to forget them
        self.unavailable = 0  # entries that could not be logged ahead (Redis unreachable)

    # -- writing (in the task's process) ---------------------------------------------------
    def attach(self, scope: UsageScope) -> None:
        """Start logging ``scope``'s execution (a root scope).  Costs nothing until a call."""
        root = scope.root
        root.listeners.append(self._on_call)
        root.rollup_listeners.append(self._on_rollup)

    def _meta(self, root: UsageScope) -> dict[str, Any]:
        pid = os.getpid()
        return {
            "task_id": root.task_id,
            "task_name": root.task_name,
            "attempt": root.attempt,
            "host": self.host,
            "pid": pid,
            "started": process_started(pid),
            "opened": time.time(),
            "ledger": self.ledger,
        }

    def _push(self, scope: UsageScope, entry: dict[str, Any]) -> None:
        root = scope.root
        eid = root.execution_id
        with self._lock:
            known = self._open.get(eid)
            meta = known[1] if known is not None else self._meta(root)
            self._open[eid] = (root, meta)
        key = self.entry_prefix + eid
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self.open_key, eid, json.dumps({**meta, "renewed": time.time()}))
        pipe.rpush(key, json.dumps(entry, separators=(",", ":")))
        pipe.expire(key, ENTRY_TTL_S)
        length = pipe.execute()[1]
        if length == 1 and known is not None:
            self._reopen(root)  # a recovery forgot this live execution: its rollups again
        self._ensure_heartbeat()

    def _reopen(self, root: UsageScope) -> None:
        logger.warning(
            "write-ahead log of task %s was recovered elsewhere while it ran; listing it again",
            root.task_id,
        )
        key = self.entry_prefix + root.execution_id
        pipe = self.client.pipeline(transaction=False)
        for scope in root.walk():
            for rollup in list(scope.rollups):
                entry = {"t": "rollup", "path": scope.path, "rollup": rollup.to_json()}
                pipe.rpush(key, json.dumps(entry, separators=(",", ":")))
        pipe.execute()

    @takes_unpriced  # recovery prices the calls of its lines as it writes them
    def _on_call(self, scope: UsageScope, call: CallRecord) -> None:
        self._try_push(scope, {"t": "call", "path": scope.path, "call": call_to_json(call)})

    def _on_rollup(self, scope: UsageScope, rollup: Rollup) -> None:
        self._try_push(scope, {"t": "rollup", "path": scope.path, "rollup": rollup.to_json()})

    def _try_push(self, scope: UsageScope, entry: dict[str, Any]) -> None:
        """Log ahead; with Redis unreachable say so in one line (the flush still happens)."""
        try:
            self._push(scope, entry)
        except Exception as exc:
            if is_interrupt(exc):
                raise
            self.unavailable += 1
            logger.warning(
                "write-ahead log unavailable (%s: %s): a %s of task %s is not logged ahead",
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
                entry["t"],
                scope.root.task_id,
            )

    # -- the lease ----------------------------------------------------------------------------
    def _ensure_heartbeat(self) -> None:
        """One renewing thread per process (started again in a forked child)."""
        if self._heartbeat is not None and self._heartbeat_pid == os.getpid():
            return
        with self._lock:
            if self._heartbeat is not None and self._heartbeat_pid == os.getpid():
                return
            self._stop = threading.Event()
            self._heartbeat_pid = os.getpid()
            self._heartbeat = threading.Thread(
                target=self._renew_loop, name="tokenmeter-wal-lease", daemon=True
            )
            self._heartbeat.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                self.renew()
            except Exception:
                logger.warning("could not renew the write-ahead lease", exc_info=True)

    def retry_forgets(self) -> int:
        """Forget the durable executions whose forget failed (Redis was down); how many."""
        done = 0
        for execution_id in list(self._unforgotten):
            self.forget(execution_id)  # raises while Redis is still down: tried again later
            self._unforgotten.discard(execution_id)
            done += 1
        return done

    def renew(self) -> int:
        """Renew the lease of every execution this process has open; returns how many."""
        if self._unforgotten:
            self.retry_forgets()
        now = time.time()
        with self._lock:
            owned = [(eid, meta) for eid, (_, meta) in self._open.items()]
        if owned:
            self.client.hset(
                self.open_key,
                mapping={eid: json.dumps({**meta, "renewed": now}) for eid, meta in owned},
            )
        return len(owned)

    def stop(self) -> None:
        """Stop renewing (worker shutdown; tests simulate a dead owner with it)."""
        self._stop.set()
        thread, self._heartbeat = self._heartbeat, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    # -- forgetting ----------------------------------------------------------------------------
    def forget(self, execution_id: str | None) -> None:
        """The execution is durable elsewhere (database or spool): drop its log."""
        if not execution_id:
            return
        with self._lock:
            self._open.pop(execution_id, None)
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(self.entry_prefix + execution_id)
        pipe.hdel(self.open_key, execution_id)
        pipe.execute()

    def _forget_if_unchanged(self, execution_id: str, entries: int) -> bool:
        """Forget a recovered execution unless its owner appended meanwhile (it is alive)."""
        from redis.exceptions import WatchError

        key = self.entry_prefix + execution_id
        with self.client.pipeline() as pipe:
            try:
                pipe.watch(key)
                if pipe.llen(key) != entries:
                    pipe.unwatch()
                    return False
                pipe.multi()
                pipe.delete(key)
                pipe.hdel(self.open_key, execution_id)
                pipe.execute()
                return True
            except WatchError:
                return False

    def after_flush(self, batch: FlushBatch, _new_calls: list[CallRecord]) -> None:
        """Sink hook: forget the execution once its batch is durable (if it logged anything)."""
        if not (batch.calls or batch.rollups) or not batch.execution_id:
            return
        entries = self._recovering.pop(batch.execution_id, None)
        if entries is None:
            try:
                self.forget(batch.execution_id)
            except Exception as exc:
                if is_interrupt(exc):
                    raise
                # kept to forget later: listed by a live owner, nobody else would drop it
                self._unforgotten.add(batch.execution_id)
                logger.warning("could not forget task %s's write-ahead log yet", batch.task_id)
        elif not self._forget_if_unchanged(batch.execution_id, entries):
            logger.warning(
                "task %s appended to its write-ahead log while it was recovered: kept",
                batch.task_id,
            )

    # -- recovery (any process) ------------------------------------------------------------
    def batch_for(self, execution_id: str, meta: dict[str, Any]) -> FlushBatch:
        """Rebuild the flush batch of ``execution_id`` from its log entries."""
        return self._batch(execution_id, meta, self._entries(execution_id))

    def _entries(self, execution_id: str) -> list[Any]:
        return list(self.client.lrange(self.entry_prefix + execution_id, 0, -1))

    @staticmethod
    def _batch(execution_id: str, meta: dict[str, Any], raw: list[Any]) -> FlushBatch:
        calls: dict[int, tuple[tuple[int, ...], CallRecord]] = {}
        rollups: dict[str, tuple[tuple[int, ...], dict[str, Any]]] = {}
        for item in raw:
            entry = json.loads(item)
            path = tuple(entry["path"])
            if entry["t"] == "call":
                call = call_from_json(entry["call"])
                calls[call.seq] = (path, call)
            elif entry["t"] == "rollup":  # listed again by a reopened owner: once
                rollups[json.dumps([path, entry["rollup"]], sort_keys=True)] = (
                    path,
                    entry["rollup"],
                )
        bound = [
            BoundRollup(spec, [c.seq for p, c in calls.values() if p[: len(path)] == path])
            for path, spec in rollups.values()
        ]
        return FlushBatch(
            calls=[c for _, c in sorted(calls.values(), key=lambda pc: pc[1].seq)],
            rollups=bound,
            execution_id=execution_id,
            task_id=meta.get("task_id"),
            task_name=meta.get("task_name"),
            attempt=meta.get("attempt") or 0,
            state="LOST",
        )

    def is_orphan(self, meta: dict[str, Any], now: float | None = None) -> bool:
        """Is the owner of this execution gone?  (see the module's docstring)"""
        lease_over = (now or time.time()) - float(
            meta.get("renewed", meta.get("opened", 0))
        ) > self.lease_s
        if meta.get("host") != self.host:
            return lease_over
        pid = int(meta.get("pid", 0))
        if not pid_alive(pid):
            return True
        started, now_started = meta.get("started"), process_started(pid)
        if started is not None and now_started is not None:
            return int(started) != now_started  # the pid names another process now
        return lease_over

    def recover(self, sink: DatabaseSink) -> int:
        """Flush every orphaned execution; returns how many were recovered."""
        recovered = 0
        self.retry_forgets()
        for raw_id, raw_meta in self.client.hgetall(self.open_key).items():
            execution_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            meta = json.loads(raw_meta)
            if not self.is_orphan(meta):
                continue
            raw = self._entries(execution_id)
            batch = self._batch(execution_id, meta, raw)
            batch.ledger = meta.get("ledger")
            if not sink.accepts(batch):  # another ledger's (a shared namespace): not ours
                continue
            if not (batch.calls or batch.rollups):  # its entries expired or never came
                self._forget_if_unchanged(execution_id, 0)
                continue
            logger.warning(
                "recovering %d calls of task %s (%s) whose worker process %s:%s is gone",
                len(batch.calls),
                meta.get("task_id"),
                meta.get("task_name"),
                meta.get("host"),
                meta.get("pid"),
            )
            self._recovering[execution_id] = len(raw)
            try:
                if sink.flush(batch):  # the sink's after_flush hook forgets it
                    recovered += 1
            finally:
                self._recovering.pop(execution_id, None)
        return recovered


def attach_write_ahead(
    sink: DatabaseSink,
    client: Any,
    lease_s: float = DEFAULT_LEASE_S,
    namespace: str = "tokenmeter",
) -> WriteAheadLog:
    """A write-ahead log on ``client`` that ``sink`` forgets once a batch is durable."""
    wal = WriteAheadLog(client, lease_s, namespace=namespace, ledger=sink.ledger_id)
    sink.after_flush.append(wal.after_flush)
    return wal
