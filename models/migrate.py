"""Migrate the application's database: tokenmeter's ledger, then the application's tables.

The ledger's chain is the library's (``tokenmeter.migrate``, its own version table); the
application's chain is ``alembic/`` with the usual ``alembic_version``: the same split any
application using tokenmeter has.
"""

from __future__ import annotations

from alembic import command
from alembic.config import Config

import tokenmeter.migrate as ledger
from models.settings import PROJECT_ROOT, get_settings
from tokenmeter.db import normalize_url


def alembic_config(url: str | None = None) -> Config:
    cfg = Config(str(PROJECT_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(PROJECT_ROOT / "alembic"))
    cfg.attributes["url"] = normalize_url(url or get_settings().database_url)
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Bring the ledger to its head and the application's tables to ``revision``."""
    ledger.upgrade(url)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    """Step the application's tables down to ``revision``; at ``base`` drop the ledger too."""
    command.downgrade(alembic_config(url), revision)
    if revision == "base":
        ledger.downgrade(url, "base")


def check(url: str | None = None) -> None:
    """Raise if the tables and the migrations disagree (``alembic check``), for both chains."""
    ledger.check(url)
    command.check(alembic_config(url))


if __name__ == "__main__":
    upgrade()
    print(f"database at {ledger.redact(get_settings().database_url)} migrated to head")
