"""The OpenTelemetry set-up the benchmarks compare with: spans batched, then thrown away.

A ``BatchSpanProcessor`` (what a production set-up uses) in front of an exporter that keeps
nothing, so a benchmark times the instrumentation and the SDK's span handling, not a
collector's network.
"""

from __future__ import annotations

from typing import Any


def discarding_provider() -> Any:
    """A ``TracerProvider`` whose spans are batched and discarded."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Discard()))
    return provider
