"""Prometheus metrics: exact counters for what was recorded, scraped over HTTP."""

from __future__ import annotations

import socket
from decimal import Decimal

import httpx
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tokenmeter.context import CallRecord
from tokenmeter.metrics import Metrics, serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def served_scrape(
    registry: CollectorRegistry,
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``registry`` served on a free port (tokenmeter's ``serve``) and scraped once."""
    port = _free_port()
    server, thread = serve(port, registry)
    try:
        return scrape(port)
    finally:
        server.shutdown()
        thread.join(timeout=5)


def test_counters_match_the_recorded_calls_exactly() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    calls = [
        CallRecord(
            operation="chat",
            response_model="gpt-4o-mini",
            task_name="scan",
            input_tokens=300,
            cached_input_tokens=128,
            output_tokens=40,
            cost_usd=Decimal("0.0000549"),
            latency_ms=120.0,
        ),
        CallRecord(
            operation="chat",
            response_model="gpt-4o-mini",
            task_name="scan",
            input_tokens=100,
            output_tokens=10,
            reasoning_tokens=0,
            cost_usd=Decimal("0.000021"),
            latency_ms=80.0,
        ),
        CallRecord(
            operation="image",
            requested_model="dall-e-3",
            task_name="commission",
            image_count=2,
            cost_usd=Decimal("0.08"),
            latency_ms=3000.0,
        ),
        CallRecord(
            operation="chat",
            requested_model="gpt-4o-mini",
            task_name="scan",
            status="error",
            error_type="RateLimitError",
            usage_reported=False,
            cost_usd=Decimal(0),
            latency_ms=5.0,
        ),
        CallRecord(
            operation="chat",
            response_model="mystery",
            task_name="scan",
            input_tokens=5,
            output_tokens=5,
            cost_usd=None,
        ),
    ]
    for call in calls:
        metrics.observe_call(call)
    got = served_scrape(registry)

    def value(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    assert (
        value(
            "tokenmeter_openai_calls_total",
            model="gpt-4o-mini",
            operation="chat",
            task="scan",
            status="ok",
        )
        == 2
    )
    assert (
        value(
            "tokenmeter_openai_calls_total",
            model="gpt-4o-mini",
            operation="chat",
            task="scan",
            status="error",
        )
        == 1
    )
    assert (
        value(
            "tokenmeter_openai_tokens_total",
            model="gpt-4o-mini",
            operation="chat",
            task="scan",
            category="input",
        )
        == 400
    )
    assert (
        value(
            "tokenmeter_openai_tokens_total",
            model="gpt-4o-mini",
            operation="chat",
            task="scan",
            category="cached_input",
        )
        == 128
    )
    assert value("tokenmeter_openai_images_total", model="dall-e-3", task="commission") == 2
    assert (
        value(
            "tokenmeter_openai_cost_usd_total",
            model="dall-e-3",
            operation="image",
            task="commission",
        )
        == 0.08
    )
    assert value("tokenmeter_openai_unpriced_calls_total", model="mystery", task="scan") == 1
    assert (
        value("tokenmeter_openai_latency_seconds_count", model="dall-e-3", operation="image") == 1
    )


def test_a_label_no_utf8_carries_never_breaks_the_scrape() -> None:
    """A task or model name with a lone surrogate (decoded from bytes that are not UTF-8) is
    exported as its escape; the scrape, and every other series, still work."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for task, model in (("demo.\udcff", "gpt-\ud800"), ("scan", "gpt-4o-mini")):
        metrics.observe_call(
            CallRecord(operation="chat", response_model=model, task_name=task, input_tokens=7)
        )
    got = served_scrape(registry)
    calls = {
        dict(labels)["task"]: (dict(labels)["model"], value)
        for (name, labels), value in got.items()
        if name == "tokenmeter_openai_calls_total"
    }
    assert calls == {"demo.\\udcff": ("gpt-\\ud800", 1.0), "scan": ("gpt-4o-mini", 1.0)}
