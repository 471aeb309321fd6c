"""Prometheus metrics from the worker: calls, tokens by category, cost, errors, latency.

Labels: model, operation, task, status.  Cost is exported as a float counter because that is
what Prometheus stores; the ledger stays the exact record (Decimal), metrics are for graphs
and alerts.

Prefork workers: set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before the worker
starts (``install()`` does it when ``TOKENMETER_METRICS_PORT`` is set and the variable is not);
each child then writes its samples there and the main process serves all of them on
``TOKENMETER_METRICS_PORT`` (prometheus_client's multiprocess mode).
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    multiprocess,
    start_http_server,
)

from .context import CallRecord, UsageScope

TOKEN_CATEGORIES = {
    "input": "input_tokens",
    "cached_input": "cached_input_tokens",
    "image_input": "input_image_tokens",
    "output": "output_tokens",
    "reasoning": "reasoning_tokens",
}


class Metrics:
    """The metric families, in ``registry`` (default: prometheus_client's global one)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else REGISTRY
        labels = ["model", "operation", "task", "status"]
        self.calls = Counter("tokenmeter_openai_calls", "OpenAI API calls", labels, registry=r)
        self.tokens = Counter(
            "tokenmeter_openai_tokens",
            "Tokens billed, by category",
            ["model", "operation", "task", "category"],
            registry=r,
        )
        self.images = Counter(
            "tokenmeter_openai_images", "Images generated", ["model", "task"], registry=r
        )
        self.cost = Counter(
            "tokenmeter_openai_cost_usd",
            "Cost in USD (float; the ledger is exact)",
            ["model", "operation", "task"],
            registry=r,
        )
        self.unpriced = Counter(
            "tokenmeter_openai_unpriced_calls",
            "Billable calls with no known price",
            ["model", "task"],
            registry=r,
        )
        self.latency = Histogram(
            "tokenmeter_openai_latency_seconds",
            "Call latency",
            ["model", "operation"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=r,
        )

    def observe_call(self, call: CallRecord) -> None:
        model, task = call.model or "unknown", call.task_name or "none"
        self.calls.labels(model, call.operation, task, call.status).inc()
        for category, field in TOKEN_CATEGORIES.items():
            value = getattr(call, field)
            if value:
                self.tokens.labels(model, call.operation, task, category).inc(value)
        if call.image_count:
            self.images.labels(model, task).inc(call.image_count)
        if call.cost_usd is not None:
            self.cost.labels(model, call.operation, task).inc(float(call.cost_usd))
        elif call.status not in ("error", "blocked"):
            self.unpriced.labels(model, task).inc()
        if call.latency_ms is not None:
            self.latency.labels(model, call.operation).observe(call.latency_ms / 1000)

    def listener(self, _scope: UsageScope, call: CallRecord) -> None:
        """A scope call listener (``scope.listeners.append(metrics.listener)``)."""
        self.observe_call(call)


def serve(port: int, registry: CollectorRegistry | None = None) -> Any:
    """Serve ``/metrics`` on ``port``: the multiprocess collector when that mode is on."""
    if registry is None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    return start_http_server(port, addr="127.0.0.1", registry=registry or REGISTRY)
