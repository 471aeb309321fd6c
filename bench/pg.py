"""Throwaway PostgreSQL databases for the benchmarks, the reconciliation run and the tests."""

from __future__ import annotations

import os
import uuid

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url


def create_database(server_url: str, prefix: str) -> str:
    """Create an empty database ``<prefix>_<random>`` on ``server_url``'s server; its URL."""
    admin = make_url(server_url)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return admin.set(database=name).render_as_string(hide_password=False)


def drop_database(server_url: str, url: str) -> None:
    """Drop the database of ``url`` (from ``server_url``), even with connections still open."""
    engine = create_engine(make_url(server_url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    finally:
        engine.dispose()


#: The PostgreSQL server the benches make their throwaway databases on.
SERVER_URL = os.environ.get(
    "TOKENMETER_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
