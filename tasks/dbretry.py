"""Ride out a database outage inside a task, without redoing (or paying again for) its work.

A commission that has already bought its ideas and images, or a scan that has posted a comment,
must not be retried from the top because the database blinked: the step that needs the
database is retried where it stands, with exponential backoff and jitter, for up to
``APP_DB_OUTAGE_BUDGET_S`` seconds (150 by default: a typical failover), and only then does
the task fail, with :class:`DatabaseUnavailable` saying which step and for how long.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import exc as sa_exc
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)

from models.settings import get_settings

logger = logging.getLogger(__name__)
T = TypeVar("T")


class DatabaseUnavailable(RuntimeError):
    """The database stayed unreachable for the whole outage budget of a step."""


def is_outage(exc: BaseException) -> bool:
    """A lost or refused database connection (worth waiting for), not a bug or bad data."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(
        exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError)
    )


def _log_wait(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    logger.warning(
        "database unavailable (%s); retrying in %.1f s (attempt %d)",
        type(error).__name__,
        wait,
        state.attempt_number,
    )


def db_step(step: str, fn: Callable[[], T], *, budget_s: float | None = None) -> T:
    """Run ``fn`` (a database step), retrying it through an outage of up to ``budget_s``."""
    budget = get_settings().app_db_outage_budget_s if budget_s is None else budget_s
    retrying = Retrying(
        retry=retry_if_exception(is_outage),
        wait=wait_exponential_jitter(initial=0.5, max=15, jitter=1),
        stop=stop_after_delay(budget),
        before_sleep=_log_wait,
        reraise=True,
    )
    try:
        return retrying(fn)
    except Exception as exc:
        if is_outage(exc):
            raise DatabaseUnavailable(
                f"database unreachable for {budget:.0f} s while {step}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
        raise
