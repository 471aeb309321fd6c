"""Celery tasks tokenmeter adds to the application it is installed on (``tokenmeter.install``).

``tokenmeter.audit`` runs :func:`tokenmeter.reporting.audit.run` (the same audit as
``tokenmeter audit``), keeps the run in ``tokenmeter_audits`` and sets the
``tokenmeter_audit_*`` Prometheus gauges.  Schedule it with beat, daily, after the provider's
data for the day has settled::

    from celery.schedules import crontab

    app.conf.beat_schedule["tokenmeter-audit"] = {
        "task": "tokenmeter.audit",
        "schedule": crontab(hour=2, minute=0),  # UTC days: the Costs API's buckets
        "kwargs": {"since_s": 3 * 86400},
    }

The admin key is read from ``OPENAI_ADMIN_KEY`` in the worker's environment, never passed as
an argument (arguments are stored by result backends and shown by Flower).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery

logger = logging.getLogger("tokenmeter.audit")
AUDIT_TASK = "tokenmeter.audit"


def audit(
    since_s: int = 3 * 86400,
    bucket: str = "1d",
    by: str = "model",
    settle_s: int = 3600,
    default_project: str | None = None,
    base_url: str | None = None,
) -> dict[str, Any]:
    """Audit the last ``since_s`` seconds; a JSON-able summary (the run itself is stored)."""
    from tokenmeter import metrics

    from . import audit as auditing

    groups = tuple(g for g in by.split(",") if g)
    try:
        report = auditing.run(
            since_s=since_s,
            bucket=bucket,
            groups=groups,
            settle_s=settle_s,
            default_project=default_project,
            base_url=base_url,
        )
    except auditing.AuditError as exc:
        metrics.audit_gauges().failed()
        logger.error("tokenmeter audit could not be made: %s", exc)
        raise
    unexplained = auditing.unexplained(report)
    metrics.audit_gauges().observe(unexplained, report.clean, time.time())
    if not report.clean:
        logger.warning(
            "tokenmeter audit: %d differences with the provider's books (%s)",
            len(report.differences),
            ", ".join(f"{k} {v}" for k, v in unexplained.items() if v),
        )
    return {
        "clean": report.clean,
        "compared_buckets": report.compared,
        "skipped_open_buckets": len(report.skipped),
        "dollar_days_compared": report.days_compared,
        "differences": len(report.differences),
        "unexplained": {k: str(v) for k, v in unexplained.items()},
    }


def register(app: Celery) -> None:
    """Add ``tokenmeter.audit`` to ``app`` (lazily: the app is not finalized by this)."""
    app.task(name=AUDIT_TASK, ignore_result=False)(audit)
