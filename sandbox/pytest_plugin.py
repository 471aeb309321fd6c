"""pytest fixtures for the sandbox servers (loaded by tests/conftest.py).

The servers are started once per test session; tests compare by request id, so the session
ledger is never cleared between tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from .runner import SandboxServers

SANDBOX_KEY = "sk-sandbox"


@pytest.fixture(scope="session")
def sandbox() -> Iterator[SandboxServers]:
    with SandboxServers() as servers:
        yield servers


@pytest.fixture
def openai_client(sandbox: SandboxServers) -> Iterator[Any]:
    from openai import OpenAI

    client = OpenAI(base_url=sandbox.openai_base_url, api_key=SANDBOX_KEY, max_retries=0)
    yield client
    client.close()


@pytest.fixture
async def async_openai_client(sandbox: SandboxServers) -> AsyncIterator[Any]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=sandbox.openai_base_url, api_key=SANDBOX_KEY, max_retries=0)
    yield client
    await client.close()


@pytest.fixture
def praw_reddit(sandbox: SandboxServers) -> Any:
    import praw

    return praw.Reddit(**sandbox.praw_settings())
