"""A write-ahead log that needs no broker: one append-only file per worker process.

Each captured call (and rollup binding) of a task is appended to the process's own file in
``$TOKENMETER_DATA_DIR/wal/`` before the call returns to the caller: a JSON line, the call as
its values in the order the file's first line names (files of earlier versions, each call an
object of named fields, are read too).  The bytes are handed to
the operating system at once, so they survive the death of the process (SIGKILL, the OOM
killer); the host's loss needs the Redis log as well.  When the execution is flushed (to the
database or the spool) a ``done`` line follows.  The file is named by host, pid and the
process's start time, so any process of the host can tell a dead writer from a live one, even
after pid reuse.

Recovery (the worker's main process at start, as soon as a child is lost, periodically and at
shutdown; ``tokenmeter`` itself in any process) flushes every execution of a dead writer's file
that has no ``done`` line, then removes the file.  Writes are idempotent, so an execution
flushed before its writer died is not counted twice.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from .context import CallRecord, Rollup, UsageScope, is_interrupt, takes_unpriced
from .procs import pid_alive, process_started
from .sink import CALL_FIELDS, DatabaseSink, FlushBatch, call_values
from .wal import WriteAheadLog

logger = logging.getLogger("tokenmeter.wal")


def _text(value: Any) -> str:
    """A call's value JSON has no type for, as its text: a ``Decimal`` (money) as ``str``
    gives it, a moment as ``isoformat`` does (orjson writes a ``datetime`` so itself)."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


#: The fallback encoder (``json.dumps`` with options builds a new one each call).
_json_line = json.JSONEncoder(separators=(",", ":"), default=_text).encode


def _line(entry: dict[str, Any]) -> bytes:
    """``entry`` as one line of the file: orjson (a tenth of the json module's time, the
    same compact JSON), or the json module for what orjson refuses (a lone surrogate in a
    label the user set): a value never makes a call unwritable.  A call's money and moment
    are written as their text (:func:`_text`): ``str`` and ``isoformat``, as the reader
    (``sink.call_from_json``) takes them."""
    try:
        return orjson.dumps(entry, default=_text, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return (_json_line(entry) + "\n").encode()  # ASCII: non-ASCII is escaped


#: This process's id, kept by a fork hook (``os.getpid()`` is a system call each time).
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)

#: A file with no open execution is emptied once it grows past this.
COMPACT_BYTES = 1 << 20
#: The first line of every file: the names of a call line's values (``"t":"c"``, ``"v"``).
#: Older files have none and carry each call as a JSON object (``"t":"call"``): read alike.
_FIELDS_LINE = _line({"t": "fields", "names": list(CALL_FIELDS)})


_PREFIX = '{"e":"'


def _execution_of(line: str) -> str | None:
    """The execution a line belongs to (lines are ``{"e":"<id>",...}``): read from the line's
    first characters, which is what every line this module writes starts with (ids are
    ``new_id()``'s, with no quote or backslash in them), so that compacting a file costs a
    string search a line instead of parsing it; any other line is parsed."""
    if line.startswith(_PREFIX):
        end = line.find('"', 6)
        if end > 6 and "\\" not in line[6:end]:
            return line[6:end]
    try:
        found = json.loads(line).get("e")
        return found if isinstance(found, str) else None
    except ValueError:
        return None  # a line cut by a kill


