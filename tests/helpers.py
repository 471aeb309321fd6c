"""Small test doubles shared by the suite."""

from __future__ import annotations

import importlib
import importlib.util
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import openai

from bench.env import subprocess_env
from tokenmeter.context import CallRecord, UsageScope, record_call, set_sink

#: What a stream cut mid-way raises in the caller: openai wraps it in APIConnectionError in
#: its later 3.x releases; openai 3.0 lets the transport's own error through.
STREAM_DROPPED: tuple[type[BaseException], ...] = (
    openai.APIConnectionError,
    ConnectionError,
    *(
        importlib.import_module(m).TransportError
        for m in ("httpx", "httpx2")
        if importlib.util.find_spec(m) is not None
    ),
)

# re-exported for the tests: one definition, shared with the benches
__all__ = [
    "STREAM_DROPPED",
    "CollectingSink",
    "chat_call",
    "clear_settings",
    "collecting_sink",
    "dead_pid",
    "subprocess_env",
    "wait_for",
]


class CollectingSink:
    """Keeps the closed root scopes and unscoped calls it is handed, writes nothing."""

    def __init__(self) -> None:
        self.scopes: list[UsageScope] = []
        self.unscoped: list[CallRecord] = []

    def scope_closed(self, scope: UsageScope) -> None:
        self.scopes.append(scope)

    def unscoped_call(self, call: CallRecord) -> None:
        self.unscoped.append(call)


@contextmanager
def collecting_sink() -> Iterator[CollectingSink]:
    """Install a CollectingSink for a block, then restore the previous sink."""
    sink = CollectingSink()
    previous = set_sink(sink)
    try:
        yield sink
    finally:
        set_sink(previous)


def chat_call(
    tag: str, n_in: int = 100, n_out: int = 20, cost: Decimal = Decimal("0.0000270000")
) -> CallRecord:
    """Record a chat call ``req_<tag>`` in the current scope (as the openai hook would)."""
    return record_call(
        CallRecord(
            operation="chat",
            requested_model="gpt-4o-mini",
            request_id=f"req_{tag}",
            input_tokens=n_in,
            output_tokens=n_out,
            cost_usd=cost,
        )
    )


def clear_settings() -> None:
    """Forget the settings read so far (the library's and the application's)."""
    from models.settings import get_settings as get_app_settings
    from tokenmeter.settings import get_settings

    get_settings.cache_clear()
    get_app_settings.cache_clear()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def dead_pid() -> int:
    """The pid of a process that has just exited (a worker that "died")."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
