"""Alembic environment of the application's tables: one code path for SQLite and PostgreSQL."""

from __future__ import annotations

from logging.config import fileConfig
from typing import Any

from alembic import context

from models.settings import get_settings
from models.tables import Base
from tokenmeter.db import make_engine, normalize_url
from tokenmeter.migrate import compare_type, only_tables_of

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    return normalize_url(
        context.get_x_argument(as_dictionary=True).get("url")
        or config.attributes.get("url")
        or get_settings().database_url
    )


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=compare_type,
        include_name=only_tables_of(target_metadata),  # tokenmeter's tables are its own chain
        render_as_batch=True,  # SQLite cannot ALTER/DROP columns in place
        **kwargs,
    )


def run_migrations_offline() -> None:
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # handed in by tests / the CLI
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as conn:
            _configure(connection=conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
