"""The OpenTelemetry export's spans, read from an in-memory exporter."""

from __future__ import annotations

from decimal import Decimal

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tokenmeter.context import CallRecord
from tokenmeter.otel import OTelExport


def test_a_label_no_utf8_carries_never_fails_the_exporters_batch() -> None:
    """OTLP encodes every string as UTF-8, and one that cannot be fails the whole batch of
    spans (other tasks' too): a model or task name with a lone surrogate is exported as its
    escape, every other value as it is."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    export = OTelExport()
    export.tracer = provider.get_tracer("test")
    export.export(
        CallRecord(
            operation="chat",
            requested_model="gpt-\ud800",
            task_name="demo.\udcff",
            scope_kind="post\x00",
            input_tokens=7,
            cost_usd=Decimal("0.0000105"),
        )
    )
    export.export(CallRecord(operation="chat", response_model="gpt-4o-mini", task_name="scan"))
    odd, plain = spans.get_finished_spans()
    assert odd.name == "chat gpt-\\ud800" and plain.name == "chat gpt-4o-mini"
    assert odd.attributes is not None and plain.attributes is not None
    assert odd.attributes["tokenmeter.task_name"] == "demo.\\udcff"
    assert odd.attributes["gen_ai.request.model"] == "gpt-\\ud800"
    assert odd.attributes["tokenmeter.scope_kind"] == "post\\x00"
    assert odd.attributes["gen_ai.usage.input_tokens"] == 7
    assert odd.attributes["tokenmeter.cost_usd"] == "0.0000105"
    assert plain.attributes["tokenmeter.task_name"] == "scan"
    for span in (odd, plain):  # what OTLP does to each string: it encodes now
        span.name.encode("utf-8")
        for value in span.attributes.values():
            if isinstance(value, str):
                value.encode("utf-8")
