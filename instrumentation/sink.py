"""Flush closed scopes to the database: one transaction, idempotent, spooled when it can't.

A closed root scope becomes a :class:`FlushBatch` (its calls, plus each bound rollup with the
calls of its subtree).  :func:`write_batch` inserts the calls with ``ON CONFLICT DO NOTHING``
(unique request id, unique ``(execution_id, seq)``) and applies the rollups to exactly the rows
that were new, in the same transaction: flushing a batch twice changes nothing.

When the database can't be reached the batch goes to a :class:`Spool` (a Redis list when Redis
is configured, else one file per batch under ``var/spool``) and is replayed later (worker start,
the periodic recovery, ``tokenmeter replay``).  Replay is safe to run from several processes at
once because writing is idempotent.  A batch that fails for another reason (a bug, a rollup row
whose foreign key is gone) is moved to the dead letters with its error, never dropped.  The
caller's task never sees a metering failure.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields
from datetime import UTC, datetime
from decimal import Decimal
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Connection, Insert, Table
from sqlalchemy import exc as sa_exc
from sqlalchemy import types as sa_types
from sqlalchemy.dialects import postgresql, sqlite

from . import deferred
from .context import CallRecord, UsageScope, UsageTotals, is_interrupt, price_unpriced
from .db import get_engine
from .ids import new_id
from .ledger import OpenAICall, fit, fitted, storable, text_lengths
from .rollups import TableRollup
from .settings import get_settings

if TYPE_CHECKING:
    from .writer import BackgroundWriter

logger = logging.getLogger("tokenmeter.sink")

_LEDGER: Table = OpenAICall.__table__  # type: ignore[assignment]
_LEDGER_COLUMNS = frozenset(c.name for c in _LEDGER.columns) - {"id"}
#: The ledger's text columns and their lengths (None: unbounded): labels a user controls (scope
#: refs, task names, model names, a price file's path) are made storable and fitted to them
#: at write time.
_TEXT_COLUMNS = text_lengths(_LEDGER)


# -- (de)serialisation ------------------------------------------------------------------------
_CALL_FIELDS = tuple(f.name for f in fields(CallRecord))
#: Fields with a plain default (not a factory): a call's JSON leaves them out when they hold
#: it, so the write-ahead line of a call carries what the call has, not forty zeros.
_DEFAULTS = {f.name: f.default for f in fields(CallRecord) if f.default is not MISSING}


_CALL_VALUES = attrgetter(*_CALL_FIELDS)
_CALL_DEFAULTS = tuple(_DEFAULTS.get(name, MISSING) for name in _CALL_FIELDS)


def call_to_json(call: CallRecord) -> dict[str, Any]:
    out = {
        name: value
        for name, value, default in zip(
            _CALL_FIELDS, _CALL_VALUES(call), _CALL_DEFAULTS, strict=True
        )  # pragma: no mutate  (the three have one length by construction)
        if not (value is default or (value == default and type(value) is type(default)))
    }
    if out.get("cost_usd") is not None:
        out["cost_usd"] = str(out["cost_usd"])
    out["created_at"] = call.created_at.isoformat()
    return out


#: The names of a call's values in a write-ahead line (:func:`call_values`' order): the file
#: names them once, at its top, so that a later version with other fields reads them by name.
CALL_FIELDS: tuple[str, ...] = _CALL_FIELDS
#: A call's values in :data:`CALL_FIELDS` order, as they are (the write-ahead file's encoder
#: writes the money and the moment as text, as :func:`call_to_json` does).
call_values: Callable[[CallRecord], tuple[Any, ...]] = _CALL_VALUES


def call_from_json(data: dict[str, Any]) -> CallRecord:
    known = {f.name for f in fields(CallRecord)}
    kwargs = {k: v for k, v in data.items() if k in known}
    if kwargs.get("cost_usd") is not None:
        kwargs["cost_usd"] = Decimal(kwargs["cost_usd"])
    if isinstance(kwargs.get("created_at"), str):
        kwargs["created_at"] = datetime.fromisoformat(kwargs["created_at"])
    return CallRecord(**kwargs)


@dataclass
class BoundRollup:
    """A rollup and the calls (by seq) of the scope subtree it is bound to."""

    rollup: dict[str, Any]
    seqs: list[int]


@dataclass
class FlushBatch:
    """Everything one flush writes: calls of one execution and the rollups bound in it."""

    calls: list[CallRecord]
    rollups: list[BoundRollup] = field(default_factory=list)
    execution_id: str | None = None
    task_id: str | None = None
    task_name: str | None = None
    attempt: int = 0
    state: str | None = None
    batch_id: str = field(default_factory=new_id)
    ledger: str | None = None  # the identity of the ledger it belongs to (None: any)

    @classmethod
    def from_scope(cls, scope: UsageScope, state: str | None = None) -> FlushBatch:
        root = scope.root
        calls = root.recorded_calls()  # priced by the writer (write_batches), off the task
        rollups = [
            BoundRollup(r.to_json(), [c.seq for c in s.recorded_calls()])
            for s in root.walk()
            for r in s.rollups
        ]
        return cls(
            calls=calls,
            rollups=rollups,
            execution_id=root.execution_id,
            task_id=root.task_id,
            task_name=root.task_name,
            attempt=root.attempt,
            state=state or root.labels.get("state"),
        )

    @property
    def totals(self) -> UsageTotals:
        return UsageTotals.of(self.calls)

    def to_json(self) -> str:
        return json.dumps(
            {
                "batch_id": self.batch_id,
                "execution_id": self.execution_id,
                "task_id": self.task_id,
                "task_name": self.task_name,
                "attempt": self.attempt,
                "state": self.state,
                "ledger": self.ledger,
                "calls": [call_to_json(c) for c in self.calls],
                "rollups": [{"rollup": r.rollup, "seqs": r.seqs} for r in self.rollups],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, payload: str | bytes) -> FlushBatch:
        data = json.loads(payload)
        return cls(
            calls=[call_from_json(c) for c in data["calls"]],
            rollups=[BoundRollup(r["rollup"], list(r["seqs"])) for r in data["rollups"]],
            execution_id=data.get("execution_id"),
            task_id=data.get("task_id"),
            task_name=data.get("task_name"),
            attempt=data.get("attempt") or 0,
            state=data.get("state"),
            batch_id=data.get("batch_id") or uuid.uuid4().hex,
            ledger=data.get("ledger"),
        )


# -- writing ------------------------------------------------------------------------------------
def insert_ignore(conn: Any, table: Table) -> Insert:
    """``INSERT ... ON CONFLICT DO NOTHING`` for the connection's dialect."""
    name = conn.bind.dialect.name if hasattr(conn, "bind") and conn.bind else conn.dialect.name
    if name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    if name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    raise NotImplementedError(f"tokenmeter's ledger supports PostgreSQL and SQLite, not {name}")


