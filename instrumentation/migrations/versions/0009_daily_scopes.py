"""What each scope cost each UTC day, kept by the database itself: ``tokenmeter_daily_scopes``.

One row per UTC day and scope (kind, ref) with its calls and priced cost, kept equal to the
ledger by triggers on ``openai_calls`` in the same transaction as every write, as
``tokenmeter_daily_usage`` is (tm0008: one aggregated upsert per statement on PostgreSQL,
keys in one order; a trigger per row on SQLite).  The dashboard ranks its most expensive runs
and posts of a month from it instead of from every call, then reads those ten scopes' calls.
Calls outside any scope are not in it.  ``''`` stands for no ref.

Revision ID: tm0009_daily_scopes
Revises: tm0008_daily_usage
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "tm0009_daily_scopes"
down_revision: str | None = "tm0008_daily_usage"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "tokenmeter_daily_scopes"
KEYS = "day, scope_kind, scope_ref"
COLUMNS = f"{KEYS}, calls, cost_usd"
EVENTS = {  # event -> (transition table or row, sign) of each part
    "insert": (("new_rows", "NEW", 1),),
    "delete": (("old_rows", "OLD", -1),),
    "update": (("old_rows", "OLD", -1), ("new_rows", "NEW", 1)),
}


def _day(dialect: str, row: str) -> str:
    if dialect == "postgresql":
        return f"({row}.created_at AT TIME ZONE 'UTC')::date"
    return f"substr({row}.created_at, 1, 10)"


def _upsert(dialect: str, source: str, sign: int, *, per_row: bool) -> str:
    """One part of a trigger: add (sign 1) or take away (-1) the rows of ``source`` (a
    transition table on PostgreSQL, ``NEW``/``OLD`` on SQLite)."""
    if per_row:
        select = (
            f"SELECT {_day(dialect, source)}, {source}.scope_kind, "
            f"COALESCE({source}.scope_ref, ''), {sign}, {sign} * COALESCE({source}.cost_usd, 0) "
            f"WHERE {source}.scope_kind IS NOT NULL"
        )
    else:
        select = (
            f"SELECT {_day(dialect, 'r')}, r.scope_kind, COALESCE(r.scope_ref, ''), "
            f"{sign} * COUNT(*), {sign} * SUM(COALESCE(r.cost_usd, 0)) FROM {source} r "
            "WHERE r.scope_kind IS NOT NULL GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        )
    target = "d" if dialect == "postgresql" else TABLE
    alias = " AS d" if dialect == "postgresql" else ""
    return (
        f"INSERT INTO {TABLE}{alias} ({COLUMNS}) {select} ON CONFLICT ({KEYS}) DO UPDATE SET "
        f"calls = {target}.calls + excluded.calls, "
        f"cost_usd = {target}.cost_usd + excluded.cost_usd;"
    )


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("scope_kind", sa.String(64), nullable=False),
        sa.Column("scope_ref", sa.String(255), nullable=False, server_default=""),
        sa.Column("calls", sa.BigInteger(), nullable=False, server_default="0"),
        # the ledger's Money: NUMERIC(20, 10) on PostgreSQL, scaled BIGINT on SQLite
        sa.Column(
            "cost_usd",
            sa.Numeric(20, 10).with_variant(sa.BigInteger(), "sqlite"),
            nullable=False,
            server_default="0",
        ),
        sa.PrimaryKeyConstraint(
            "day", "scope_kind", "scope_ref", name="pk_tokenmeter_daily_scopes"
        ),
    )
    dialect = op.get_bind().dialect.name
    op.execute(  # what the ledger holds already
        f"INSERT INTO {TABLE} ({COLUMNS}) SELECT {_day(dialect, 'r')}, r.scope_kind, "
        "COALESCE(r.scope_ref, ''), COUNT(*), SUM(COALESCE(r.cost_usd, 0)) FROM openai_calls r "
        "WHERE r.scope_kind IS NOT NULL GROUP BY 1, 2, 3"
    )
    for event, parts in EVENTS.items():
        if dialect == "postgresql":
            body = "\n    ".join(_upsert(dialect, t, sign, per_row=False) for t, _, sign in parts)
            op.execute(
                f"CREATE FUNCTION tokenmeter_scopes_{event}() RETURNS trigger LANGUAGE plpgsql "
                f"AS $$\nBEGIN\n    {body}\n    RETURN NULL;\nEND $$;"
            )
            tables = " ".join(
                f"{'NEW' if t == 'new_rows' else 'OLD'} TABLE AS {t}" for t, _, _ in parts
            )
            op.execute(
                f"CREATE TRIGGER tokenmeter_scopes_{event} AFTER {event.upper()} ON openai_calls "
                f"REFERENCING {tables} FOR EACH STATEMENT "
                f"EXECUTE FUNCTION tokenmeter_scopes_{event}()"
            )
        else:
            body = " ".join(_upsert(dialect, row, sign, per_row=True) for _, row, sign in parts)
            op.execute(
                f"CREATE TRIGGER tokenmeter_scopes_{event} AFTER {event.upper()} ON openai_calls "
                f"FOR EACH ROW BEGIN {body} END;"
            )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for event in EVENTS:
        if dialect == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS tokenmeter_scopes_{event} ON openai_calls")
            op.execute(f"DROP FUNCTION IF EXISTS tokenmeter_scopes_{event}()")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS tokenmeter_scopes_{event}")
    op.drop_table(TABLE)
