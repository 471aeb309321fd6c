"""The Celery app the throughput benchmark runs: one task making K chat calls.

Metering is on unless ``TOKENMETER_DISABLED=1``; the write-ahead log follows
``TOKENMETER_WRITE_AHEAD``.  ``BENCH_LATENCY_MS`` asks the sandbox to answer that slowly,
to model a real provider's latency.
"""

from __future__ import annotations

import os
import time

from celery import Celery
from openai import OpenAI

app = Celery("tokenmeter_bench")
app.conf.update(
    broker_url=os.environ["CELERY_BROKER_URL"],
    result_backend=os.environ["CELERY_RESULT_BACKEND"],
    task_acks_late=True,
    worker_prefetch_multiplier=4,
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
)
if os.environ.get("TOKENMETER_DISABLED") != "1":
    import tokenmeter

    tokenmeter.install(app)

_client: OpenAI | None = None
_latency = int(os.environ.get("BENCH_LATENCY_MS", "0"))
_headers = {"X-Sandbox-Fault": f"slow={_latency}"} if _latency else None


@app.task(name="bench.calls")
def calls(k: int) -> float:
    """K chat calls; returns when the task's work ended (the flush-latency bench's start)."""
    global _client
    if _client is None:
        _client = OpenAI(max_retries=0)
    for n in range(k):
        _client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": f"rate post {n}"}],
            extra_headers=_headers,
        )
    return time.time()
