"""The ledger writer: closed scopes reach the database from a thread, many tasks per commit.

A task's end pays for one local append (the write-ahead file's ``closed`` line) and a place in
an in-memory queue; a daemon thread of the same process takes everything queued, writes it in
one transaction (one multi-row insert of the calls, then each batch's rollups) and marks each
batch done in the write-ahead file.  While it writes, the next tasks' batches queue up, so the
busier the worker, the bigger each commit: group commit, with no delay added when idle.

Nothing is lost in between: every call of a queued batch is already in the process's
write-ahead file, which recovery replays if the process dies before the commit (SIGKILL, OOM);
a database that is down sends the batches to the spool, as the inline flush did.  Writes are
idempotent, so a batch written by both the writer and a recovery counts once.

:meth:`BackgroundWriter.flush` waits until everything queued so far is durable (in the
ledger or the spool); ``tokenmeter.flush()`` calls it for the active installation, and the
worker drains the queue at process shutdown.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sink import DatabaseSink, FlushBatch

logger = logging.getLogger("tokenmeter.writer")

#: At most this many calls go into one transaction (a backlog is written in several).
MAX_CALLS_PER_COMMIT = 5000

_writers: weakref.WeakSet[BackgroundWriter] = weakref.WeakSet()


class BackgroundWriter:
    """A queue of closed batches and the thread that writes them (one per process)."""

    def __init__(
        self,
        sink: DatabaseSink,
        on_queued: list[Callable[[FlushBatch], None]] | None = None,
        on_committed: list[Callable[[], None]] | None = None,
        max_calls: int = MAX_CALLS_PER_COMMIT,
        linger_s: float = 0.0,
    ) -> None:
        self.sink = sink
        self.on_queued = list(on_queued or [])
        self.on_committed = list(on_committed or [])  # after each commit (or spooling)
        self.max_calls = max_calls
        #: After the first batch arrives, wait this long for more before committing (fewer,
        #: bigger commits: the task-end-to-row latency is at most this plus one commit).
        self.linger_s = linger_s
        self._reset()
        _writers.add(self)

    def _reset(self) -> None:
        """Fresh state: at creation, and in a forked child (the parent's queue is its own)."""
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[FlushBatch] = deque()
        self._queued = 0  # batches ever queued in this process
        self._done = 0  # ... of which durable (database or spool)
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._closed = False
        self._hurry = False  # flush() asked: commit now, do not linger
        self._queued_calls = 0
        self.commits = 0  # transactions written (for the benchmarks)

    # -- the task's side ---------------------------------------------------------------------
    def submit(self, batch: FlushBatch) -> None:
        """Queue ``batch`` (after the ``on_queued`` hooks: its durable local mark)."""
        for hook in self.on_queued:
            hook(batch)
        if self._pid != os.getpid():
            self._reset()
        with self._cond:
            if self._closed:  # shutting down: write it here and now
                closed = True
            else:
                closed = False
                self._queue.append(batch)
                self._queued += 1
                self._queued_calls += len(batch.calls)
                if self._thread is None:
                    self._start()
                # wake the writer only when it waits for a first batch or the commit is full:
                # while it lingers, waking it for each task would only cost the task the GIL
                if len(self._queue) == 1 or self._queued_calls >= self.max_calls:
                    self._cond.notify_all()
        if closed:
            self.sink.flush(batch)
            self._committed()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tokenmeter-writer", daemon=True)
        self._thread.start()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every batch queued before this call is durable.  False on timeout."""
        if self._pid != os.getpid():
            return True  # a forked child's view: the parent's queue is not ours
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._queued
            if self._done < target:
                self._hurry = True
                self._cond.notify_all()
            while self._done < target:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    @property
    def pending(self) -> int:
        """Batches queued and not yet durable."""
        return self._queued - self._done

    def close(self, timeout: float | None = 10.0) -> bool:
        """Write what is queued and stop the thread; later batches are written inline.
        False when the queue did not drain in ``timeout`` (the write-ahead file keeps it)."""
        drained = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=1 if not drained else timeout)
        return drained

    # -- the writer's side ---------------------------------------------------------------------
    def _take(self) -> list[FlushBatch]:
        """Everything queued, up to ``max_calls`` calls (at least one batch)."""
        taken: list[FlushBatch] = []
        calls = 0
        while self._queue and (not taken or calls + len(self._queue[0].calls) <= self.max_calls):
            batch = self._queue.popleft()
            taken.append(batch)
            calls += len(batch.calls)
        self._queued_calls -= calls
        if not self._queue:
            self._hurry = False
        return taken

    def _linger(self) -> None:
        """Wait (holding the condition) for more batches, up to ``linger_s``."""
        deadline = time.monotonic() + self.linger_s
        while not (self._closed or self._hurry or self._queued_calls >= self.max_calls):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                if self.linger_s > 0:
                    self._linger()
                taken = self._take()
            try:
                self.sink.flush_many(taken)
            except Exception:  # flush_many spools what it cannot write; this is a bug
                logger.exception("the ledger writer failed on %d batches", len(taken))
                for batch in taken:  # one by one: each is written or spooled
                    self.sink.flush(batch)
            finally:
                self._committed()
                with self._cond:
                    self._done += len(taken)
                    self.commits += 1
                    self._cond.notify_all()

    def _committed(self) -> None:
        for hook in self.on_committed:
            try:
                hook()
            except Exception:
                logger.exception("an after-commit hook failed")


def flush_all(timeout: float | None = None) -> bool:
    """Wait for every writer of this process; False if one did not drain in ``timeout``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    ok = True
    for writer in list(_writers):
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ok = writer.flush(left) and ok
    return ok


def _after_fork_in_child() -> None:
    for writer in list(_writers):
        writer._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)
