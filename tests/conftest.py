"""Shared fixtures: databases on both backends.

PostgreSQL tests run against a throwaway database created for this test session and dropped
after it.  Under CI (``CI=true``) an unreachable server fails the run instead of skipping.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

import tokenmeter
from bench.pg import create_database, drop_database
from bench.redisdb import ClaimedDB, claimed_databases
from models import migrate
from models.db import dispose_all
from tests.helpers import CollectingSink, clear_settings, collecting_sink

PG_ADMIN_URL = os.environ.get(
    "TOKENMETER_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
# The Redis server of the tests (a db number, if given, is ignored: each run claims empty ones).
REDIS_SERVER_URL = re.sub(
    r"/\d*$", "", os.environ.get("TOKENMETER_TEST_REDIS_URL", "redis://127.0.0.1:6379")
)
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

# The loopback OpenAI/Reddit servers (fixtures `sandbox`, `openai_client`, `async_openai_client`).
pytest_plugins = ["tokenmeter.sandbox.pytest_plugin"]


def require_service(name: str, error: Exception) -> None:
    """Fail under CI, skip (loudly, shown by -ra) on a developer machine."""
    message = f"{name} unreachable: {error}"
    if IN_CI:
        pytest.fail(message + " (CI must run these tests; .ci/run starts the service)")
    pytest.skip(message)


@pytest.fixture(autouse=True)
def _restore_installation() -> Iterator[None]:
    """One tokenmeter installation per process: a test that replaces it gets it back after.

    ``_fresh_settings`` depends on it, so it is torn down after the test's environment is
    restored (the reinstalled integration reads the settings again).
    """
    from tokenmeter.celery_signals import active

    saved = active()
    yield
    if active() is not saved:
        tokenmeter.uninstall()
        if saved is not None:
            saved.install()


@pytest.fixture(autouse=True)
def _fresh_settings(
    _restore_installation: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
):
    """Every test sees settings read from its own environment and an isolated var dir."""
    var = tmp_path_factory.mktemp("var")
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{var / 'default.sqlite'}")
    monkeypatch.setenv("TOKENMETER_SPOOL_DIR", str(var / "spool"))
    monkeypatch.setenv("TOKENMETER_DATA_DIR", str(var))
    clear_settings()
    yield
    # what the test's tasks queued is written to the test's own database, not the next one's
    tokenmeter.flush(timeout=30)
    clear_settings()
    dispose_all()


@pytest.fixture
def no_installation() -> None:
    """No tokenmeter installation active (the demo app's, from importing it, is set aside)."""
    tokenmeter.uninstall()


@pytest.fixture(scope="session")
def redis_dbs() -> Iterator[list[ClaimedDB]]:
    """Four empty Redis databases claimed for this test session (never another run's)."""
    import redis

    try:
        redis.Redis.from_url(REDIS_SERVER_URL).ping()
    except Exception as exc:  # pragma: no cover - depends on the machine
        require_service("Redis", exc)
    with claimed_databases(REDIS_SERVER_URL, 4) as dbs:
        yield dbs


@pytest.fixture
def redis_db(redis_dbs: list[ClaimedDB]) -> ClaimedDB:
    """One of this session's Redis databases, emptied for this test."""
    redis_dbs[0].reset()
    return redis_dbs[0]


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session."""
    try:
        url = create_database(PG_ADMIN_URL, "tokenmeter_test")
    except Exception as exc:  # pragma: no cover - depends on the machine
        require_service("PostgreSQL", exc)
    try:
        yield url
    finally:
        dispose_all()
        drop_database(PG_ADMIN_URL, url)


def _reset_pg(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture
def pg_url(pg_server_url: str) -> Iterator[str]:
    """An empty PostgreSQL database (the session's, wiped before the test)."""
    _reset_pg(pg_server_url)
    yield pg_server_url
    dispose_all()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'usage.sqlite'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_db_url(request: pytest.FixtureRequest) -> str:
    """An empty database on each backend."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def db_url(empty_db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A database on each backend, migrated to head and set as DATABASE_URL."""
    migrate.upgrade(empty_db_url)
    monkeypatch.setenv("DATABASE_URL", empty_db_url)
    clear_settings()
    return empty_db_url


@pytest.fixture
def hooks() -> Iterator[CollectingSink]:
    """The openai client instrumented for the test, calls kept by a collecting sink."""
    from tokenmeter import batches, openai_hooks

    with collecting_sink() as sink:
        openai_hooks.instrument()
        try:
            yield sink
        finally:
            openai_hooks.uninstrument()
            batches._seen.clear()  # this process has read no batch output yet
