"""The Celery app, configured from ``celeryconfig`` and metered by tokenmeter."""

from __future__ import annotations

from celery import Celery

import tokenmeter

app = Celery("tasks")
app.config_from_object("celeryconfig")
metering = tokenmeter.install(app)
