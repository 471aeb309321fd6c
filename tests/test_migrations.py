"""The migration chain builds any database from empty and runs back and forth on real data."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine, inspect, text

import tokenmeter.migrate as ledger
from models import migrate

REVISIONS = ["0001_initial", "0002_scanned_post_usage", "0003_openai_calls_ledger"]
VERSION_TABLES = {"alembic_version", "tokenmeter_alembic_version"}
LEDGER_TABLES = {
    "openai_calls",
    "tokenmeter_pending_rollups",
    "tokenmeter_ledger",
    "tokenmeter_audits",
    "tokenmeter_daily_usage",
    "tokenmeter_daily_scopes",
}  # its own
USAGE_COLUMNS = {"agent_model", "prompt_tokens", "completion_tokens", "total_cost_usd"}


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - VERSION_TABLES
    finally:
        engine.dispose()


def _columns(url: str, table: str) -> set[str]:
    engine = create_engine(url)
    try:
        return {c["name"] for c in inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(empty_db_url: str) -> None:
    migrate.upgrade(empty_db_url)
    assert _tables(empty_db_url) == {
        "pipeline_runs",
        "pipeline_run_usages",
        "agent_scanned_posts",
        *LEDGER_TABLES,
    }
    migrate.downgrade(empty_db_url, "base")
    assert _tables(empty_db_url) == set()
    migrate.upgrade(empty_db_url)
    assert "openai_calls" in _tables(empty_db_url)


def test_each_revision_steps_down_alone(empty_db_url: str) -> None:
    for rev in REVISIONS:
        migrate.upgrade(empty_db_url, rev)
    for previous in reversed(REVISIONS[:-1]):
        migrate.downgrade(empty_db_url, previous)
    assert "openai_calls" in _tables(empty_db_url)  # the ledger is not the app's to drop
    assert not (_columns(empty_db_url, "agent_scanned_posts") & USAGE_COLUMNS)
    migrate.downgrade(empty_db_url, "base")
    assert _tables(empty_db_url) == set()


def _version(url: str, table: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(f"SELECT version_num FROM {table}")).scalar()
    finally:
        engine.dispose()


def test_ledger_chain_leaves_a_users_alembic_history_alone(empty_db_url: str) -> None:
    """``tokenmeter migrate`` in a database with the user's own tables and Alembic history."""
    engine = create_engine(empty_db_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
        conn.execute(text("INSERT INTO alembic_version VALUES ('users_own_rev_7')"))
        conn.execute(text("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total NUMERIC(10,2))"))
    engine.dispose()
    ledger.upgrade(empty_db_url)
    ledger.check(empty_db_url)  # the user's tables are not the ledger's business
    assert _version(empty_db_url, "alembic_version") == "users_own_rev_7"
    assert _version(empty_db_url, "tokenmeter_alembic_version") == ledger.head()
    assert _tables(empty_db_url) == {"invoices", *LEDGER_TABLES}
    ledger.downgrade(empty_db_url, "base")
    assert _tables(empty_db_url) == {"invoices"}
    assert _version(empty_db_url, "alembic_version") == "users_own_rev_7"


def test_a_ledger_created_by_the_old_application_chain_is_adopted(empty_db_url: str) -> None:
    """Before the ledger had its own chain, the app's 0003 created it: its rows are kept."""
    migrate.upgrade(empty_db_url)
    ledger.downgrade(empty_db_url, "tm0001_openai_calls")  # the table as 0003 created it
    engine = create_engine(empty_db_url)
    with engine.begin() as conn:  # what such a database looks like: no tokenmeter version
        conn.execute(text("DROP TABLE tokenmeter_alembic_version"))
        conn.execute(
            text(
                "INSERT INTO openai_calls (request_id, created_at, execution_id, seq, operation,"
                " attempt, stream, input_tokens, cached_input_tokens, input_image_tokens,"
                " output_tokens, reasoning_tokens, image_count, usage_reported, status)"
                " VALUES ('req_old', :ts, 'e1', 0, 'chat', 0, false, 12, 0, 0, 3, 0, 0, true,"
                " 'ok')"
            ),
            {"ts": datetime(2026, 1, 2, tzinfo=UTC)},
        )
    engine.dispose()
    assert _version(empty_db_url, "alembic_version") == "0003_openai_calls_ledger"
    migrate.upgrade(empty_db_url)
    assert _version(empty_db_url, "tokenmeter_alembic_version") == ledger.head()
    engine = create_engine(empty_db_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT request_id, input_tokens FROM openai_calls")).all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [("req_old", 12)]


def test_models_and_migrations_agree(empty_db_url: str) -> None:
    migrate.upgrade(empty_db_url)
    migrate.check(empty_db_url)  # raises alembic.util.exc.AutogenerateDiffsDetected


def test_ledger_indexes_exist(empty_db_url: str) -> None:
    migrate.upgrade(empty_db_url)
    engine = create_engine(empty_db_url)
    try:
        indexes = {
            ix["name"]: ix["column_names"] for ix in inspect(engine).get_indexes("openai_calls")
        }
    finally:
        engine.dispose()
    assert indexes["ix_openai_calls_created_at"] == ["created_at"]
    assert indexes["ix_openai_calls_model"] == ["model"]
    assert indexes["ix_openai_calls_task_id"] == ["task_id"]
    assert indexes["ix_openai_calls_scope"] == ["scope_kind", "scope_ref"]


def test_rows_from_before_usage_tracking_survive(empty_db_url: str) -> None:
    """Rows written at revision 1 keep their data through upgrade and downgrade."""
    migrate.upgrade(empty_db_url, "0001_initial")
    assert not (_columns(empty_db_url, "agent_scanned_posts") & USAGE_COLUMNS)
    scanned = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    engine = create_engine(empty_db_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO agent_scanned_posts (post_id, subreddit, promoted, dry_run, "
                "post_title, post_score, agent_ratings, scanned_at) VALUES "
                "('abc123', 'crafts', true, false, 'Old post', 42, '{\"fit\": 8}', :ts)"
            ),
            {"ts": scanned},
        )
        conn.execute(
            text(
                "INSERT INTO pipeline_runs (id, status, config, start_time) "
                "VALUES (7, 'completed', '{\"commission\": true}', :ts)"
            ),
            {"ts": scanned},
        )
        conn.execute(
            text(
                "INSERT INTO pipeline_run_usages (pipeline_run_id, idea_model, prompt_tokens, "
                "completion_tokens) VALUES (7, 'gpt-4o-mini', 800, 200)"
            )
        )
    engine.dispose()

    migrate.upgrade(empty_db_url)
    engine = create_engine(empty_db_url)
    with engine.connect() as conn:
        post = conn.execute(
            text(
                "SELECT post_id, subreddit, post_title, post_score, agent_model, prompt_tokens, "
                "completion_tokens, total_cost_usd FROM agent_scanned_posts"
            )
        ).one()
        run_usage = conn.execute(
            text("SELECT prompt_tokens, completion_tokens FROM pipeline_run_usages")
        ).one()
    engine.dispose()
    assert post[:4] == ("abc123", "crafts", "Old post", 42)
    assert post.agent_model is None
    assert (post.prompt_tokens, post.completion_tokens) == (0, 0)
    assert post.total_cost_usd == 0
    assert tuple(run_usage) == (800, 200)

    migrate.downgrade(empty_db_url, "0001_initial")
    assert not (_columns(empty_db_url, "agent_scanned_posts") & USAGE_COLUMNS)
    engine = create_engine(empty_db_url)
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT post_id, post_title, post_score FROM agent_scanned_posts")
        ).all()
        runs = conn.execute(text("SELECT id, status FROM pipeline_runs")).all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [("abc123", "Old post", 42)]
    assert [tuple(r) for r in runs] == [(7, "completed")]


def test_cli_migrate(sqlite_url: str) -> None:
    from typer.testing import CliRunner

    from tokenmeter.reporting.cli import app

    result = CliRunner().invoke(app, ["migrate", "--database-url", sqlite_url])
    assert result.exit_code == 0, result.output
    assert _tables(sqlite_url) == LEDGER_TABLES  # the library's ledger, nothing of the app


@pytest.mark.postgres
def test_plain_postgresql_url_is_driven_by_psycopg(pg_url: str) -> None:
    plain = pg_url.replace("postgresql+psycopg://", "postgresql://")
    migrate.upgrade(plain)
    assert "openai_calls" in _tables(pg_url)


def test_billing_dimensions_revision_keeps_historical_rows(empty_db_url: str) -> None:
    """tm0004 adds the tier, batch, cache-write/audio/tool counts and price source: a row
    written before it keeps its numbers and reads 0 / NULL in the new columns, both ways."""
    ledger.upgrade(empty_db_url, "tm0003_pending_rollups")
    engine = create_engine(empty_db_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO openai_calls (request_id, created_at, execution_id, seq, operation,"
                " attempt, stream, input_tokens, cached_input_tokens, input_image_tokens,"
                " output_tokens, reasoning_tokens, image_count, usage_reported, status,"
                " price_version, model)"
                " VALUES ('req_before', :ts, 'e1', 1, 'chat', 0, false, 120, 64, 0, 30, 0, 0,"
                " true, 'ok', 'gpt-4o-mini@2024-07-18', 'gpt-4o-mini')"
            ),
            {"ts": datetime(2026, 11, 2, tzinfo=UTC)},
        )
    engine.dispose()
    ledger.upgrade(empty_db_url)
    columns = _columns(empty_db_url, "openai_calls")
    assert {"service_tier", "batch", "cache_write_tokens", "web_search_calls"} <= columns
    engine = create_engine(empty_db_url)
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT input_tokens, cached_input_tokens, output_tokens, price_version,"
                " service_tier, batch, cache_write_tokens, web_search_calls, price_source"
                " FROM openai_calls"
            )
        ).one()
    engine.dispose()
    assert tuple(row) == (120, 64, 30, "gpt-4o-mini@2024-07-18", None, False, 0, 0, None)
    ledger.downgrade(empty_db_url, "tm0003_pending_rollups")
    assert "service_tier" not in _columns(empty_db_url, "openai_calls")
    engine = create_engine(empty_db_url)
    with engine.connect() as conn:
        kept = conn.execute(text("SELECT request_id, input_tokens FROM openai_calls")).one()
    engine.dispose()
    assert tuple(kept) == ("req_before", 120)
