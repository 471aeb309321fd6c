"""Show each task's OpenAI usage in Flower.

The worker side (``tokenmeter.celery_signals``) sends a ``task-usage`` event with the
task's totals when the task finishes, if task events are on (``worker_send_task_events=True``).
Celery's event state keeps the fields of every event of a task, but Flower's task page and
``/api/tasks`` only show the fields named in ``Task._fields``; :func:`register` adds ours.

Run Flower with tokenmeter's config file, which calls :func:`register`::

    CONF=$(python -c 'import tokenmeter.reporting.flower as f; print(f.CONF)')
    celery -A tasks flower --basic-auth=meter:change-me --conf="$CONF"

Flower 2.x serves its HTTP API (``/api/tasks``) only to authenticated clients: add
``--basic-auth=user:password`` (or another of Flower's auth options), or set
``FLOWER_UNAUTHENTICATED_API=true`` on a trusted machine only.
"""

from __future__ import annotations

from pathlib import Path

from celery.events.state import Task

#: Fields of the ``task-usage`` event, in display order.
USAGE_FIELDS = (
    "openai_calls",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "image_count",
    "cost_usd",
)

#: A Flower config file that registers the usage fields.
CONF = str(Path(__file__).with_name("flowerconfig.py"))


def register() -> None:
    """Make Flower's task views and API include the usage fields (idempotent)."""
    for name in USAGE_FIELDS:
        if not hasattr(Task, name):
            setattr(Task, name, None)  # tasks without a usage event show nothing
    Task._fields = tuple(dict.fromkeys((*Task._fields, *USAGE_FIELDS)))
    Task._info_fields = tuple(dict.fromkeys((*Task._info_fields, *USAGE_FIELDS)))
