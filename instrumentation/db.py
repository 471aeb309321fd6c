"""Engines and sessions, created lazily once per process.

A forked worker must not reuse its parent's pooled connections, so the engine is keyed by
process id: the first use in a child builds a fresh one, and ``dispose_after_fork()`` (wired to
Celery's ``worker_process_init``) drops the inherited pool without closing the parent's sockets.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from .settings import get_settings

_lock = threading.Lock()
_engines: dict[tuple[int, str, bool], Engine] = {}


def normalize_url(url: str) -> str:
    """Let users write plain ``postgresql://`` URLs; we drive PostgreSQL with psycopg 3."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")  # several worker processes share one file
    cur.execute("PRAGMA journal_mode=WAL")
    cur.close()


def _sqlite_readonly_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(
    url: str, *, echo: bool = False, connect_timeout_s: float = 5.0, readonly: bool = False
) -> Engine:
    """Build an engine for ``url`` with the settings tokenmeter relies on.

    ``readonly`` (reports): SQLite opens the file read-only and creates or changes nothing.
    """
    url = normalize_url(url)
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"echo": echo, "future": True}
    if parsed.get_backend_name() == "sqlite":
        if readonly and parsed.database and parsed.database != ":memory:":
            url = f"sqlite:///file:{Path(parsed.database).resolve()}?mode=ro&uri=true"
        elif parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs["pool_pre_ping"] = True
        if parsed.get_backend_name() == "postgresql":  # a blackholed host must not hang a task
            kwargs["connect_args"] = {"connect_timeout": max(1, round(connect_timeout_s))}
    engine = create_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_readonly_pragmas if readonly else _sqlite_pragmas)
    return engine


def get_engine(url: str | None = None, *, readonly: bool = False) -> Engine:
    """The engine for ``url`` (default: the ledger's ``DATABASE_URL``) in this process."""
    url = normalize_url(url or get_settings().ledger_url)
    key = (os.getpid(), url, readonly)
    engine = _engines.get(key)
    if engine is None:
        with _lock:
            engine = _engines.get(key)
            if engine is None:
                settings = get_settings()
                engine = make_engine(
                    url,
                    echo=settings.database_echo,
                    connect_timeout_s=settings.database_timeout_s,
                    readonly=readonly,
                )
                _engines[key] = engine
    return engine


def dispose_after_fork() -> None:
    """Forget engines inherited from a parent process (their sockets stay the parent's)."""
    pid = os.getpid()
    with _lock:
        for key in [k for k in _engines if k[0] != pid]:
            _engines.pop(key).dispose(close=False)


def dispose_all() -> None:
    """Close every engine of this process (tests, shutdown)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any error."""
    factory = sessionmaker(get_engine(url), expire_on_commit=False)
    with factory.begin() as session:
        yield session