def _column_value(call: CallRecord, name: str) -> Any:
    """The value of ledger column ``name`` for ``call``, a label as its column keeps it."""
    value = getattr(call, name)  # (``model`` is a property: the served model, else the asked)
    return fitted(value, _TEXT_COLUMNS[name]) if name in _TEXT_COLUMNS else value


def _ledger_row(call: CallRecord) -> dict[str, Any]:
    return {name: _column_value(call, name) for name in _LEDGER_COLUMNS}


def write_batch(conn: Connection, batch: FlushBatch) -> list[CallRecord]:
    """Insert the batch's calls and apply its rollups in ``conn``'s transaction.

    Returns the calls that were new to the ledger (a replay returns none and changes nothing).
    """
    return write_batches(conn, [batch])[0]


def write_batches(conn: Connection, batches: list[FlushBatch]) -> list[list[CallRecord]]:
    """:func:`write_batch` for several batches: one multi-row insert, then each batch's rollups.

    Returns, per batch, its calls that were new to the ledger.
    """
    for batch in batches:  # a call recorded in a scope is priced here, off the task's path
        price_unpriced(batch.calls)
    new_per_batch = _insert_calls(conn, batches)
    for batch, new_calls in zip(batches, new_per_batch, strict=True):  # pragma: no mutate
        for rollup, subtree, _ in _bound(batch, new_calls):
            TableRollup.from_json(rollup).apply(conn, subtree)
    return new_per_batch


