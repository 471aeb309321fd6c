"""Rollups: application rows kept equal to a scope's totals, bound by the application.

tokenmeter knows no task or table of the application; a task binds a rollup to its scope and
names the row and the columns, on any table of the application's own SQLAlchemy metadata (a
``Table`` or a declarative class)::

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
write-ahead log and can be applied by a process that never imported the application: the table
is then reflected from the database (its cost column keeps its exact money type).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import Column, Connection, MetaData, Table, case, inspect, null, select, update
from sqlalchemy.orm import Session

from .context import SUMMED_FIELDS, CallRecord, UsageTotals
from .money import Money

#: CallRecord fields a rollup can sum.
SUMMABLE_FIELDS = frozenset({*SUMMED_FIELDS, "image_tokens"})

JSONScalar = str | int | float | bool | None


_registry_lock = threading.Lock()
_registry: dict[str, Table] = {}
"""Tables named by rollups built in this process (their exact column types)."""
_reflected: dict[tuple[str, str, str], Table] = {}


def _register(table: Any) -> Table:
    """The ``Table`` of ``table`` (a Table or a declarative class), remembered by name."""
    found = table if isinstance(table, Table) else getattr(table, "__table__", None)
    if not isinstance(found, Table):
        raise TypeError(
            f"TableRollup needs a SQLAlchemy Table or a declarative class, not {table!r}"
        )
    with _registry_lock:
        _registry[found.name] = found
    return found


def _resolve(name: str, session: Connection | Session, money_column: str | None) -> Table:
    """A table known in this process, else reflected once per database from ``session``."""
    known = _registry.get(name)
    if known is not None:
        return known
    bind = session.get_bind() if isinstance(session, Session) else session
    key = (str(bind.engine.url), name, money_column or "")
    with _registry_lock:
        table = _reflected.get(key)
        if table is None:
            if not inspect(bind).has_table(name):
                raise ValueError(f"rollup table {name!r} does not exist in the database")
            # A cost column stored by tokenmeter's Money type (a scaled integer on SQLite)
            # must be read and written through it, not as the integer it reflects as.
            overrides: list[Column[Any]] = [Column(money_column, Money())] if money_column else []
            table = Table(name, MetaData(), *overrides, autoload_with=bind)
            _reflected[key] = table
    return table


@dataclass(frozen=True)
class TableRollup:
    """Keep the row of ``table`` matching ``key`` equal to the bound scope's usage."""

    table: str
    key: dict[str, JSONScalar]
    sums: dict[str, str] = field(default_factory=dict)
    cost_column: str | None = None
    values: dict[str, JSONScalar] = field(default_factory=dict)
    cost_type: str = "money"  # "numeric" when the cost column is a plain NUMERIC

    def __init__(
        self,
        table: Any,
        key: dict[str, JSONScalar],
        sums: dict[str, str] | None = None,
        cost_column: str | None = None,
        values: dict[str, JSONScalar] | None = None,
    ) -> None:
        resolved = None if isinstance(table, str) else _register(table)
        object.__setattr__(self, "table", resolved.name if resolved is not None else table)
        object.__setattr__(self, "key", dict(key))
        object.__setattr__(self, "sums", dict(sums or {}))
        object.__setattr__(self, "cost_column", cost_column)
        object.__setattr__(self, "values", dict(values or {}))
        object.__setattr__(
            self, "cost_type", self._cost_type(resolved) if resolved is not None else "money"
        )
        self._validate(resolved)

    def _cost_type(self, table: Table) -> str:
        if self.cost_column and self.cost_column in table.c:
            return "money" if isinstance(table.c[self.cost_column].type, Money) else "numeric"
        return "money"

    def _validate(self, table: Table | None) -> None:
        if not self.key:
            raise ValueError("a rollup needs a key naming its row")
        for column, source in self.sums.items():
            if not isinstance(source, str) or source not in SUMMABLE_FIELDS:
                raise ValueError(
                    f"sums[{column!r}] must name a CallRecord field, one of "
                    f"{sorted(SUMMABLE_FIELDS)} (got {source!r})"
                )
        if table is None:  # a table by name: checked against the database when applied
            return
        columns = table.c
        named = [*self.key, *self.sums, *self.values]
        if self.cost_column:
            named.append(self.cost_column)
        for column in named:
            if column not in columns:
                raise ValueError(f"{self.table} has no column {column!r}")

    # -- serialisation (spool, write-ahead log) ----------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "table",
            "table": self.table,
            "key": self.key,
            "sums": self.sums,
            "cost_column": self.cost_column,
            "values": self.values,
            "cost_type": self.cost_type,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TableRollup:
        if data.get("kind") != "table":
            raise ValueError(f"unknown rollup kind {data.get('kind')!r}")
        rollup = cls(
            data["table"],
            key=data["key"],
            sums=data.get("sums") or {},
            cost_column=data.get("cost_column"),
            values=data.get("values") or {},
        )
        object.__setattr__(rollup, "cost_type", data.get("cost_type", "money"))
        return rollup

    # -- applying -----------------------------------------------------------------------------
    def apply(self, session: Connection | Session, new_calls: list[CallRecord]) -> None:
        """Create the row if missing and add ``new_calls`` to it, in ``session``'s transaction."""
        from .sink import insert_ignore  # one dialect switch, kept in the sink

        money = self.cost_column if self.cost_type == "money" else None
        table = _resolve(self.table, session, money)
        self._validate(table)
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
