"""Create and upgrade tokenmeter's ledger in any database, beside a user's own tables.

tokenmeter's migrations ship inside the package (``tokenmeter/migrations``) and keep their own
version table, ``tokenmeter_alembic_version``: a user's Alembic history (``alembic_version``) and
tables are never read or changed.  ``tokenmeter migrate`` runs :func:`upgrade`.

Read commands call :func:`require_ledger` first: on a missing or unmigrated database it raises
:class:`LedgerUnavailable` with one line saying what to run, and creates or changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import BigInteger, Engine, MetaData, Numeric, inspect
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from .db import make_engine, normalize_url
from .money import MONEY_SCALE, Money
from .settings import get_settings

VERSION_TABLE = "tokenmeter_alembic_version"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
LEDGER_TABLE = "openai_calls"


class LedgerUnavailable(RuntimeError):
    """The ledger database is missing, unreachable or not migrated; the message says the fix."""


def compare_type(
    ctx: Any, inspected_column: Any, metadata_column: Any, inspected_type: Any, metadata_type: Any
) -> bool | None:
    """Alembic ``compare_type``: Money is NUMERIC(20,10) on PostgreSQL, scaled BIGINT on SQLite."""
    if isinstance(metadata_type, Money):
        if ctx.dialect.name == "sqlite":
            return not isinstance(inspected_type, BigInteger)
        return not (
            isinstance(inspected_type, Numeric)
            and (inspected_type.precision, inspected_type.scale) == (20, MONEY_SCALE)
        )
    return None  # Alembic's default comparison


def only_tables_of(metadata: MetaData) -> Callable[..., bool]:
    """Alembic ``include_name``: look only at ``metadata``'s tables (never a neighbour's)."""

    def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
        return type_ != "table" or name in metadata.tables

    return include_name


def _url(url: str | None) -> str:
    return normalize_url(url or get_settings().ledger_url)


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["url"] = _url(url)
    return cfg


def head() -> str:
    """The newest revision of tokenmeter's ledger."""
    revision = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert revision is not None
    return revision


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Create or upgrade the ledger at ``url`` (default ``DATABASE_URL``) to ``revision``."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def check(url: str | None = None) -> None:
    """Raise if the ledger's tables and its migrations disagree (``alembic check``)."""
    command.check(alembic_config(url))


def current(engine: Engine) -> str | None:
    """The ledger revision of the database behind ``engine`` (None: never migrated)."""
    with engine.connect() as conn:
        return MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE}
        ).get_current_revision()


def _sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def redact(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def require_ledger(url: str | None = None) -> Engine:
    """A read-only engine on a migrated ledger, or :class:`LedgerUnavailable`.

    Creates nothing: no file, no folder, no journal-mode switch on an existing SQLite file.
    """
    url = _url(url)
    fix = "run `tokenmeter migrate` (or set DATABASE_URL to the right database)"
    path = _sqlite_path(url)
    if path is not None and not path.is_file():
        raise LedgerUnavailable(f"no tokenmeter database at {path}: {fix}")
    engine = make_engine(url, readonly=True)
    try:
        revision = current(engine)
        has_ledger = inspect(engine).has_table(LEDGER_TABLE)
    except sa_exc.SQLAlchemyError as exc:
        engine.dispose()
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise LedgerUnavailable(f"cannot read the database at {redact(url)}: {reason}") from None
    if not has_ledger or revision is None:
        engine.dispose()
        raise LedgerUnavailable(f"the database at {redact(url)} has no tokenmeter ledger: {fix}")
    if revision != head():
        engine.dispose()
        raise LedgerUnavailable(
            f"the tokenmeter ledger at {redact(url)} is at revision {revision}, this version "
            f"needs {head()}: {fix}"
        )
    return engine