class FileWriteAheadLog:
    """Per-process append-only files of captured calls, for recovery after a crash."""

    def __init__(self, directory: Path, ledger: str | None = None) -> None:
        self.directory = Path(directory)
        self.ledger = ledger  # stamped on each execution: a shared folder never mixes ledgers
        self.host = socket.gethostname()
        self._lock = threading.Lock()
        self._pid = 0
        self._fd: int | None = None
        self._path: Path | None = None
        self._open: set[str] = set()  # executions of this process not yet done
        self._done: list[bytes] = []  # ``done`` lines held for the end of the writer's commit
        #: Set when a background writer calls :meth:`committed` after each commit: the done
        #: lines of a commit are then written together (they only spare recovery some work,
        #: so they need not reach the OS one by one).
        self.defer_done = False
        self.unavailable = 0

    # -- writing (in the task's process) ---------------------------------------------------
    def attach(self, scope: UsageScope) -> None:
        root = scope.root
        root.listeners.append(self._on_call)
        root.rollup_listeners.append(self._on_rollup)

    def _name(self, pid: int) -> str:
        return f"{self.host}-{pid}-{process_started(pid) or 0}.jsonl"

    def _handle(self) -> int:
        pid = _pid
        if self._fd is None or self._pid != pid:  # a forked child opens a file of its own
            self.directory.mkdir(parents=True, exist_ok=True)
            self._path = self.directory / self._name(pid)
            self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._pid, self._open, self._done = pid, set(), []
            if os.fstat(self._fd).st_size == 0:
                os.write(self._fd, _FIELDS_LINE)
        return self._fd

    def _write(self, *entries: dict[str, Any]) -> None:
        """Append ``entries`` in one write(2): in the OS once this returns (it outlives this
        process), with no buffer of Python's in between."""
        data = _line(entries[0]) if len(entries) == 1 else b"".join(map(_line, entries))
        with self._lock:
            os.write(self._handle(), data)

    def _append(self, scope: UsageScope, entry: dict[str, Any]) -> None:
        root = scope.root
        eid = root.execution_id
        try:
            if eid not in self._open or self._pid != _pid:
                meta = {
                    "task_id": root.task_id,
                    "task_name": root.task_name,
                    "attempt": root.attempt,
                    "ledger": self.ledger,
                }
                self._write({"e": eid, "t": "open", "meta": meta}, {"e": eid, **entry})
                self._open.add(eid)
            else:
                self._write({"e": eid, **entry})
        except Exception as exc:
            if is_interrupt(exc):
                raise
            self.unavailable += 1
            logger.warning("local write-ahead log unavailable (%s: %s)", type(exc).__name__, exc)

    @takes_unpriced  # recovery prices the calls of its lines as it writes them
    def _on_call(self, scope: UsageScope, call: CallRecord) -> None:
        # the values as they are: the encoder makes their text (a third of the time of making
        # it first)
        self._append(scope, {"t": "c", "path": scope.path, "v": list(call_values(call))})

    def _on_rollup(self, scope: UsageScope, rollup: Rollup) -> None:
        self._append(scope, {"t": "rollup", "path": scope.path, "rollup": rollup.to_json()})

    def closed(self, batch: FlushBatch) -> None:
        """Writer hook: the task ended and its batch is queued (``tokenmeter flush --wait``
        waits for the ``done`` that follows)."""
        eid = batch.execution_id
        if not eid or eid not in self._open or self._pid != _pid:
            return
        try:
            self._write({"e": eid, "t": "closed"})
        except Exception as exc:
            if is_interrupt(exc):
                raise
            logger.warning("local write-ahead log unavailable (%s: %s)", type(exc).__name__, exc)

    def after_flush(self, batch: FlushBatch, _new_calls: list[CallRecord]) -> None:
        """Sink hook: the execution is durable elsewhere; mark it done (and compact)."""
        eid = batch.execution_id
        if not eid or eid not in self._open or self._pid != _pid:
            return
        try:
            line = _line({"e": eid, "t": "done"})
            with self._lock:
                self._done.append(line)
                self._open.discard(eid)
            if not self.defer_done:
                self.committed()
        except Exception as exc:
            if is_interrupt(exc):
                raise
            logger.warning("local write-ahead log unavailable (%s: %s)", type(exc).__name__, exc)

    def committed(self) -> None:
        """Write the done lines held so far (one write), and compact the file if it is big."""
        if self._pid != _pid:
            return
        try:
            with self._lock:
                if self._done and self._fd is not None:
                    os.write(self._fd, b"".join(self._done))
                    self._done = []
                if self._fd is not None and os.fstat(self._fd).st_size > COMPACT_BYTES:
                    self._compact()
        except Exception as exc:
            if is_interrupt(exc):
                raise
            logger.warning("local write-ahead log unavailable (%s: %s)", type(exc).__name__, exc)

    def _compact(self) -> None:
        """Rewrite the file with only the lines of executions still open (under the lock).

        The new file replaces the old one in one rename, so a reader sees one or the other;
        the executions left out are all done (in the database or the spool).
        """
        assert self._path is not None and self._fd is not None
        path, keep = self._path, self._open
        if keep:
            lines = [
                line
                for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                if _execution_of(line) in keep
            ]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(_FIELDS_LINE + "".join(lines).encode("utf-8"))
            os.replace(tmp, path)
            os.close(self._fd)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        else:
            os.ftruncate(self._fd, 0)  # O_APPEND: the next write goes to the new end
            os.write(self._fd, _FIELDS_LINE)

    def pending(self) -> int:
        """Executions of this host's live writers that ended and are not yet durable."""
        if not self.directory.is_dir():
            return 0
        waiting = 0
        for path in self.directory.glob("*.jsonl"):
            if not self._writer_alive(path):
                continue  # a dead writer's: recovery's, not a writer's, to finish
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                continue
            closed: set[str] = set()
            for line in text.splitlines():
                if "closed" not in line and "done" not in line:
                    continue  # a call or a rollup (most lines): not parsed
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("t") == "closed":
                    closed.add(entry.get("e"))
                elif entry.get("t") == "done":
                    closed.discard(entry.get("e"))
            waiting += len(closed)
        return waiting

    def close(self) -> None:
        self.committed()
        with self._lock:
            if self._fd is not None and self._pid == _pid:
                os.close(self._fd)
            self._fd = None

    # -- recovery (any process of the host) --------------------------------------------------
    def _writer_alive(self, path: Path) -> bool:
        try:
            host, pid_text, started_text = path.stem.rsplit("-", 2)
            pid, started = int(pid_text), int(started_text)
        except ValueError:
            return False  # not one of ours: treat as dead, its lines are checked one by one
        if host != self.host:
            return True  # another host's file (a shared folder): not ours to judge
        if pid == os.getpid():
            return True
        return pid_alive(pid) and (started == 0 or process_started(pid) == started)

    def recover(self, sink: DatabaseSink) -> int:
        """Flush every unfinished execution of dead writers; returns how many were recovered."""
        if not self.directory.is_dir():
            return 0
        recovered = 0
        for path in sorted(self.directory.glob("*.jsonl")):
            if self._writer_alive(path):
                continue
            try:
                recovered += self._recover_file(path, sink)
            except Exception as exc:
                if is_interrupt(exc):
                    raise
                logger.exception("could not recover the write-ahead file %s", path)
        return recovered

    def _recover_file(self, path: Path, sink: DatabaseSink) -> int:
        entries: dict[str, list[str]] = {}
        meta: dict[str, dict[str, Any]] = {}
        done: set[str] = set()
        names: list[str] | None = None  # of the values of a call line, from the file's top
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut by the kill: the call before it is whole
            kind = entry.get("t")
            if kind == "fields":
                names = entry.get("names")
                continue
            eid = entry.get("e")
            if not eid:
                continue
            if kind == "c":  # a call as values, named by the file's first line
                if names is None:  # never written so; this version's order, said aloud
                    logger.warning("%s: a call line before the field names", path.name)
                    names = list(CALL_FIELDS)
                values = entry.get("v") or ()
                kind, entry = (
                    "call",
                    {
                        "e": eid,
                        "t": "call",
                        "path": entry.get("path"),
                        "call": dict(zip(names, values, strict=False)),
                    },
                )
            if kind == "open":
                meta[eid] = entry.get("meta") or {}
            elif kind == "done":
                done.add(eid)
            elif kind in ("call", "rollup"):
                entries.setdefault(eid, []).append(json.dumps(entry))
        recovered, failed = 0, False
        for eid, raw in entries.items():
            if eid in done:
                continue
            batch = WriteAheadLog._batch(eid, meta.get(eid, {}), raw)
            batch.ledger = meta.get(eid, {}).get("ledger")
            if not sink.accepts(batch):  # another ledger's worker shared this folder
                failed = True  # kept for its own ledger's recovery
                continue
            logger.warning(
                "recovering %d calls of task %s (%s) whose worker process (%s) is gone",
                len(batch.calls),
                batch.task_id,
                batch.task_name,
                path.name,
            )
            if sink.persist(batch):  # in the ledger or the spool: never spooled again
                recovered += 1
                with path.open("ab") as fh:  # the writer is dead: ours to note
                    fh.write(_line({"e": eid, "t": "done"}))
            else:
                failed = True  # kept: the next recovery writes it (idempotent)
        if not failed:
            path.unlink(missing_ok=True)
        return recovered
