"""Celery settings, from the environment with embedded defaults that need no server.

Default broker: kombu's filesystem transport under ``var/broker`` (works across the worker's
processes and beat, no server to run); results in ``var/results``.  In production set
``CELERY_BROKER_URL`` / ``CELERY_RESULT_BACKEND`` to Redis (tokenmeter then also keeps its
write-ahead log and spool there).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from models.settings import get_settings


def filesystem_transport_options(var_dir: Path) -> dict[str, Any]:
    """Options of the embedded broker in ``var_dir``: a worker and its clients share them."""
    folder = var_dir / "broker"
    for sub in ("queue", "processed", "control"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "processed_folder": str(folder / "processed"),
        "control_folder": str(folder / "control"),
        "store_processed": False,
    }


_settings = get_settings()
_var = Path(os.environ.get("TOKENMETER_VAR_DIR", "var")).resolve()

broker_url = _settings.celery_broker_url or "filesystem://"
if broker_url.startswith("filesystem://"):
    broker_transport_options = filesystem_transport_options(_var)
result_backend = _settings.celery_result_backend or f"file://{_var / 'results'}"
if result_backend.startswith("file://"):
    Path(result_backend.removeprefix("file://")).mkdir(parents=True, exist_ok=True)

# One queue per deployment where several share a broker (CELERY_TASK_DEFAULT_QUEUE).
task_default_queue = os.environ.get("CELERY_TASK_DEFAULT_QUEUE", "celery")
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_expires = 24 * 3600
timezone = "UTC"
enable_utc = True

# Redelivered, never lost: ack after the task ran, requeue if its worker process died.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
task_soft_time_limit = 300
task_time_limit = 360
broker_connection_retry_on_startup = True

# Events for Flower (tokenmeter adds a task-usage event per task).
worker_send_task_events = True
task_send_sent_event = True

beat_schedule = {
    "promotion-scan": {
        "task": "tasks.promotion_scan",
        "schedule": _settings.promotion_interval_s,
    },
}
beat_schedule_filename = str(_var / "celerybeat-schedule")
