"""Rollups that could not apply with their calls: kept, retried alone, never taking calls down.

A rollup writes to the application's own row (its run, its scanned post).  When that write
fails (the row's parent was rolled back, a NOT NULL column the rollup cannot fill, a trigger),
the flush writes the batch's calls anyway and keeps each rollup, with exactly the calls it must
add, in ``tokenmeter_pending_rollups`` in the same transaction.  A pending rollup is applied
in a transaction that also deletes it, so it is applied exactly once however many processes
retry it (worker recovery, ``tokenmeter rollups --retry``).  After
``TOKENMETER_ROLLUP_MAX_ATTEMPTS`` failures it is dead: kept, reported, retried only on demand.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Table, delete, func, insert, select, update

from .context import CallRecord, is_interrupt
from .ledger import PendingRollup, fitted, text_lengths
from .rollups import TableRollup

_PENDING: Table = PendingRollup.__table__  # type: ignore[assignment]
_LENGTHS = text_lengths(_PENDING)

Transaction = Callable[[], AbstractContextManager[Connection]]


@dataclass(frozen=True)
class RetryReport:
    applied: int  # applied now (and removed)
    failed: int  # failed again (kept; dead once out of attempts)
    left: int  # still pending, not dead


def defer(
    conn: Connection,
    rollups: list[tuple[dict[str, Any], list[CallRecord], bool]],
    *,
    execution_id: str | None,
    task_id: str | None,
    task_name: str | None,
    error: str,
) -> list[int]:
    """Keep ``(rollup, its new calls, had calls)`` entries as pending rows; returns their ids.

    A rollup whose subtree had calls, none of them new, was applied (or kept) when those calls
    were first written: nothing to keep.
    """
    now = datetime.now(UTC)
    rows = [
        {
            "created_at": now,
            "updated_at": now,
            "execution_id": execution_id or "",
            "task_id": fitted(task_id, _LENGTHS["task_id"]),  # labels a user set
            "task_name": fitted(task_name, _LENGTHS["task_name"]),
            "rollup": json.dumps(rollup, separators=(",", ":")),
            "calls": json.dumps([_call_json(c) for c in calls], separators=(",", ":")),
            "attempts": 1,
            "last_error": fitted(error, None),
            "dead": False,
        }
        for rollup, calls, had_calls in rollups
        if calls or not had_calls
    ]
    if not rows:
        return []
    return list(conn.execute(insert(_PENDING).returning(_PENDING.c.id), rows).scalars())


def _call_json(call: CallRecord) -> dict[str, Any]:
    from .sink import call_to_json

    return call_to_json(call)


def apply_pending(transaction: Transaction, pending_id: int) -> bool:
    """Apply one pending rollup and remove it, in one transaction.  False if already taken."""
    from .sink import call_from_json

    with transaction() as conn:
        row = conn.execute(
            delete(_PENDING)
            .where(_PENDING.c.id == pending_id)
            .returning(_PENDING.c.rollup, _PENDING.c.calls)
        ).first()
        if row is None:  # applied by another process meanwhile
            return False
        calls = [call_from_json(c) for c in json.loads(row.calls)]
        TableRollup.from_json(json.loads(row.rollup)).apply(conn, calls)
    return True


def retry(
    transaction: Transaction,
    *,
    max_attempts: int,
    ids: list[int] | None = None,
    include_dead: bool = False,
    limit: int = 500,
    is_down: Callable[[BaseException], bool],
) -> RetryReport:
    """Apply pending rollups, oldest first; a failure is counted, and kills it at the limit."""
    with transaction() as conn:
        query = select(_PENDING.c.id).order_by(_PENDING.c.id).limit(limit)
        if ids is not None:
            query = query.where(_PENDING.c.id.in_(ids))
        if not include_dead:
            query = query.where(_PENDING.c.dead.is_(False))
        todo = list(conn.execute(query).scalars())
    applied = failed = 0
    for pending_id in todo:
        try:
            applied += apply_pending(transaction, pending_id)
        except Exception as exc:
            if is_interrupt(exc):
                raise
            if is_down(exc):  # the database went away: try again at the next recovery
                break
            failed += 1
            with transaction() as conn:
                conn.execute(
                    update(_PENDING)
                    .where(_PENDING.c.id == pending_id)
                    .values(
                        attempts=_PENDING.c.attempts + 1,
                        last_error=fitted(f"{type(exc).__name__}: {exc}"[:4000], None),
                        updated_at=datetime.now(UTC),
                        dead=_PENDING.c.attempts + 1 >= max_attempts,
                    )
                )
    with transaction() as conn:
        left = conn.execute(
            select(func.count()).select_from(_PENDING).where(_PENDING.c.dead.is_(False))
        ).scalar_one()
    return RetryReport(applied, failed, int(left))


def pending(conn: Connection) -> Iterator[PendingRollup]:
    """Every kept rollup, oldest first (for ``tokenmeter rollups``)."""
    for row in conn.execute(select(_PENDING).order_by(_PENDING.c.id)):
        yield PendingRollup(**row._mapping)