def _insert_calls(conn: Connection, batches: list[FlushBatch]) -> list[list[CallRecord]]:
    """Every call in one statement; per batch, the calls that were new.

    PostgreSQL: one ``COPY`` (see :func:`_copy_calls`); a multi-row ``INSERT ... ON CONFLICT
    DO NOTHING RETURNING`` elsewhere (SQLite is local).
    """
    calls = [c for b in batches for c in b.calls]
    inserted: set[tuple[str, int]] = set()
    if calls and conn.dialect.name == "postgresql":
        inserted = _copy_calls(conn, calls)
    elif calls:
        stmt = insert_ignore(conn, _LEDGER).returning(_LEDGER.c.execution_id, _LEDGER.c.seq)
        inserted = {
            (row.execution_id, row.seq)
            for row in conn.execute(stmt, [_ledger_row(c) for c in calls])
        }
    # A call new to the ledger is new to ONE batch: the same batch twice in one transaction
    # (spooled again by a recovery pass while the database was down) adds it once.
    claimed: set[tuple[str, int]] = set()
    per_batch: list[list[CallRecord]] = []
    for batch in batches:
        new: list[CallRecord] = []
        for call in batch.calls:
            key = (call.execution_id, call.seq)
            if key in inserted and key not in claimed:
                claimed.add(key)
                new.append(call)
        per_batch.append(new)
    return per_batch


_COPY_COLUMNS = [c for c in _LEDGER.columns if c.name != "id"]
_STAGE = "tokenmeter_stage_calls"


@dataclass(frozen=True)
class _CopyPlan:
    """How a call becomes a COPY row, built once per dialect: every column read in one
    ``attrgetter`` call, then only the columns that need it fitted or processed."""

    values: Callable[[CallRecord], tuple[Any, ...]]
    texts: tuple[tuple[int, int | None], ...]  # (position, length or None) of each text column
    processors: tuple[tuple[int, Callable[[Any], Any]], ...]  # (position, bind processor)
    #: PostgreSQL's name of each column's type, for a binary COPY (None: copied as text)
    types: tuple[str, ...] | None = None


_copy_plans: dict[str, _CopyPlan] = {}


def _copy_plan(dialect: Any) -> _CopyPlan:
    plan = _copy_plans.get(dialect.name)
    if plan is None:
        names = [c.name for c in _COPY_COLUMNS]
        processors: list[Callable[[Any], Any] | None] = [
            c.type.dialect_impl(dialect).bind_processor(dialect) for c in _COPY_COLUMNS
        ]
        types = _binary_types(dialect)
        for i, pg_type in enumerate(types or ()):
            if pg_type == "timestamptz" and processors[i] is None:
                processors[i] = _aware
        plan = _CopyPlan(
            values=attrgetter(*names),
            texts=tuple((i, _TEXT_COLUMNS[n]) for i, n in enumerate(names) if n in _TEXT_COLUMNS),
            processors=tuple((i, p) for i, p in enumerate(processors) if p is not None),
            types=types,
        )
        _copy_plans[dialect.name] = plan
    return plan


#: PostgreSQL's binary type of each kind of column the ledger has (most specific first).
_PG_TYPES: tuple[tuple[type[Any], str], ...] = (
    (sa_types.Boolean, "bool"),
    (sa_types.BigInteger, "int8"),
    (sa_types.Integer, "int4"),
    (sa_types.Float, "float8"),
    (sa_types.Numeric, "numeric"),
    # VARCHAR(n) too: the two share one binary form (and the server still checks n); psycopg
    # 3.1 has no binary dumper for varchar
    (sa_types.String, "text"),
)


