"""Prometheus metrics from the worker: calls, tokens by category, cost, errors, latency.

Labels: model, operation, task, status.  Cost is exported as a float counter because that is
what Prometheus stores; the ledger stays the exact record (Decimal), metrics are for graphs
and alerts.

With ``TOKENMETER_METRICS_PORT`` set, a worker runs prometheus_client's multiprocess mode
whatever its pool: every process that records (each prefork child, or the worker itself with
the threads, solo and gevent pools) writes its samples to files in one folder, and the main
process serves all of them on that port.  :func:`prepare_multiprocess` picks the folder at
``worker_init``, before the pool starts: ``PROMETHEUS_MULTIPROC_DIR`` if the user set it (theirs
to manage), else ``prometheus/worker-<pid>`` in tokenmeter's data dir, new for each worker run
(a restart starts from zero; folders of workers no longer running are removed).

prometheus_client chooses its value class when it is first imported, and ``celery worker``
imports it before the application: so the choice is made again here, before any metric
exists.  Where that is not possible the worker says so in one warning with the fix.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)

from .context import CallRecord, UsageScope
from .ledger import storable
from .procs import pid_alive

logger = logging.getLogger("tokenmeter.metrics")
ENV = "PROMETHEUS_MULTIPROC_DIR"

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
        # labels a user controls: one no UTF-8 carries would break every later scrape
        model, task = storable(call.model or "unknown"), storable(call.task_name or "none")
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


class AuditGauges:
    """The last audit against the provider's books (``tokenmeter.audit``): per measure the
    difference nothing explains, whether it was clean, when it ran.  Gauges in multiprocess
    mode ``mostrecent``: whichever process ran the audit last is what ``/metrics`` shows."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else REGISTRY
        self.unexplained = Gauge(
            "tokenmeter_audit_unexplained_difference",
            "Last audit: sum of |provider - ledger| that no known cause explains "
            "(measure: requests, a token category, or usd)",
            ["measure"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.clean = Gauge(
            "tokenmeter_audit_clean",
            "Last audit: 1 clean, 0 differences",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.last_run = Gauge(
            "tokenmeter_audit_last_run_timestamp_seconds",
            "When the last audit finished (Unix time)",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.failures = Counter(
            "tokenmeter_audit_failures", "Audits that could not be made", registry=r
        )

    def observe(self, unexplained: dict[str, Any], clean: bool, at: float) -> None:
        for measure, value in unexplained.items():
            self.unexplained.labels(measure).set(float(value))
        self.clean.set(1 if clean else 0)
        self.last_run.set(at)

    def failed(self) -> None:
        self.failures.inc()


_audit_gauges: AuditGauges | None = None


def audit_gauges() -> AuditGauges:
    """The process's audit gauges, made on first use (in the global registry)."""
    global _audit_gauges
    if _audit_gauges is None:
        _audit_gauges = AuditGauges()
    return _audit_gauges


def serve(port: int, registry: CollectorRegistry | None = None) -> Any:
    """Serve ``/metrics`` on ``port``: the multiprocess collector when that mode is on."""
    if registry is None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    return start_http_server(port, addr="127.0.0.1", registry=registry or REGISTRY)


def prepare_multiprocess(data_dir: Path) -> Path | None:
    """Turn multiprocess mode on for this worker and the processes it forks.

    Returns the samples folder, or None (with one warning) when the mode cannot work.
    """
    if os.environ.get(ENV):
        folder = Path(os.environ[ENV])
        folder.mkdir(parents=True, exist_ok=True)
    else:
        root = data_dir / "prometheus"
        for old in root.glob("worker-*"):  # a worker that is gone: its samples are stale
            pid = old.name.removeprefix("worker-")
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        folder = root / f"worker-{os.getpid()}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        os.environ[ENV] = str(folder)
    from prometheus_client import values

    if not hasattr(values, "ValueClass") or not hasattr(values, "MultiProcessValue"):
        logger.warning(
            "metrics: this prometheus_client cannot switch to multiprocess mode after import; "
            "set %s to an empty folder before starting the worker",
            ENV,
        )
        return None
    if values.ValueClass is values.MutexValue:  # imported before the variable was set
        values.ValueClass = values.MultiProcessValue()
    return folder


def mark_process_dead(pid: int) -> None:
    """A recording process ends: drop its live gauges (counters stay, they are sums)."""
    if os.environ.get(ENV):
        multiprocess.mark_process_dead(pid)
