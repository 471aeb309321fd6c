"""Daily totals of the ledger, kept by the database itself: ``tokenmeter_daily_usage``.

One row per UTC day and (model, task, scope kind, status, served tier, project) with every
sum the usage summary reports.  Triggers on ``openai_calls`` keep it equal to the ledger in the same
transaction, whatever writes the ledger (the sink's COPY, an ORM insert, a hand-written
``UPDATE`` or ``DELETE``): on PostgreSQL one aggregated upsert per statement (transition
tables, keys locked in one order, so concurrent writers cannot deadlock); on SQLite a trigger
per row.  A 30-day summary then reads 30 days of totals instead of every call.  Existing rows
are summed in at upgrade.  ``''`` stands for no value in the key columns (NULL cannot be in a
primary key).

Revision ID: tm0008_daily_usage
Revises: tm0007_audits
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "tm0008_daily_usage"
down_revision: str | None = "tm0007_audits"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "tokenmeter_daily_usage"
KEYS = (  # (column, width): the ledger's own widths, so every ledger value fits
    ("model", 128),
    ("task_name", 255),
    ("scope_kind", 64),
    ("status", 16),
    ("service_tier", 32),
    ("project", 128),
)
#: (column, SQL of one ledger row's contribution, with {r} for the row)
SUMS = (
    ("calls", "1"),
    ("errors", "CASE WHEN {r}.status = 'error' THEN 1 ELSE 0 END"),
    ("input_tokens", "{r}.input_tokens"),
    ("cached_input_tokens", "{r}.cached_input_tokens"),
    ("output_tokens", "{r}.output_tokens"),
    ("reasoning_tokens", "{r}.reasoning_tokens"),
    ("image_count", "{r}.image_count"),
    ("cache_write_tokens", "{r}.cache_write_tokens"),
    ("input_audio_tokens", "{r}.input_audio_tokens"),
    ("output_audio_tokens", "{r}.output_audio_tokens"),
    ("web_search_calls", "{r}.web_search_calls"),
    ("file_search_calls", "{r}.file_search_calls"),
    ("priced_calls", "CASE WHEN {r}.cost_usd IS NULL THEN 0 ELSE 1 END"),
    (
        "unpriced_calls",
        "CASE WHEN {r}.cost_usd IS NULL AND {r}.status NOT IN ('error', 'blocked') "
        "THEN 1 ELSE 0 END",
    ),
    ("cost_usd", "COALESCE({r}.cost_usd, 0)"),
)
KEY_NAMES = ", ".join(["day", *(k for k, _ in KEYS)])


def _money() -> sa.types.TypeEngine:
    # the ledger's Money: NUMERIC(20, 10) on PostgreSQL, scaled BIGINT (10^-10 USD) on SQLite
    return sa.Numeric(20, 10).with_variant(sa.BigInteger(), "sqlite")


def _set_clause(target: str) -> str:
    return ", ".join(f"{name} = {target}.{name} + excluded.{name}" for name, _ in SUMS)


def _pg_function(name: str, parts: list[tuple[str, int]]) -> str:
    """A statement-level trigger function adding (+1) or taking away (-1) the rows of each
    transition table in ``parts``."""
    columns = ", ".join([KEY_NAMES, *(n for n, _ in SUMS)])
    statements = []
    for source, sign in parts:
        keys = ", ".join(f"COALESCE(r.{k}, '')" for k, _ in KEYS)
        sums = ", ".join(f"{sign} * SUM({expr.format(r='r')})" for _, expr in SUMS)
        statements.append(
            f"INSERT INTO {TABLE} AS d ({columns}) "
            f"SELECT (r.created_at AT TIME ZONE 'UTC')::date, {keys}, {sums} FROM {source} r "
            f"GROUP BY 1, 2, 3, 4, 5, 6, 7 ORDER BY 1, 2, 3, 4, 5, 6, 7 "
            f"ON CONFLICT ({KEY_NAMES}) DO UPDATE SET {_set_clause('d')};"
        )
    body = "\n    ".join(statements)
    return (
        f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        f"BEGIN\n    {body}\n    RETURN NULL;\nEND $$;"
    )


def _sqlite_trigger(event: str, parts: list[tuple[str, int]]) -> str:
    columns = ", ".join([KEY_NAMES, *(n for n, _ in SUMS)])
    statements = []
    for row, sign in parts:
        keys = ", ".join(f"COALESCE({row}.{k}, '')" for k, _ in KEYS)
        sums = ", ".join(f"{sign} * ({expr.format(r=row)})" for _, expr in SUMS)
        statements.append(
            f"INSERT INTO {TABLE} ({columns}) VALUES (substr({row}.created_at, 1, 10), "
            f"{keys}, {sums}) ON CONFLICT ({KEY_NAMES}) DO UPDATE SET {_set_clause(TABLE)};"
        )
    return (
        f"CREATE TRIGGER tokenmeter_daily_{event.lower()} AFTER {event} ON openai_calls "
        f"FOR EACH ROW BEGIN {' '.join(statements)} END;"
    )


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("day", sa.Date(), nullable=False),
        *(sa.Column(k, sa.String(width), nullable=False, server_default="") for k, width in KEYS),
        *(
            sa.Column(n, sa.BigInteger(), nullable=False, server_default="0")
            for n, _ in SUMS
            if n != "cost_usd"
        ),
        sa.Column("cost_usd", _money(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("day", *(k for k, _ in KEYS), name="pk_tokenmeter_daily_usage"),
    )
    bind = op.get_bind()
    columns = ", ".join([KEY_NAMES, *(n for n, _ in SUMS)])
    keys = ", ".join(f"COALESCE(r.{k}, '')" for k, _ in KEYS)
    sums = ", ".join(f"SUM({expr.format(r='r')})" for _, expr in SUMS)
    if bind.dialect.name == "postgresql":
        day = "(r.created_at AT TIME ZONE 'UTC')::date"
    else:
        day = "substr(r.created_at, 1, 10)"
    op.execute(  # what the ledger holds already
        f"INSERT INTO {TABLE} ({columns}) SELECT {day}, {keys}, {sums} FROM openai_calls r "
        "GROUP BY 1, 2, 3, 4, 5, 6, 7"
    )
    if bind.dialect.name == "postgresql":
        op.execute(_pg_function("tokenmeter_daily_add", [("new_rows", 1)]))
        op.execute(_pg_function("tokenmeter_daily_remove", [("old_rows", -1)]))
        op.execute(_pg_function("tokenmeter_daily_change", [("old_rows", -1), ("new_rows", 1)]))
        op.execute(
            "CREATE TRIGGER tokenmeter_daily_insert AFTER INSERT ON openai_calls "
            "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT "
            "EXECUTE FUNCTION tokenmeter_daily_add()"
        )
        op.execute(
            "CREATE TRIGGER tokenmeter_daily_delete AFTER DELETE ON openai_calls "
            "REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT "
            "EXECUTE FUNCTION tokenmeter_daily_remove()"
        )
        op.execute(
            "CREATE TRIGGER tokenmeter_daily_update AFTER UPDATE ON openai_calls "
            "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT "
            "EXECUTE FUNCTION tokenmeter_daily_change()"
        )
    else:
        op.execute(_sqlite_trigger("INSERT", [("NEW", 1)]))
        op.execute(_sqlite_trigger("DELETE", [("OLD", -1)]))
        op.execute(_sqlite_trigger("UPDATE", [("OLD", -1), ("NEW", 1)]))


def downgrade() -> None:
    bind = op.get_bind()
    for event in ("insert", "delete", "update"):
        if bind.dialect.name == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS tokenmeter_daily_{event} ON openai_calls")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS tokenmeter_daily_{event}")
    if bind.dialect.name == "postgresql":
        for name in ("add", "remove", "change"):
            op.execute(f"DROP FUNCTION IF EXISTS tokenmeter_daily_{name}()")
    op.drop_table(TABLE)
