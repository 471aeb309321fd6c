"""Small test doubles shared by the suite."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from bench.env import subprocess_env
from tokenmeter.context import CallRecord, UsageScope, set_sink

# re-exported for the tests: one definition, shared with the benches
__all__ = ["CollectingSink", "clear_settings", "collecting_sink", "subprocess_env"]


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


def clear_settings() -> None:
    """Forget the settings read so far (the library's and the application's)."""
    from models.settings import get_settings as get_app_settings
    from tokenmeter.settings import get_settings

    get_settings.cache_clear()
    get_app_settings.cache_clear()
