"""The capture relies on private parts of the openai SDK: a changed SDK is said, not misread."""

from __future__ import annotations

import logging

import pytest
from openai import OpenAI, Stream
from openai._base_client import SyncAPIClient

from tests.helpers import collecting_sink
from tokenmeter import openai_hooks


@pytest.fixture(autouse=True)
def _not_instrumented(no_installation: None):
    openai_hooks.uninstrument()
    yield
    openai_hooks.uninstrument()


def test_the_installed_sdk_is_supported() -> None:
    assert openai_hooks.sdk_problems() == []


def test_a_changed_request_door_turns_capture_off_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, sandbox
) -> None:
    original = SyncAPIClient.request

    def request(self, *args, **kwargs):  # a door whose arguments are no longer named the same
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SyncAPIClient, "request", request)
    with caplog.at_level(logging.WARNING, logger="tokenmeter.openai"):
        assert openai_hooks.instrument() is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "NOT metered" in warnings[0] and "request" in warnings[0]
    assert not openai_hooks.is_instrumented() and SyncAPIClient.request is request

    client = OpenAI(base_url=sandbox.openai_base_url, api_key="sk-sandbox", max_retries=0)
    with collecting_sink() as sink:  # the caller's call still works, and nothing is misread
        answer = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert answer.usage is not None and sink.unscoped == []


def test_a_stream_without_its_iterator_is_a_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    def __init__(self, *args, **kwargs):  # keeps its chunks somewhere else now
        self.chunks = None

    monkeypatch.setattr(Stream, "__init__", __init__)
    assert openai_hooks.sdk_problems() == ["Stream no longer keeps its _iterator"]


def test_a_retry_hook_that_no_longer_takes_its_options_by_name_is_a_problem(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The retry hook reads the call's options and the failed attempt's answer by name: an SDK
    that passes them another way would leave retried attempts without ids of their own."""

    def _sleep_for_retry(self, retries_taken, max_retries, options, response):  # positional
        return None

    monkeypatch.setattr(SyncAPIClient, "_sleep_for_retry", _sleep_for_retry)
    assert openai_hooks.sdk_problems() == [
        "SyncAPIClient._sleep_for_retry(self, *, options, response) changed"
    ]
