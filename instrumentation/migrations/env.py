"""Alembic environment of tokenmeter's own tables (the ledger), in a user's database.

Its version table is ``tokenmeter_alembic_version`` and it looks only at tokenmeter's tables,
so a user's own Alembic history and tables are never read or changed.
"""

from __future__ import annotations

from typing import Any

from alembic import context

from tokenmeter.db import make_engine
from tokenmeter.ledger import LedgerBase
from tokenmeter.migrate import VERSION_TABLE, compare_type, only_tables_of

config = context.config
target_metadata = LedgerBase.metadata


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        include_name=only_tables_of(target_metadata),
        compare_type=compare_type,
        render_as_batch=True,  # SQLite cannot ALTER/DROP columns in place
        **kwargs,
    )


def run_migrations_offline() -> None:
    _configure(url=config.attributes["url"], literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(config.attributes["url"])
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