def _aware(moment: datetime | None) -> datetime | None:
    """A moment for a binary ``timestamptz``: one without a zone is UTC (every moment
    tokenmeter makes is UTC; psycopg's binary dumper refuses one without a zone)."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def _binary_types(dialect: Any) -> tuple[str, ...] | None:
    """Each COPY column's PostgreSQL type, for a binary COPY (psycopg's dumpers, in C; no
    text for the server to parse), or None (not PostgreSQL, or a column of another type)."""
    if dialect.name != "postgresql":
        return None
    found = []
    for column in _COPY_COLUMNS:
        impl = column.type
        if isinstance(impl, sa_types.TypeDecorator):  # Money: NUMERIC on PostgreSQL
            impl = impl.load_dialect_impl(dialect)
        if isinstance(impl, sa_types.DateTime):
            found.append("timestamptz" if impl.timezone else "timestamp")
            continue
        name = next((pg for kind, pg in _PG_TYPES if isinstance(impl, kind)), None)
        if name is None:
            return None
        found.append(name)
    return tuple(found) if _dumps_in_binary(found) else None


def _dumps_in_binary(names: list[str]) -> bool:
    """Has the installed psycopg a binary dumper for each of these types (else: text)?"""
    try:
        import psycopg
        from psycopg.pq import Format

        for name in set(names):
            info = psycopg.adapters.types.get(name)
            if info is None:
                return False
            psycopg.adapters.get_dumper_by_oid(info.oid, Format.BINARY)
    except Exception:  # no psycopg 3, or one without such a dumper: COPY as text
        return False
    return True


def _copy_row(call: CallRecord, plan: _CopyPlan) -> list[Any]:
    """The ledger row of ``call`` in COPY column order (labels fitted, values processed):
    what ``_column_value`` gives for each column, without a lookup per column."""
    row = list(plan.values(call))
    for i, limit in plan.texts:  # fitted(), inline: ~20 text columns a row
        value = row[i]
        if isinstance(value, str):
            if not value.isascii() or "\x00" in value:  # (the common case: two fast tests)
                value = row[i] = storable(value)
            if limit is not None and len(value) > limit:
                row[i] = fit(value, limit)
    for i, process in plan.processors:
        row[i] = process(row[i])
    return row


#: PostgreSQL's SQLSTATE for a unique violation.
_UNIQUE_VIOLATION = "23505"


def _copy_calls(conn: Connection, calls: list[CallRecord]) -> set[tuple[str, int]]:
    """Copy ``calls`` into the ledger; the keys of those that were new to it.

    A commit nearly always holds calls the ledger has never seen: they are copied straight
    into it, in a savepoint (a fifth less time a commit than staging them first).  When any
    is already there (a replay, a second recovery, the same batch twice) the unique
    violation rolls that back, and every call goes through a staging table and one
    ``INSERT ... SELECT ... ON CONFLICT DO NOTHING RETURNING``, which adds only the new ones.
    """
    dialect = conn.dialect
    plan = _copy_plan(dialect)
    names = ", ".join(dialect.identifier_preparer.quote(c.name) for c in _COPY_COLUMNS)
    ledger = dialect.identifier_preparer.format_table(_LEDGER)
    rows = [_copy_row(call, plan) for call in calls]
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute("SAVEPOINT tokenmeter_copy")
        try:
            _copy_rows(cursor, ledger, names, rows, plan.types)
        except Exception as exc:
            if getattr(exc, "sqlstate", None) != _UNIQUE_VIOLATION:
                raise
            cursor.execute("ROLLBACK TO SAVEPOINT tokenmeter_copy")
        else:
            cursor.execute("RELEASE SAVEPOINT tokenmeter_copy")
            return {(call.execution_id, call.seq) for call in calls}
        # a temporary table of the session, emptied at each commit (and on rollback)
        cursor.execute(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGE} ON COMMIT DELETE ROWS AS "
            f"SELECT {names} FROM {ledger} WITH NO DATA"
        )
        _copy_rows(cursor, _STAGE, names, rows, plan.types)
        cursor.execute(
            f"INSERT INTO {ledger} ({names}) SELECT {names} FROM {_STAGE} "
            "ON CONFLICT DO NOTHING RETURNING execution_id, seq"
        )
        return {(eid, seq) for eid, seq in cursor.fetchall()}
    finally:
        cursor.close()


def _copy_rows(
    cursor: Any, table: str, names: str, rows: list[list[Any]], types: tuple[str, ...] | None
) -> None:
    binary = " (FORMAT BINARY)" if types is not None else ""
    with cursor.copy(f"COPY {table} ({names}) FROM STDIN{binary}") as copy:
        if types is not None:
            copy.set_types(types)
        for row in rows:
            copy.write_row(row)


def _bound(
    batch: FlushBatch, new_calls: list[CallRecord]
) -> list[tuple[dict[str, Any], list[CallRecord], bool]]:
    """Each rollup of ``batch`` with the new calls of its subtree (and whether it had any)."""
    by_seq = {c.seq: c for c in new_calls}
    return [
        (bound.rollup, [by_seq[s] for s in bound.seqs if s in by_seq], bool(bound.seqs))
        for bound in batch.rollups
    ]


def write_batch_deferring_rollups(
    conn: Connection, batch: FlushBatch, error: BaseException
) -> tuple[list[CallRecord], list[int]]:
    """The batch's calls, with its rollups kept as pending (see ``deferred``) instead of applied.

    Returns the new calls and the ids of the rollups kept.
    """
    [new_calls] = _insert_calls(conn, [batch])
    kept = deferred.defer(
        conn,
        _bound(batch, new_calls),
        execution_id=batch.execution_id,
        task_id=batch.task_id,
        task_name=batch.task_name,
        error=f"{type(error).__name__}: {error}"[:4000],
    )
    return new_calls, kept


def is_connectivity_error(exc: BaseException) -> bool:
    """True for "the database can't be reached right now" (worth retrying later)."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    retryable = (
        sa_exc.OperationalError,
        sa_exc.InterfaceError,
        sa_exc.DisconnectionError,
        ConnectionError,
        TimeoutError,
    )
    return isinstance(exc, retryable)


