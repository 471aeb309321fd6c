"""Rollups: application rows kept equal to a scope's totals, bound by the application.

``instrumentation`` knows no task or table of the application; a task binds a rollup to its
scope and names the row and the columns::

    with usage_scope("pipeline_run", run.id) as scope:
        scope.bind_rollup(TableRollup(
            PipelineRunUsage, key={"pipeline_run_id": run.id},
            sums={"prompt_tokens": "input_tokens", "completion_tokens": "output_tokens"},
            cost_column="total_cost_usd", values={"idea_model": "gpt-4o-mini"},
        ))

At flush, inside the flush transaction, the row matching ``key`` is created if missing (key +
values; a table with other NOT NULL columns needs the application to write the row first) and
each ``sums`` column is *incremented* by the sum, over the calls of that scope's subtree that
were newly inserted into the ledger, of the named ``CallRecord`` field.  So a replayed flush
adds nothing, and each retry attempt adds its own calls.  ``cost_column`` gets the exact
Decimal sum, and becomes NULL (unknown, never a false figure) once any billable call in it has
no price.

A rollup is plain data (table name, key, column names), so it survives the spool and the
write-ahead log and can be applied by a process that never imported the application.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Table, case, null, select, update
from sqlalchemy.orm import Session

from instrumentation.context import CallRecord, UsageTotals
from models.tables import Base

#: CallRecord fields a rollup can sum.
SUMMABLE_FIELDS = frozenset(
    {
        "input_tokens",
        "cached_input_tokens",
        "input_image_tokens",
        "output_tokens",
        "reasoning_tokens",
        "image_count",
        "image_tokens",
    }
)

JSONScalar = str | int | float | bool | None


def _table(name: str) -> Table:
    try:
        return Base.metadata.tables[name]
    except KeyError:
        raise ValueError(f"rollup table {name!r} is not a table of models.tables") from None


@dataclass(frozen=True)
class TableRollup:
    """Keep the row of ``table`` matching ``key`` equal to the bound scope's usage."""

    table: str
    key: dict[str, JSONScalar]
    sums: dict[str, str] = field(default_factory=dict)
    cost_column: str | None = None
    values: dict[str, JSONScalar] = field(default_factory=dict)

    def __init__(
        self,
        table: type[Base] | str,
        key: dict[str, JSONScalar],
        sums: dict[str, str] | None = None,
        cost_column: str | None = None,
        values: dict[str, JSONScalar] | None = None,
    ) -> None:
        name = table if isinstance(table, str) else table.__tablename__
        object.__setattr__(self, "table", name)
        object.__setattr__(self, "key", dict(key))
        object.__setattr__(self, "sums", dict(sums or {}))
        object.__setattr__(self, "cost_column", cost_column)
        object.__setattr__(self, "values", dict(values or {}))
        self._validate()

    def _validate(self) -> None:
        columns = _table(self.table).c
        if not self.key:
            raise ValueError("a rollup needs a key naming its row")
        named = [*self.key, *self.sums, *self.values]
        if self.cost_column:
            named.append(self.cost_column)
        for column in named:
            if column not in columns:
                raise ValueError(f"{self.table} has no column {column!r}")
        for column, source in self.sums.items():
            if not isinstance(source, str) or source not in SUMMABLE_FIELDS:
                raise ValueError(
                    f"sums[{column!r}] must name a CallRecord field, one of "
                    f"{sorted(SUMMABLE_FIELDS)} (got {source!r})"
                )

    # -- serialisation (spool, write-ahead log) ----------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "table",
            "table": self.table,
            "key": self.key,
            "sums": self.sums,
            "cost_column": self.cost_column,
            "values": self.values,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TableRollup:
        if data.get("kind") != "table":
            raise ValueError(f"unknown rollup kind {data.get('kind')!r}")
        return cls(
            data["table"],
            key=data["key"],
            sums=data.get("sums") or {},
            cost_column=data.get("cost_column"),
            values=data.get("values") or {},
        )

    # -- applying -----------------------------------------------------------------------------
    def apply(self, session: Connection | Session, new_calls: list[CallRecord]) -> None:
        """Create the row if missing and add ``new_calls`` to it, in ``session``'s transaction."""
        from instrumentation.sink import insert_ignore  # one dialect switch, kept in the sink

        table = _table(self.table)
        seed: dict[str, Any] = {**self.key, **self.values}
        for column in self.sums:
            seed[column] = 0
        if self.cost_column:
            seed[self.cost_column] = Decimal(0)
        where = [table.c[k] == v for k, v in self.key.items()]
        exists = session.execute(select(table.c[next(iter(self.key))]).where(*where)).first()
        if exists is None:  # the application usually wrote the row; create it only if not
            session.execute(insert_ignore(session, table), [seed])

        totals = UsageTotals.of(new_calls)
        changes: dict[str, Any] = dict(self.values)
        for column, source in self.sums.items():
            increment = sum(getattr(c, source) for c in new_calls)
            if increment:
                changes[column] = table.c[column] + increment
        if self.cost_column:
            col = table.c[self.cost_column]
            if totals.uncosted_calls:
                changes[self.cost_column] = null()
            elif totals.priced_cost_usd:
                changes[self.cost_column] = case(
                    (col.is_(None), null()), else_=col + totals.priced_cost_usd
                )
        if not changes:
            return
        session.execute(update(table).where(*where).values(changes))
