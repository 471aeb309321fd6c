"""OpenTelemetry export of every metered call, in the GenAI semantic conventions (optional).

With ``TOKENMETER_OTEL=true`` (off by default; needs ``opentelemetry-api``, the ``otel`` extra)
each call a task makes becomes a span, a child of whatever span is current when the call is
recorded (the task's, with the Celery instrumentation), named ``{operation} {model}`` and
carrying tokenmeter's own numbers:

- ``gen_ai.provider.name`` and ``gen_ai.system`` (``openai``), ``gen_ai.operation.name``,
  ``gen_ai.request.model``, ``gen_ai.response.model``, ``gen_ai.response.id``,
  ``openai.response.service_tier``;
- ``gen_ai.usage.input_tokens`` / ``output_tokens``, ``gen_ai.usage.cache_read.input_tokens``,
  ``gen_ai.usage.cache_creation.input_tokens``, ``gen_ai.usage.reasoning.output_tokens``;
- the cost under the proposed names (semantic-conventions-genai #443):
  ``gen_ai.usage.cost.amount`` (a double), ``gen_ai.usage.cost.currency`` (``USD``),
  ``gen_ai.usage.cost.source`` (``local``: computed by the meter), and the exact decimal as
  ``tokenmeter.cost_usd`` (a string; absent when the price is unknown, never 0);
- ``error.type`` and an error status for a failed call.

And two metrics: ``gen_ai.client.token.usage`` (histogram, ``{token}``, by
``gen_ai.token.type`` input/output) and ``tokenmeter.openai.cost`` (counter, USD).  Whatever
SDK, processors and exporters the application configured receive them; tokenmeter configures
none.  No prompt, completion or key is ever an attribute.
"""

from __future__ import annotations

import time
from typing import Any

from .context import CallRecord, UsageScope
from .ledger import storable

#: The semantic conventions' operation names for tokenmeter's operations.
OPERATIONS = {
    "chat": "chat",
    "responses": "chat",
    "completion": "text_completion",
    "embedding": "embeddings",
}


class OTelExport:
    """The tracer and instruments, made in the process that records (after a fork)."""

    def __init__(self) -> None:
        from opentelemetry import metrics, trace

        from . import __version__

        self._trace = trace
        self.tracer = trace.get_tracer("tokenmeter", __version__)
        meter = metrics.get_meter("tokenmeter", __version__)
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Tokens billed per call, by gen_ai.token.type (input, output)",
        )
        self.cost = meter.create_counter(
            "tokenmeter.openai.cost", unit="USD", description="Cost of calls (the ledger is exact)"
        )

    def attributes(self, call: CallRecord) -> dict[str, Any]:
        operation = OPERATIONS.get(call.operation, call.operation)
        attrs: dict[str, Any] = {
            "gen_ai.provider.name": "openai",
            "gen_ai.system": "openai",
            "gen_ai.operation.name": operation,
            "gen_ai.usage.input_tokens": call.input_tokens,
            "gen_ai.usage.output_tokens": call.output_tokens,
            "gen_ai.usage.cache_read.input_tokens": call.cached_input_tokens,
            "gen_ai.usage.cache_creation.input_tokens": call.cache_write_tokens,
            "gen_ai.usage.reasoning.output_tokens": call.reasoning_tokens,
            "tokenmeter.status": call.status,
        }
        optional = {
            "gen_ai.request.model": call.requested_model,
            "gen_ai.response.model": call.response_model,
            "gen_ai.response.id": call.request_id,
            "openai.response.service_tier": call.service_tier,
            "tokenmeter.task_name": call.task_name,
            "tokenmeter.scope_kind": call.scope_kind,
            "tokenmeter.price_source": call.price_source,
        }
        # labels a user controls: one no UTF-8 carries would fail the exporter's whole batch
        attrs.update({k: storable(v) for k, v in optional.items() if v is not None})
        if call.image_count:
            attrs["tokenmeter.image_count"] = call.image_count
        if call.cost_usd is not None:
            attrs["gen_ai.usage.cost.amount"] = float(call.cost_usd)
            attrs["gen_ai.usage.cost.currency"] = "USD"
            attrs["gen_ai.usage.cost.source"] = "local"
            attrs["tokenmeter.cost_usd"] = str(call.cost_usd)
        if call.status not in ("ok", "billed_unknown") and call.error_type:
            attrs["error.type"] = call.error_type
        return attrs

    def export(self, call: CallRecord) -> None:
        attrs = self.attributes(call)
        end = time.time_ns()
        start = end - int(call.latency_ms * 1_000_000) if call.latency_ms else end
        model = storable(call.response_model or call.requested_model or "unknown")
        span = self.tracer.start_span(
            f"{attrs['gen_ai.operation.name']} {model}",
            kind=self._trace.SpanKind.CLIENT,
            start_time=start,
            attributes=attrs,
        )
        if "error.type" in attrs:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, call.error_type))
        span.end(end_time=end)
        labels = {
            "gen_ai.provider.name": "openai",
            "gen_ai.operation.name": attrs["gen_ai.operation.name"],
            "gen_ai.response.model": model,
        }
        if call.input_tokens:
            self.tokens.record(call.input_tokens, {**labels, "gen_ai.token.type": "input"})
        if call.output_tokens:
            self.tokens.record(call.output_tokens, {**labels, "gen_ai.token.type": "output"})
        if call.cost_usd is not None:
            self.cost.add(float(call.cost_usd), labels)

    def listener(self, _scope: UsageScope, call: CallRecord) -> None:
        """A scope call listener (``scope.listeners.append(export.listener)``)."""
        self.export(call)
