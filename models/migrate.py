"""Run the alembic migrations from Python (CLI, tests, the demo)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from models.db import normalize_url
from models.settings import PROJECT_ROOT, get_settings


def alembic_config(url: str | None = None) -> Config:
    cfg = Config(str(PROJECT_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(PROJECT_ROOT / "alembic"))
    cfg.attributes["url"] = normalize_url(url or get_settings().database_url)
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Bring the database at ``url`` (default ``DATABASE_URL``) up to ``revision``."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def check(url: str | None = None) -> None:
    """Raise if the tables in ``models`` and the migrations disagree (``alembic check``)."""
    command.check(alembic_config(url))
