"""A plain Celery app for the end-to-end tests: tasks that call the (sandbox) OpenAI API.

Started as a real worker: ``celery -A tests.e2e.worker_app worker``.  It knows nothing of
tokenmeter's internals beyond ``install(app)``: this is what any application does.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery
from openai import OpenAI

import tokenmeter

app = Celery("tokenmeter_e2e")
app.conf.update(
    broker_url=os.environ["CELERY_BROKER_URL"],
    result_backend=os.environ["CELERY_RESULT_BACKEND"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    # task-usage events, for Flower (E2E_TASK_EVENTS=0: only ``celery worker -E`` turns them on)
    worker_send_task_events=os.environ.get("E2E_TASK_EVENTS", "1") == "1",
    task_default_queue=os.environ.get("E2E_QUEUE", "celery"),
)
if os.environ.get("E2E_OTEL") == "1":  # the application's own OpenTelemetry setup
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    SPANS = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(SPANS))
    trace.set_tracer_provider(provider)
    METRICS = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[METRICS]))

if os.environ.get("TOKENMETER_DISABLED") != "1":
    tokenmeter.install(app)

_client: OpenAI | None = None


def client() -> OpenAI:
    global _client
    if _client is None:
        _client = OpenAI(max_retries=0)  # OPENAI_BASE_URL / OPENAI_API_KEY from the env
    return _client


def _control() -> redis.Redis:
    return redis.Redis.from_url(os.environ["E2E_CONTROL_REDIS_URL"])


@app.task(name="e2e.mixed")
def mixed(i: int) -> int:
    """A few calls of different kinds, chosen by ``i``, so 200 tasks cover every path."""
    c = client()
    context = "Long shared context. " * (300 if i % 5 == 0 else 3)  # long ones get cached
    prompt = f"{context}Task {i}: suggest a handmade gift."
    calls = 0
    c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}])
    calls += 1
    if i % 3 == 0:
        stream = c.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}], stream=True
        )
        for _ in stream:
            pass
        calls += 1
    if i % 4 == 0:
        c.embeddings.create(model="text-embedding-3-small", input=[prompt[:200]])
        calls += 1
    if i % 7 == 0:
        c.images.generate(model="dall-e-3", prompt="a knitted fox", n=1, size="1024x1024")
        calls += 1
    if i % 11 == 0:
        c.chat.completions.create(model="o3-mini", messages=[{"role": "user", "content": prompt}])
        calls += 1
    return calls


@app.task(name="e2e.otel_work")
def otel_work(i: int) -> str:
    """Calls inside the application's own span; returns that span's id (hex)."""
    from opentelemetry import trace

    with trace.get_tracer("e2e").start_as_current_span(f"app work {i}") as span:
        mixed(i)
        return format(span.get_span_context().span_id, "016x")


@app.task(name="e2e.otel_finished")
def otel_finished() -> dict[str, object]:
    """What the in-memory exporter and reader hold in this worker process."""
    spans = [
        {
            "name": s.name,
            "parent": format(s.parent.span_id, "016x") if s.parent else None,
            "attributes": dict(s.attributes or {}),
            "duration_ns": (s.end_time or 0) - (s.start_time or 0),
        }
        for s in SPANS.get_finished_spans()
    ]
    points: list[dict[str, object]] = []
    data = METRICS.get_metrics_data()
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "sum", None)
                    value = getattr(point, "value", None) if value is None else value
                    points.append(
                        {"name": metric.name, "attributes": dict(point.attributes), "value": value}
                    )
    return {"spans": spans, "metrics": points}


@app.task(name="e2e.hold")
def hold(tag: str) -> int:
    """Two calls, then wait to be released (or killed); one more call when released."""
    c = client()
    for n in range(2):
        c.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"{tag} call {n}"}]
        )
    control = _control()
    control.rpush(f"e2e:held:{tag}", os.getpid())
    control.blpop([f"e2e:go:{tag}"], timeout=120)
    c.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": f"{tag} final call"}]
    )
    return os.getpid()


@app.task(name="e2e.sleepy")
def sleepy(ms: int) -> None:
    """No OpenAI call: lets a test keep a worker busy."""
    time.sleep(ms / 1000)
