"""Write side: capture the usage of every OpenAI call and flush it to the ledger.

Knows nothing of the application's tasks; usable by any Celery app or plain script::

    import instrumentation
    instrumentation.instrument()
    with instrumentation.usage_scope("report", "weekly") as scope:
        client.chat.completions.create(...)
    print(scope.totals)
"""

from instrumentation.context import (
    CallRecord,
    UsageScope,
    UsageTotals,
    current_scope,
    record_call,
    set_sink,
    usage_scope,
)

__all__ = [
    "CallRecord",
    "UsageScope",
    "UsageTotals",
    "current_scope",
    "record_call",
    "set_sink",
    "usage_scope",
]
