"""The Celery app the throughput benchmark runs: one task making K chat calls.

Metering is on unless ``TOKENMETER_DISABLED=1``; the write-ahead log follows
``TOKENMETER_WRITE_AHEAD``; ``BENCH_ABLATE=no-database`` skips the ledger's writes (the
throughput bench's parts of metering).  ``BENCH_OTEL=1`` traces the tasks and calls with
OpenTelemetry instead (the comparison the benchmark makes).  ``BENCH_LATENCY_MS`` asks the
sandbox to answer that slowly, to model a real provider's latency.
"""

from __future__ import annotations

import os
import time
from typing import Any

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

if os.environ.get("BENCH_ABLATE") == "no-database":  # bench/throughput.py's nodb and capture

    def _skip_the_database() -> None:
        """Every batch is priced and marked durable (the write-ahead file's ``done``, as after
        a commit) without a database write: metering less its ledger writes."""
        from tokenmeter.context import price_unpriced
        from tokenmeter.sink import DatabaseSink

        def flush_many(self: DatabaseSink, batches: list[Any]) -> None:
            for batch in batches:
                price_unpriced(batch.calls)
                self._run_hooks(batch, batch.calls)

        def flush(self: DatabaseSink, batch: Any) -> bool:
            flush_many(self, [batch])
            return True

        DatabaseSink.flush_many = flush_many  # type: ignore[method-assign]
        DatabaseSink.flush = flush  # type: ignore[method-assign]

    _skip_the_database()

if os.environ.get("BENCH_OTEL") == "1":  # the general tool, for comparison (tokenmeter off)
    from celery.signals import worker_process_init

    @worker_process_init.connect(weak=False)
    def _trace(**_: object) -> None:
        """OpenTelemetry's celery and openai instrumentations in each pool process (after the
        fork, as their documentation asks), spans batched to an exporter that keeps nothing."""
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.instrumentation.openai import OpenAIInstrumentor

        from bench.otel_discard import discarding_provider

        provider = discarding_provider()
        CeleryInstrumentor().instrument(tracer_provider=provider)
        OpenAIInstrumentor().instrument(tracer_provider=provider)


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