# -- spools -------------------------------------------------------------------------------------
class Spool(Protocol):
    """Durable FIFO of serialised batches waiting for the database."""

    def push(self, payload: str) -> None: ...

    def peek(self) -> str | None: ...

    def peek_many(self, n: int) -> list[str]: ...

    def remove(self, payload: str) -> None: ...

    def dead_letter(self, payload: str, error: str) -> None: ...

    def __len__(self) -> int: ...


class FileSpool:
    """One file per batch in a directory; safe for several processes (writes are idempotent).

    Replay is linear: the folder is listed once into a queue, and the batch just peeked is
    removed by its path (not by reading every file to find its payload).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.dead_dir = self.directory / "dead"
        self._queue: list[Path] = []  # pending files, oldest first (a snapshot of the folder)
        self._peeked: dict[str, Path] = {}  # payloads handed out by peek(), by path

    def _files(self) -> list[Path]:
        if not self.directory.exists():
            return []
        return sorted(self.directory.glob("*.json"))

    def push(self, payload: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        tmp = self.directory / f".{name}.tmp"
        tmp.write_text(payload, encoding="utf-8")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        tmp.rename(self.directory / f"{name}.json")

    def peek(self) -> str | None:
        found = self.peek_many(1)
        return found[0] if found else None

    def peek_many(self, n: int) -> list[str]:
        """The ``n`` oldest batches (fewer if the spool has fewer), without removing them."""
        if not self._queue:
            self._queue = self._files()
            self._queue.reverse()  # pop() from the end: the oldest first
        out: list[str] = []
        self._peeked = {}
        for path in reversed(self._queue):
            if len(out) == n:
                break
            try:
                payload = path.read_text(encoding="utf-8")
            except FileNotFoundError:  # taken by another replayer
                continue
            self._peeked[payload] = path
            out.append(payload)
        return out

    def remove(self, payload: str) -> None:
        path = self._peeked.pop(payload, None)
        if path is not None:  # handed out by peek: remove it by its path
            path.unlink(missing_ok=True)
            while self._queue and not self._queue[-1].exists():
                self._queue.pop()
            return
        for path in self._files():  # not the batch just peeked: look for it
            try:
                if path.read_text(encoding="utf-8") == payload:
                    path.unlink(missing_ok=True)
                    return
            except FileNotFoundError:
                continue

    def dead_letter(self, payload: str, error: str) -> None:
        self.dead_dir.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"error": error, "batch": json.loads(payload)})
        (self.dead_dir / f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json").write_text(record)
        self.remove(payload)

    def dead_letters(self) -> list[dict[str, Any]]:
        if not self.dead_dir.exists():
            return []
        return [json.loads(p.read_text()) for p in sorted(self.dead_dir.glob("*.json"))]

    def __len__(self) -> int:
        return len(self._files())


class RedisSpool:
    """A Redis list (``tokenmeter:spool``); dead letters in ``tokenmeter:spool:dead``."""

    def __init__(self, client: Any, key: str = "tokenmeter:spool") -> None:
        self.client = client
        self.key = key
        self.dead_key = f"{key}:dead"

    def push(self, payload: str) -> None:
        self.client.rpush(self.key, payload)

    def peek(self) -> str | None:
        found = self.peek_many(1)
        return found[0] if found else None

    def peek_many(self, n: int) -> list[str]:
        values = self.client.lrange(self.key, 0, n - 1)
        return [v.decode() if isinstance(v, bytes) else v for v in values]

    def remove(self, payload: str) -> None:
        self.client.lrem(self.key, 1, payload)

    def dead_letter(self, payload: str, error: str) -> None:
        record = json.dumps({"error": error, "batch": json.loads(payload)})
        pipe = self.client.pipeline()
        pipe.rpush(self.dead_key, record)
        pipe.lrem(self.key, 1, payload)
        pipe.execute()

    def dead_letters(self) -> list[dict[str, Any]]:
        return [json.loads(v) for v in self.client.lrange(self.dead_key, 0, -1)]

    def __len__(self) -> int:
        return int(self.client.llen(self.key))


class FallbackSpool:
    """Push to ``primary`` (Redis); if that fails too, to ``fallback`` (a local file spool)."""

    def __init__(self, primary: Spool, fallback: Spool) -> None:
        self.primary, self.fallback = primary, fallback

    def push(self, payload: str) -> None:
        try:
            self.primary.push(payload)
        except Exception:
            logger.warning("redis spool unreachable; spooling to %s", self.fallback)
            self.fallback.push(payload)

    def _spools(self) -> Iterator[Spool]:
        yield self.fallback  # drain local leftovers first: they are the oldest
        yield self.primary

    def peek(self) -> str | None:
        found = self.peek_many(1)
        return found[0] if found else None

    def peek_many(self, n: int) -> list[str]:
        out: list[str] = []
        for spool in self._spools():
            try:
                out.extend(spool.peek_many(n - len(out)))
            except Exception:
                continue
            if len(out) >= n:
                break
        return out

    def remove(self, payload: str) -> None:
        for spool in self._spools():
            try:
                spool.remove(payload)
            except Exception:
                continue

    def dead_letter(self, payload: str, error: str) -> None:
        try:
            self.primary.dead_letter(payload, error)
            self.fallback.remove(payload)
        except Exception:
            self.fallback.dead_letter(payload, error)

    def __len__(self) -> int:
        total = 0
        for spool in self._spools():
            try:
                total += len(spool)
            except Exception:
                continue
        return total


def connect_redis(url: str | None) -> Any | None:
    """A Redis client for ``url``, or None when ``url`` is not a Redis URL."""
    if not url or not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    import redis

    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


def default_spool(
    redis_client: Any | None = None, ledger: str | None = None, namespace: str = "tokenmeter"
) -> Spool:
    """Redis (with a local-file fallback) when a client is given, else a local file spool;
    both named by the ledger's identity when it is given (``<namespace>:spool``,
    ``spool/<ledger>/``), so ledgers sharing a Redis or a data dir keep apart."""
    folder = get_settings().spool_dir
    local = FileSpool(folder / ledger if ledger else folder)
    if redis_client is not None:
        return FallbackSpool(RedisSpool(redis_client, f"{namespace}:spool"), local)
    return local


# -- the sink ----------------------------------------------------------------------------------
FlushHook = Callable[[FlushBatch, list[CallRecord]], None]


class DatabaseSink:
    """The worker's sink: flush each closed root scope (and each unscoped call) to the ledger."""

    def __init__(
        self,
        database_url: str | None = None,
        spool: Spool | None = None,
        after_flush: list[FlushHook] | None = None,
        ledger_id: str | None = None,
    ) -> None:
        self.database_url = database_url
        self.spool: Spool = spool if spool is not None else default_spool()
        self.after_flush: list[FlushHook] = list(after_flush or [])
        self.ledger_id = ledger_id  # stamped on every batch; replay takes only its own
        #: When set, closed scopes are queued for it (written off the task's path, many per
        #: transaction); else each is written at once, in the closing thread.
        self.writer: BackgroundWriter | None = None

    # Sink protocol
    def scope_closed(self, scope: UsageScope) -> None:
        batch = FlushBatch.from_scope(scope)
        if batch.calls or batch.rollups:  # a task that called nothing writes nothing
            self.deliver(batch)

    def unscoped_call(self, call: CallRecord) -> None:
        self.deliver(
            FlushBatch(
                calls=[call],
                execution_id=call.execution_id,
                task_id=call.task_id,  # a late call of a flushed task keeps its task
                task_name=call.task_name,
                attempt=call.attempt,
            )
        )

    def deliver(self, batch: FlushBatch) -> None:
        """Hand ``batch`` to the writer, or write it now when there is none."""
        writer = self.writer
        if writer is None:
            self.flush(batch)
        else:
            writer.submit(batch)

    def write(self, batch: FlushBatch) -> list[CallRecord]:
        """Write ``batch`` in one transaction.  If a rollup cannot apply, the calls are written
        anyway with the rollups kept for retrying alone (``deferred``): a rollup never takes the
        ledger rows down with it.  Raises when the calls themselves cannot be written."""
        try:
            with self._transaction() as conn:
                return write_batch(conn, batch)
        except Exception as exc:
            if is_interrupt(exc) or is_connectivity_error(exc) or not batch.rollups:
                raise
            error = exc
        with self._transaction() as conn:
            new_calls, kept = write_batch_deferring_rollups(conn, batch, error)
        logger.warning(
            "a rollup of task %s could not apply (%s: %s); its %d calls are written and %d "
            "rollups kept to retry (tokenmeter rollups)",
            batch.task_id,
            type(error).__name__,
            str(error).splitlines()[0] if str(error) else "",
            len(new_calls),
            len(kept),
        )
        if kept:
            self.retry_rollups(ids=kept)
        return new_calls

    def retry_rollups(
        self, ids: list[int] | None = None, include_dead: bool = False
    ) -> deferred.RetryReport:
        """Apply kept rollups (each alone, exactly once); see ``deferred.retry``."""
        return deferred.retry(
            self._transaction,
            max_attempts=get_settings().tokenmeter_rollup_max_attempts,
            ids=ids,
            include_dead=include_dead,
            is_down=is_connectivity_error,
        )

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """A transaction whose every statement is bounded (DATABASE_TIMEOUT_S), so a stuck
        database spools the batch instead of holding the task; the connect is bounded too."""
        with get_engine(self.database_url).begin() as conn:
            if conn.dialect.name == "postgresql":
                ms = int(get_settings().database_timeout_s * 1000)
                conn.exec_driver_sql(f"SET LOCAL statement_timeout = {ms}")
            yield conn

    def accepts(self, batch: FlushBatch) -> bool:
        """Is ``batch`` this ledger's to write?  (One stamped by another ledger never is.)"""
        if batch.ledger is None or batch.ledger == self.ledger_id:
            return True
        from .identity import accepted

        return accepted(batch.ledger, self.database_url)

    def flush(self, batch: FlushBatch) -> bool:
        """Write ``batch`` now, or spool it.  True when it reached the database.  Never raises."""
        return self._flush(batch) == "written"

    def persist(self, batch: FlushBatch) -> bool:
        """:meth:`flush`, True when ``batch`` is durable: in the database or in the spool."""
        return self._flush(batch) != "lost"

    def _flush(self, batch: FlushBatch) -> str:
        started = time.perf_counter()
        if batch.ledger is None:
            batch.ledger = self.ledger_id
        try:
            new_calls = self.write(batch)
        except Exception as exc:
            spooled = self._spool(batch, exc)
            if is_interrupt(exc):  # spooled, nothing lost; the interrupt goes on to the task
                raise
            return "spooled" if spooled else "lost"
        self._log_flushed(batch, new_calls, started)
        self._run_hooks(batch, new_calls)
        return "written"

    def flush_many(self, batches: list[FlushBatch]) -> None:
        """Write ``batches`` in one transaction (the writer's commit), or spool them.

        A database that is down spools every batch; any other failure (a rollup that cannot
        apply, one bad batch) writes them one by one, so no batch holds the others back.
        Never raises (but an interrupt, after spooling).
        """
        if not batches:
            return
        started = time.perf_counter()
        for batch in batches:
            if batch.ledger is None:
                batch.ledger = self.ledger_id
        try:
            with self._transaction() as conn:
                new_per_batch = write_batches(conn, batches)
        except Exception as exc:
            if is_connectivity_error(exc) or is_interrupt(exc):
                for batch in batches:
                    self._spool(batch, exc)
                if is_interrupt(exc):
                    raise
                return
            for batch in batches:
                self.flush(batch)
            return
        for batch, new_calls in zip(batches, new_per_batch, strict=True):  # pragma: no mutate
            self._log_flushed(batch, new_calls, started)
            self._run_hooks(batch, new_calls)

    def _log_flushed(self, batch: FlushBatch, new_calls: list[CallRecord], started: float) -> None:
        if not logger.isEnabledFor(logging.INFO):
            return
        totals = batch.totals
        logger.info(
            "flushed %s %s attempt %d: %d calls (%d new), %d in / %d cached / %d out tokens, "
            "%d images, cost %s USD in %.1f ms",
            batch.task_name or "unscoped",
            batch.task_id or "-",
            batch.attempt,
            totals.calls,
            len(new_calls),
            totals.input_tokens,
            totals.cached_input_tokens,
            totals.output_tokens,
            totals.image_count,
            totals.cost_usd if totals.cost_usd is not None else "unknown",
            (time.perf_counter() - started) * 1000,
            extra={
                "task_id": batch.task_id,
                "task_name": batch.task_name,
                "attempt": batch.attempt,
                "calls": totals.calls,
                "new_calls": len(new_calls),
                "input_tokens": totals.input_tokens,
                "output_tokens": totals.output_tokens,
                "cost_usd": str(totals.cost_usd),
            },
        )

    def _spool(self, batch: FlushBatch, exc: BaseException) -> bool:
        """Spool ``batch`` (then run its hooks: it is durable); False when even that failed."""
        if not self._push_to_spool(batch, exc):
            return False
        self._run_hooks(batch, [])
        return True

    def _push_to_spool(self, batch: FlushBatch, exc: BaseException) -> bool:
        try:
            price_unpriced(batch.calls)  # replayed priced, as written
            self.spool.push(batch.to_json())
            logger.warning(
                "flush failed (%s: %s); spooled %d calls of task %s for replay",
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
                len(batch.calls),
                batch.task_id,
            )
            return True
        except Exception:
            # Last resort: the batch is in the log (and the write-ahead log, if on).
            logger.critical("could not spool usage batch; payload follows: %s", batch.to_json())
            return False

    def _run_hooks(self, batch: FlushBatch, new_calls: list[CallRecord]) -> None:
        """Run once the batch is durable (in the database, or in the spool: new_calls=[])."""
        for hook in self.after_flush:
            try:
                hook(batch, new_calls)
            except Exception as exc:
                if is_interrupt(exc):
                    raise
                logger.exception("after-flush hook failed")

    def replay(self, limit: int | None = None, chunk: int = 200) -> int:
        """Write spooled batches, oldest first, until the spool is empty or the DB fails again.

        Batches are written ``chunk`` at a time in one transaction (linear, and one commit per
        chunk rather than per batch); a chunk that fails for another reason than the database
        being down is retried one batch at a time, so only a bad batch goes to the dead
        letters.  Returns how many batches were written.  Idempotent: safe while another
        process replays.
        """
        done = 0
        while limit is None or done < limit:
            want = chunk if limit is None else min(chunk, limit - done)
            parsed = [(p, FlushBatch.from_json(p)) for p in self.spool.peek_many(want)]
            ours = [(p, b) for p, b in parsed if self.accepts(b)]
            if len(ours) < len(parsed):  # another ledger's batches: left for it, never written
                logger.warning(
                    "%d spooled batches belong to another ledger: left", len(parsed) - len(ours)
                )
            payloads = [p for p, _ in ours]
            if not payloads:
                break
            try:
                with self._transaction() as conn:
                    write_batches(conn, [b for _, b in ours])
            except Exception as exc:
                if is_interrupt(exc):
                    raise
                if is_connectivity_error(exc):
                    logger.info("replay paused: database still unavailable (%s)", exc)
                    break
                written, stop = self._replay_one_by_one(payloads)
                done += written
                if stop:
                    break
                continue
            for payload in payloads:
                self.spool.remove(payload)
            done += len(payloads)
        if done:
            logger.info("replayed %d spooled usage batches", done)
        return done

    def _replay_one_by_one(self, payloads: list[str]) -> tuple[int, bool]:
        """Write each batch alone; dead-letter the bad ones.  (written, database down?)"""
        written = 0
        for payload in payloads:
            try:
                self.write(FlushBatch.from_json(payload))
            except Exception as exc:
                if is_interrupt(exc):
                    raise
                if is_connectivity_error(exc):
                    logger.info("replay paused: database still unavailable (%s)", exc)
                    return written, True
                logger.error("spooled batch failed (%s); moved to dead letters", exc)
                self.spool.dead_letter(payload, f"{type(exc).__name__}: {exc}")
                continue
            self.spool.remove(payload)
            written += 1
        return written, False
